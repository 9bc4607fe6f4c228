//! A throwaway PostgreSQL cluster for tests: `initdb` into a temporary
//! directory, `postgres` listening on 127.0.0.1 only (a free port, its unix
//! socket inside the same directory), trust authentication for the loopback,
//! stopped by PID when the [`TestPg`] is dropped.
//!
//! Tests run as root in CI and `initdb` refuses root, so the cluster is then
//! run as the `postgres` account (Debian's package creates it) through
//! `setpriv`, which execs in place: the child we hold *is* the postmaster.
//! The temporary directory is handed to that account (a root-owned 0700
//! directory would be closed to it).
//!
//! Binaries are looked up in `PATH`, then in `/usr/lib/postgresql/<ver>/bin`
//! (newest first). When none exist, [`TestPg::start`] returns
//! [`TestPgError::NotInstalled`]; callers print the reason and skip.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a cluster could not be started. Each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum TestPgError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found in PATH or /usr/lib/postgresql/*/bin; install Debian's `postgresql` package (scripts/install-test-deps.sh does)"
    )]
    NotInstalled,
    #[error("running as root but there is no `postgres` account to run the cluster as; install Debian's `postgresql` package, which creates it")]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what} failed ({status}): {output}")]
    Command { what: String, status: String, output: String },
    #[error("PostgreSQL on 127.0.0.1:{port} did not accept connections within {secs} s; its log:\n{log}")]
    NotReady { port: u16, secs: u64, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestPgError {
    let what = what.into();
    move |source| TestPgError::Io { what, source }
}

/// Where the server binaries of one PostgreSQL installation are.
#[derive(Debug, Clone)]
pub struct PgBin {
    pub initdb: PathBuf,
    pub postgres: PathBuf,
    pub psql: Option<PathBuf>,
}

impl PgBin {
    /// `initdb` and `postgres` side by side in `PATH`, else the newest
    /// `/usr/lib/postgresql/<version>/bin`.
    pub fn find() -> Option<PgBin> {
        let mut dirs: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        dirs.extend(versions.into_iter().map(|(_, d)| d));
        // psql: beside the server binaries, else anywhere on the list
        // (/usr/bin/psql is Debian's wrapper).
        let psql = |own: &Path| {
            std::iter::once(own.to_path_buf()).chain(dirs.iter().cloned()).map(|d| d.join("psql")).find(|p| p.is_file())
        };
        dirs.iter().find_map(|d| {
            let initdb = d.join("initdb");
            let postgres = d.join("postgres");
            (initdb.is_file() && postgres.is_file()).then(|| PgBin { psql: psql(d), initdb, postgres })
        })
    }
}

/// The account the cluster runs as when we are root: (uid, gid).
fn postgres_account() -> Result<Option<(u32, u32)>, TestPgError> {
    if current_uid() != 0 {
        return Ok(None);
    }
    let out = Command::new("id").args(["-u", "postgres"]).output().map_err(io("running `id -u postgres`"))?;
    let gid = Command::new("id").args(["-g", "postgres"]).output().map_err(io("running `id -g postgres`"))?;
    if !out.status.success() || !gid.status.success() {
        return Err(TestPgError::NoPostgresUser);
    }
    let parse = |b: &[u8]| String::from_utf8_lossy(b).trim().parse::<u32>().ok();
    match (parse(&out.stdout), parse(&gid.stdout)) {
        (Some(u), Some(g)) => Ok(Some((u, g))),
        _ => Err(TestPgError::NoPostgresUser),
    }
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to our effective uid.
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

/// A command run as the cluster's account.
fn as_owner(account: Option<(u32, u32)>, program: &Path) -> Command {
    match account {
        None => Command::new(program),
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--reset-env")
                .arg("--")
                .arg(program);
            c
        }
    }
}

fn free_port() -> Result<u16, TestPgError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("binding a free loopback port"))?;
    l.local_addr().map(|a| a.port()).map_err(io("reading the free port"))
}

/// A running throwaway cluster; stopped and deleted on drop.
pub struct TestPg {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    bin: PgBin,
    account: Option<(u32, u32)>,
    /// Started with `ssl=on` (its certificate in the data dir).
    tls: bool,
    /// Started with PostgreSQL's own durability settings (see [`TestPg::start_durable`]).
    durable: bool,
}

impl std::fmt::Debug for TestPg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPg").field("port", &self.port).field("dir", &self.dir.path()).finish()
    }
}

impl TestPg {
    /// initdb + start, waiting until it accepts connections.
    pub fn start() -> Result<TestPg, TestPgError> {
        Self::start_with(None, false)
    }

    /// [`TestPg::start`] with PostgreSQL's default durability (`fsync`,
    /// `synchronous_commit`, `full_page_writes` on): a commit returns after
    /// its WAL flush, as on a production server. For benchmarks that compare
    /// with SQLite, which keyhaven acknowledges after its fdatasync; tests use
    /// [`TestPg::start`], which turns those off for speed.
    pub fn start_durable() -> Result<TestPg, TestPgError> {
        Self::start_with(None, true)
    }

