//! Rsync tasks' pure rules: the cron schedule (TrueNAS's five fields), the
//! options a task may add (`extra`), the command line of a run, rsync's names
//! for its exit codes, the `--info=progress2` line, and the pinned
//! known_hosts line. Running rsync is `keyhaven-ssh`'s; storing tasks is the store's.

use std::fmt;

// ---------------------------------------------------------------- schedule

/// One cron field: the set of values it matches, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field(u64);

/// Why a cron field was refused (shown under the field's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(String);

const DOW_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const MONTH_NAMES: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];

impl Field {
    /// Parse `*`, `*/N`, `A`, `A-B`, `A-B/N` and comma lists of them, with
    /// values in `min..=max` (names allowed where `names` is given; 7 = Sunday for dow).
    fn parse(text: &str, min: u32, max: u32, names: &[&str], name_base: u32) -> Result<Field, ScheduleError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ScheduleError("must not be empty (use * for every value)".into()));
        }
        if text.len() > 256 {
            return Err(ScheduleError("is too long (at most 256 characters)".into()));
        }
        let value = |s: &str| -> Result<u32, ScheduleError> {
            let lower = s.to_ascii_lowercase();
            if let Some(i) = names.iter().position(|n| *n == lower) {
                return Ok(i as u32 + name_base);
            }
            let n: u32 = s.parse().map_err(|_| ScheduleError(format!("{s:?} is not a number from {min} to {max}")))?;
            if n < min || n > max {
                return Err(ScheduleError(format!("{n} is out of range ({min}-{max})")));
            }
            Ok(n)
        };
        let mut bits = 0u64;
        for part in text.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s
                        .parse()
                        .ok()
                        .filter(|s| *s >= 1 && *s <= max)
                        .ok_or_else(|| ScheduleError(format!("step {s:?} is not a number from 1 to {max}")))?;
                    (r, step)
                }
                None => (part, 1),
            };
            let (lo, hi) = if range == "*" {
                (min, max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (value(a)?, value(b)?);
                if a > b {
                    return Err(ScheduleError(format!("range {range:?} runs backwards")));
                }
                (a, b)
            } else {
                let a = value(range)?;
                // `5/15` means 5, 20, 35, 50 (from 5 to the end, as cron does).
                (a, if step > 1 { max } else { a })
            };
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok(Field(bits))
    }

    fn has(self, v: u32) -> bool {
        self.0 & (1 << v) != 0
    }
}

/// A task's schedule as TrueNAS gives it (`{minute, hour, dom, month, dow}`,
/// cron syntax per field), parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    minute: Field,
    hour: Field,
    dom: Field,
    month: Field,
    dow: Field,
    dom_any: bool,
    dow_any: bool,
}

/// A local wall-clock minute to test a schedule against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minute {
    pub minute: u32,
    pub hour: u32,
    /// Day of month, 1–31.
    pub dom: u32,
    /// Month, 1–12.
    pub month: u32,
    /// Day of week, 0 = Sunday.
    pub dow: u32,
}

impl Schedule {
    /// Parse the five fields; errors name the field (`minute`, `hour`, `dom`, `month`, `dow`).
    pub fn parse(
        minute: &str,
        hour: &str,
        dom: &str,
        month: &str,
        dow: &str,
    ) -> Result<Schedule, (&'static str, ScheduleError)> {
        let mut dow_field = Field::parse(dow, 0, 7, &DOW_NAMES, 0).map_err(|e| ("dow", e))?;
        if dow_field.has(7) {
            dow_field.0 = (dow_field.0 & !(1 << 7)) | 1;
        }
        Ok(Schedule {
            minute: Field::parse(minute, 0, 59, &[], 0).map_err(|e| ("minute", e))?,
            hour: Field::parse(hour, 0, 23, &[], 0).map_err(|e| ("hour", e))?,
            dom: Field::parse(dom, 1, 31, &[], 0).map_err(|e| ("dom", e))?,
            month: Field::parse(month, 1, 12, &MONTH_NAMES, 1).map_err(|e| ("month", e))?,
            dow: dow_field,
            dom_any: dom.trim() == "*",
            dow_any: dow.trim() == "*",
        })
    }

