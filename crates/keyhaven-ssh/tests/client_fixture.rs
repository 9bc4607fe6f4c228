//! A throw-away OpenSSH sshd for the client tests (included with `mod client_fixture;`).
//!
//! It lives under `/var/lib/keyhaven-test/<random>`, has host keys of all three types, listens
//! on a free loopback port and is killed by PID when the fixture is dropped.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";
const BASE: &str = "/var/lib/keyhaven-test";

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

/// `None` (after a printed note) when sshd is not installed.
pub fn start() -> Option<Sshd> {
    start_with_ecdsa_bits(None)
}

/// Like [`start`], with an ECDSA host key of `bits` (256, 384 or 521) instead of the default.
pub fn start_with_ecdsa_bits(ecdsa_bits: Option<u32>) -> Option<Sshd> {
    if !Path::new(SSHD).exists() {
        eprintln!("NOTE: {SSHD} is missing; skipping this sshd test");
        return None;
    }
    if !Path::new(BASE).exists() {
        fs::create_dir_all(BASE).expect("create base dir");
        fs::set_permissions(BASE, fs::Permissions::from_mode(0o755)).unwrap();
    }
    if !Path::new("/run/sshd").exists() {
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dir = tempfile::Builder::new().prefix("client-").tempdir_in(BASE).expect("tempdir");
    let d = dir.path();
    for t in ["ed25519", "ecdsa", "rsa"] {
        let path = d.join(format!("ssh_host_{t}_key"));
        match (t, ecdsa_bits) {
            ("ecdsa", Some(bits)) => keygen_bits(t, bits, &path),
            _ => keygen(t, &path),
        }
    }
    fs::create_dir_all(d.join("authorized_keys")).unwrap();

    // A port that was free a moment ago can be taken meanwhile: retry with a new one.
    for _ in 0..5 {
        let port = free_port();
        let cfg = d.join("sshd_config");
        let text = format!(
            "Port {port}\nListenAddress 127.0.0.1\n\
             HostKey {d}/ssh_host_ed25519_key\nHostKey {d}/ssh_host_ecdsa_key\nHostKey {d}/ssh_host_rsa_key\n\
             PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys/%u\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n",
            d = d.display()
        );
        fs::write(&cfg, text).unwrap();
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-f")
            .arg(&cfg)
            .arg("-E")
            .arg(d.join("sshd.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sshd");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!(
                    "sshd exited early ({status}); log:\n{}",
                    fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
                );
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Sshd { dir, port, child });
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sshd did not accept connections within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("could not start sshd");
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // By PID: the child we started, nothing else.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `.pub` file of a host key type ("ed25519", "ecdsa", "rsa").
    pub fn host_pub(&self, t: &str) -> PathBuf {
        self.path(&format!("ssh_host_{t}_key.pub"))
    }

    /// (type, base64) of a host key.
    pub fn host_key(&self, t: &str) -> (String, String) {
        pub_fields(&self.host_pub(t))
    }

    /// Generate a client key `name` of type `t` and return its private key text.
    pub fn client_key(&self, t: &str, name: &str) -> String {
        let p = self.path(name);
        keygen(t, &p);
        fs::read_to_string(&p).unwrap()
    }

    /// Append `<name>.pub` to `authorized_keys/<user>` (mode 0644).
    pub fn authorize(&self, user: &str, name: &str) {
        let line = fs::read_to_string(self.path(&format!("{name}.pub"))).unwrap();
        let f = self.path("authorized_keys").join(user);
        let mut file = fs::OpenOptions::new().create(true).append(true).open(&f).unwrap();
        file.write_all(line.as_bytes()).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.path("sshd.log")).unwrap_or_default()
    }
}

pub fn keygen(t: &str, path: &Path) {
    keygen_args(t, &[], path)
}

pub fn keygen_bits(t: &str, bits: u32, path: &Path) {
    keygen_args(t, &["-b", &bits.to_string()], path)
}

fn keygen_args(t: &str, extra: &[&str], path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", t, "-N", ""])
        .args(extra)
        .arg("-f")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen -t {t} failed: {out:?}");
}

/// The first two fields of a `.pub` file.
pub fn pub_fields(path: &Path) -> (String, String) {
    let text = fs::read_to_string(path).unwrap();
    let mut it = text.split_whitespace();
    (it.next().unwrap().to_string(), it.next().unwrap().to_string())
}

/// `SHA256:…` from `ssh-keygen -l -f <pub>`.
pub fn keygen_fingerprint(path: &Path) -> String {
    let out = Command::new("ssh-keygen").arg("-l").arg("-f").arg(path).output().expect("run ssh-keygen -l");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().split_whitespace().nth(1).unwrap().to_string()
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