    /// [`TestPg::start`] with TLS on (`ssl=on`): `cert_pem` (the server's
    /// certificate, chain after it) and `key_pem` become the cluster's
    /// `server.crt` and `server.key`. Plaintext connections still work.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<TestPg, TestPgError> {
        Self::start_with(Some((cert_pem, key_pem)), false)
    }

    fn start_with(tls: Option<(&str, &str)>, durable: bool) -> Result<TestPg, TestPgError> {
        let bin = PgBin::find().ok_or(TestPgError::NotInstalled)?;
        let account = postgres_account()?;
        let dir = tempfile::Builder::new().prefix("keyhaven-testpg-").tempdir().map_err(io("creating a temp dir"))?;
        if let Some((uid, gid)) = account {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(io(format!("handing {} to the postgres account", dir.path().display())))?;
        }
        // The temp dir's parent (/tmp) must be passable for that account; it is.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(io("setting the temp dir's mode"))?;
        let data = dir.path().join("data");
        let out = as_owner(account, &bin.initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!("running {}", bin.initdb.display())))?;
        if !out.status.success() {
            return Err(TestPgError::Command {
                what: "initdb".into(),
                status: out.status.to_string(),
                output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            });
        }
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::OpenOptionsExt;
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io(format!("creating {}", path.display())))?;
                std::io::Write::write_all(&mut f, pem.as_bytes()).map_err(io(format!("writing {}", path.display())))?;
                if let Some((uid, gid)) = account {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(io(format!("chown of {name}")))?;
                }
            }
        }
        let mut pg = TestPg { child: None, port: 0, dir, bin, account, tls: tls.is_some(), durable };
        let mut last = None;
        // A free port can be taken by someone else before postgres binds it: retry.
        for _ in 0..5 {
            pg.port = free_port()?;
            match pg.spawn() {
                Ok(()) => return Ok(pg),
                Err(e) => {
                    pg.stop();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(TestPgError::NotReady { port: 0, secs: 0, log: String::new() }))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn spawn(&mut self) -> Result<(), TestPgError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("opening the PostgreSQL log"))?;
        if let Some((uid, gid)) = self.account {
            std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid)).map_err(io("chown of the log"))?;
        }
        let log2 = log.try_clone().map_err(io("duplicating the log handle"))?;
        let child = as_owner(self.account, &self.bin.postgres)
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
            .args(if self.durable {
                ["-c", "fsync=on", "-c", "full_page_writes=on", "-c", "synchronous_commit=on"]
            } else {
                ["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"]
            })
            .args(["-c", if self.tls { "ssl=on" } else { "ssl=off" }])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("starting {}", self.bin.postgres.display())))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return Err(self.not_ready(0));
                }
            }
            if self.accepts_queries() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.not_ready(30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn not_ready(&self, secs: u64) -> TestPgError {
        TestPgError::NotReady {
            port: self.port,
            secs,
            log: std::fs::read_to_string(self.log_path()).unwrap_or_default(),
        }
    }

    /// Whether the server is up and past recovery: the log says it is ready
    /// and the port takes connections.
    fn accepts_queries(&self) -> bool {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        log.contains("database system is ready to accept connections")
            && std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (data dir, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>` (trust auth, no password).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Run SQL as the superuser with `psql` (e.g. `CREATE DATABASE`).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, TestPgError> {
        let psql = self.bin.psql.clone().ok_or(TestPgError::NotInstalled)?;
        let out = Command::new(&psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!("running {}", psql.display())))?;
        if !out.status.success() {
            return Err(TestPgError::Command {
                what: format!("psql {sql:?}"),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A new empty database; returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, TestPgError> {
        self.psql("postgres", &format!("CREATE DATABASE \"{}\"", name.replace('"', "")))?;
        Ok(self.url(name))
    }

    /// The postmaster's PID (the child itself: `setpriv` execs in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT = immediate shutdown: no checkpoint, the data is thrown away anyway.
            let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Start a cluster, or print why PostgreSQL tests are skipped and return
/// `None` — only when no PostgreSQL is installed; every other failure panics
/// (a test harness must not hide a broken setup).
pub fn start_or_skip(test: &str) -> Option<TestPg> {
    skip_if_not_installed(test, TestPg::start())
}

/// [`start_or_skip`] with PostgreSQL's default durability (see [`TestPg::start_durable`]).
pub fn start_durable_or_skip(test: &str) -> Option<TestPg> {
    skip_if_not_installed(test, TestPg::start_durable())
}

/// [`start_or_skip`] with TLS on (see [`TestPg::start_tls`]).
pub fn start_tls_or_skip(test: &str, cert_pem: &str, key_pem: &str) -> Option<TestPg> {
    skip_if_not_installed(test, TestPg::start_tls(cert_pem, key_pem))
}

fn skip_if_not_installed(test: &str, started: Result<TestPg, TestPgError>) -> Option<TestPg> {
    match started {
        Ok(pg) => Some(pg),
        Err(TestPgError::NotInstalled) => {
            eprintln!("skipping {test}: {}", TestPgError::NotInstalled);
            None
        }
        Err(e) => panic!("{test}: could not start a throwaway PostgreSQL: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_answers_and_is_gone_after_drop() {
        let Some(pg) = start_or_skip("a_cluster_starts_answers_and_is_gone_after_drop") else { return };
        assert_eq!(pg.psql("postgres", "SELECT 1 + 1").unwrap(), "2");
        let url = pg.create_database("t1").unwrap();
        assert!(url.ends_with("/t1"), "{url}");
        assert_eq!(pg.psql("t1", "SELECT current_database()").unwrap(), "t1");
        // Only the loopback.
        let listen = pg.psql("postgres", "SHOW listen_addresses").unwrap();
        assert_eq!(listen, "127.0.0.1");
        let pid = pg.pid().unwrap();
        let port = pg.port();
        let dir = pg.dir().to_path_buf();
        drop(pg);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "postmaster {pid} still running");
        assert!(std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
        assert!(!dir.exists(), "temp dir left behind");
    }
}