    /// Whether a run is due in this minute. As cron: when both day fields are
    /// restricted, either one matching is enough.
    pub fn matches(&self, t: Minute) -> bool {
        let day = match (self.dom_any, self.dow_any) {
            (false, false) => self.dom.has(t.dom) || self.dow.has(t.dow),
            _ => self.dom.has(t.dom) && self.dow.has(t.dow),
        };
        self.minute.has(t.minute) && self.hour.has(t.hour) && self.month.has(t.month) && day
    }
}

// ---------------------------------------------------------------- extra options

/// Why an `extra` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtraError {
    #[error(
        "{0:?} is not an rsync option: each entry is one option starting with '-' (write a value as --option=VALUE)"
    )]
    NotAnOption(String),
    #[error("{0:?} would replace how keyhaven connects (the SSH command, the remote rsync or the daemon) or reach outside the task's path (files named by the option, followed links); set the task's connection or path instead")]
    Transport(String),
    #[error("{0:?} contains a control character")]
    Control(String),
    #[error("at most 64 entries of at most 1024 characters each")]
    TooMuch,
}

/// Long options that would replace the transport or the remote command, or
/// reach outside the task's path.
const REFUSED_LONG: &[&str] = &[
    "--rsh",
    "--rsync-path",
    "--remote-option",
    "--connect-program",
    "--server",
    "--sender",
    "--daemon",
    "--config",
    "--dparam",
    "--early-input",
    // Options that read or write local files by name: they would reach past
    // the task's path (the data dir's database and master key included).
    "--log-file",
    "--write-batch",
    "--only-write-batch",
    "--read-batch",
    "--files-from",
    "--include-from",
    "--exclude-from",
    "--password-file",
    "--temp-dir",
    "--partial-dir",
    "--backup-dir",
    "--compare-dest",
    "--copy-dest",
    "--link-dest",
    "--filter",
    // Following links would copy what a link planted in the path points at.
    "--copy-links",
    "--copy-unsafe-links",
    "--copy-dirlinks",
    "--keep-dirlinks",
    // Passes the remote path to the remote shell unescaped.
    "--old-args",
];

/// Check a task's `extra`: each entry is one option; none may change the
/// transport (`-e`, `--rsh`, `--rsync-path`, `-M`…) or add a path operand.
pub fn check_extra(extra: &[String]) -> Result<(), ExtraError> {
    if extra.len() > 64 || extra.iter().any(|e| e.len() > 1024) {
        return Err(ExtraError::TooMuch);
    }
    for e in extra {
        if e.chars().any(char::is_control) {
            return Err(ExtraError::Control(e.clone()));
        }
        if !e.starts_with('-') || e == "-" || e == "--" {
            return Err(ExtraError::NotAnOption(e.clone()));
        }
        if let Some(long) = e.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or("");
            // rsync takes long options by their full name only (no abbreviations).
            let refused = REFUSED_LONG.iter().any(|r| &r[2..] == name);
            if refused {
                return Err(ExtraError::Transport(e.clone()));
            }
        } else {
            // A cluster of short options: `-e` and `-M` take the transport, `-8`… are fine.
            let cluster = &e[1..];
            // `-L`/`-k`/`-K` follow links; `-T`/`-f` name local files or filters.
            if cluster.contains(['e', 'M', 'L', 'k', 'K', 'T', 'f']) {
                return Err(ExtraError::Transport(e.clone()));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- command line

/// The boolean options of a task, as TrueNAS names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    pub recursive: bool,
    pub times: bool,
    pub compress: bool,
    pub archive: bool,
    pub delete: bool,
    pub quiet: bool,
    pub preserveperm: bool,
    pub preserveattr: bool,
    pub delayupdates: bool,
}

/// rsync's own options for a task's flags (TrueNAS's mapping), then `extra`,
/// then keyhaven's progress reporting.
pub fn rsync_options(f: &Flags, extra: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    let mut add = |on: bool, opt: &str| {
        if on {
            args.push(opt.to_string());
        }
    };
    add(f.archive, "--archive");
    add(f.compress, "--compress");
    add(f.delayupdates, "--delay-updates");
    add(f.delete, "--delete-delay");
    add(f.preserveattr, "--xattrs");
    add(f.preserveperm, "--perms");
    add(f.recursive, "--recursive");
    add(f.times, "--times");
    args.extend(extra.iter().cloned());
    // Last, so that it wins: the job's progress comes from it.
    args.push("--info=progress2".into());
    args
}

/// `host` as rsync and ssh take it in `user@host:path`: IPv6 bracketed.
pub fn bracket_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The remote operand of an SSH-mode run: `user@host:path` (IPv6 bracketed).
pub fn ssh_operand(user: &str, host: &str, path: &str) -> String {
    format!("{user}@{}:{path}", bracket_host(host))
}

/// The remote operand of a MODULE-mode run: `rsync://host:port/module/`.
pub fn module_operand(host: &str, port: u16, module: &str) -> String {
    format!("rsync://{}:{port}/{module}/", bracket_host(host))
}

/// A known_hosts line that pins `key` for `host`/`port`, as ssh looks it up:
/// `host` on port 22, `[host]:port` otherwise (IPv6 hosts are bracketed in
/// both forms by ssh only in the second; on port 22 they appear bare).
pub fn known_hosts_line(host: &str, port: u16, key_type: &str, key_base64: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if port == 22 {
        format!("{host} {key_type} {key_base64}")
    } else {
        format!("[{host}]:{port} {key_type} {key_base64}")
    }
}

// ---------------------------------------------------------------- exit codes and progress

/// rsync's names for its exit codes (rsync(1), "EXIT VALUES").
pub fn exit_code_name(code: i32) -> &'static str {
    match code {
        0 => "success",
        1 => "syntax or usage error",
        2 => "protocol incompatibility",
        3 => "errors selecting input/output files, dirs",
        4 => "requested action not supported",
        5 => "error starting client-server protocol",
        6 => "daemon unable to append to log-file",
        10 => "error in socket I/O",
        11 => "error in file I/O",
        12 => "error in rsync protocol data stream",
        13 => "errors with program diagnostics",
        14 => "error in IPC code",
        20 => "received SIGUSR1 or SIGINT",
        21 => "some error returned by waitpid()",
        22 => "error allocating core memory buffers",
        23 => "partial transfer due to error",
        24 => "partial transfer due to vanished source files",
        25 => "the --max-delete limit stopped deletions",
        30 => "timeout in data send/receive",
        35 => "timeout waiting for daemon connection",
        255 => "unexplained error (often the SSH connection)",
        _ => "unknown error",
    }
}

/// Exit codes that count as success (TrueNAS: 0, 24 vanished files, 25 max-delete).
pub fn exit_is_success(code: i32) -> bool {
    matches!(code, 0 | 24 | 25)
}

/// One `--info=progress2` update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub bytes: u64,
    pub percent: f64,
    /// As rsync prints it, e.g. `12.34MB/s`.
    pub rate: RateText,
}

/// rsync's rate text (at most 15 bytes, no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RateText([u8; 15], u8);

impl RateText {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0[..self.1 as usize]).unwrap_or("")
    }
}

impl fmt::Debug for RateText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RateText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parse a progress line: `   1,234,567  45%   12.34MB/s    0:00:01 (xfr#3, to-chk=0/5)`.
pub fn parse_progress(line: &str) -> Option<Progress> {
    let mut it = line.split_whitespace();
    let bytes: u64 = it.next()?.replace(',', "").parse().ok()?;
    let percent: f64 = it.next()?.strip_suffix('%')?.parse().ok()?;
    let rate = it.next()?;
    if !rate.ends_with("/s") || rate.len() > 15 {
        return None;
    }
    let mut buf = [0u8; 15];
    buf[..rate.len()].copy_from_slice(rate.as_bytes());
    Some(Progress { bytes, percent: percent.clamp(0.0, 100.0), rate: RateText(buf, rate.len() as u8) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minute: u32, hour: u32, dom: u32, month: u32, dow: u32) -> Minute {
        Minute { minute, hour, dom, month, dow }
    }

    #[test]
    fn truenas_default_schedule_is_hourly_on_the_hour() {
        let s = Schedule::parse("00", "*", "*", "*", "*").unwrap();
        assert!(s.matches(at(0, 5, 3, 4, 2)));
        assert!(!s.matches(at(1, 5, 3, 4, 2)));
    }

    #[test]
    fn steps_ranges_lists_and_names() {
        let s = Schedule::parse("*/15", "1-3", "*", "jan,jul", "mon-fri").unwrap();
        assert!(s.matches(at(45, 2, 10, 7, 5)));
        assert!(!s.matches(at(44, 2, 10, 7, 5)));
        assert!(!s.matches(at(45, 4, 10, 7, 5)));
        assert!(!s.matches(at(45, 2, 10, 8, 5)));
        assert!(!s.matches(at(45, 2, 10, 7, 0)));
        let s = Schedule::parse("5/20", "*", "*", "*", "7").unwrap();
        assert!(s.matches(at(25, 0, 1, 1, 0)), "7 is Sunday too");
        assert!(!s.matches(at(6, 0, 1, 1, 0)));
    }

    #[test]
    fn restricted_dom_and_dow_match_either_as_cron_does() {
        let s = Schedule::parse("0", "0", "1", "*", "mon").unwrap();
        assert!(s.matches(at(0, 0, 1, 3, 3)));
        assert!(s.matches(at(0, 0, 9, 3, 1)));
        assert!(!s.matches(at(0, 0, 9, 3, 2)));
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(Schedule::parse("60", "*", "*", "*", "*").unwrap_err().0, "minute");
        assert_eq!(Schedule::parse("0", "24", "*", "*", "*").unwrap_err().0, "hour");
        assert_eq!(Schedule::parse("0", "*", "0", "*", "*").unwrap_err().0, "dom");
        assert_eq!(Schedule::parse("0", "*", "*", "foo", "*").unwrap_err().0, "month");
        assert_eq!(Schedule::parse("0", "*", "*", "*", "*/0").unwrap_err().0, "dow");
        assert_eq!(Schedule::parse("", "*", "*", "*", "*").unwrap_err().0, "minute");
        assert_eq!(Schedule::parse("5-1", "*", "*", "*", "*").unwrap_err().0, "minute");
    }

    #[test]
    fn extra_may_not_replace_the_transport() {
        for bad in [
            "-e",
            "-avze",
            "--rsh=ssh -i /tmp/k",
            "--rsync-path=sudo rsync",
            "-M--foo",
            "--daemon",
            "-L",
            "--log-file=/x",
            "--files-from=/k",
        ] {
            assert!(matches!(check_extra(&[bad.to_string()]), Err(ExtraError::Transport(_))), "{bad}");
        }
        assert!(matches!(check_extra(&["/etc".into()]), Err(ExtraError::NotAnOption(_))));
        assert!(matches!(check_extra(&["--exclude=a\nb".into()]), Err(ExtraError::Control(_))));
        check_extra(&["--exclude=*.tmp".into(), "-H".into(), "--bwlimit=1000".into(), "-8".into()]).unwrap();
    }

    #[test]
    fn known_hosts_and_operands_bracket_ipv6() {
        assert_eq!(known_hosts_line("::1", 2222, "ssh-ed25519", "AAAA"), "[::1]:2222 ssh-ed25519 AAAA");
        assert_eq!(known_hosts_line("::1", 22, "ssh-ed25519", "AAAA"), "::1 ssh-ed25519 AAAA");
        assert_eq!(known_hosts_line("nas", 22, "ssh-rsa", "AAAA"), "nas ssh-rsa AAAA");
        assert_eq!(ssh_operand("backup", "::1", "/d"), "backup@[::1]:/d");
        assert_eq!(ssh_operand("backup", "nas.lan", "/d"), "backup@nas.lan:/d");
        assert_eq!(module_operand("fe80::1", 873, "data"), "rsync://[fe80::1]:873/data/");
    }

    #[test]
    fn progress2_lines() {
        let p = parse_progress("     32,768  50%   31.25MB/s    0:00:00 (xfr#1, to-chk=0/2)").unwrap();
        assert_eq!(p.bytes, 32768);
        assert_eq!(p.percent, 50.0);
        assert_eq!(p.rate.as_str(), "31.25MB/s");
        assert!(parse_progress("sending incremental file list").is_none());
        assert!(parse_progress("").is_none());
    }

    #[test]
    fn exit_codes_have_rsyncs_names() {
        assert_eq!(exit_code_name(23), "partial transfer due to error");
        assert_eq!(exit_code_name(12), "error in rsync protocol data stream");
        assert!(exit_is_success(24) && exit_is_success(25) && !exit_is_success(23));
    }

    #[test]
    fn options_follow_the_flags_then_extra_then_progress() {
        let f = Flags {
            recursive: true,
            times: true,
            compress: false,
            archive: true,
            delete: true,
            quiet: false,
            preserveperm: false,
            preserveattr: false,
            delayupdates: false,
        };
        let a = rsync_options(&f, &["-H".into()]);
        assert_eq!(a, ["--archive", "--delete-delay", "--recursive", "--times", "-H", "--info=progress2"]);
    }
}
