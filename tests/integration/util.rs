//! Test harness: real `keyhaven serve` processes on random loopback ports, real
//! WebSocket clients, data dirs on a StrictModes-safe path, cleanup by PID.
//!
//! `KEYHAVEN_TEST_BACKEND=postgres` puts every daemon's state in PostgreSQL:
//! one throwaway cluster per test process (started on first use), one fresh
//! database per data dir. Tests about SQLite files say so with [`sqlite_only!`].

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyhaven")
}

/// Base for data dirs: root-owned, 0755, outside /tmp, so sshd's StrictModes
/// accepts files below it whatever folder the checkout lives in.
pub fn test_base() -> PathBuf {
    let base =
        if euid() == 0 { PathBuf::from("/var/lib/keyhaven-test") } else { std::env::temp_dir().join("keyhaven-test") };
    std::fs::create_dir_all(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    base
}

/// A fresh directory (not created: keyhaven creates its data dir itself).
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let mut r = [0u8; 6];
        getrandom(&mut r);
        let p = test_base().join(format!("{tag}-{}", hex(&r)));
        TestDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        drop_test_database(&self.0);
    }
}

pub fn getrandom(buf: &mut [u8]) {
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    f.read_exact(buf).unwrap();
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A running daemon, killed (by PID) on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: Arc<TestDir>,
    pub url: String,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
}

pub struct DaemonOpts {
    pub listen: String,
    /// Environment variables for the daemon; an empty value removes the variable.
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        DaemonOpts { listen: "127.0.0.1:0".into(), env: vec![], args: vec![] }
    }
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_in(Arc::new(TestDir::new("d")), DaemonOpts::default())
    }

    pub fn start_in(dir: Arc<TestDir>, opts: DaemonOpts) -> Daemon {
        Self::try_start_in(dir, opts).unwrap_or_else(|e| panic!("daemon did not start: {e}"))
    }

    pub fn try_start_in(dir: Arc<TestDir>, opts: DaemonOpts) -> Result<Daemon, String> {
        let mut cmd = Command::new(bin());
        cmd.arg("serve").arg("--data-dir").arg(dir.path()).arg("--listen").arg(&opts.listen);
        cmd.args(&opts.args);
        cmd.env("KEYHAVEN_ADMIN_PASSWORD", ADMIN_PASSWORD).env("KEYHAVEN_LOG", "info");
        // A test that names its own database (or removes the variable) keeps it.
        let harness_pg = on_postgres() && !opts.env.iter().any(|(k, _)| k == "KEYHAVEN_DATABASE");
        if harness_pg {
            cmd.env("KEYHAVEN_DATABASE", test_database(dir.path()));
        }
        for (k, v) in &opts.env {
            match v.as_str() {
                "" => cmd.env_remove(k),
                v => cmd.env(k, v),
            };
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn keyhaven");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = stderr.clone();
            let mut err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = out.read_line(&mut line).map(|_| line.clone());
            let _ = tx.send(r);
            // Keep draining stdout so the daemon never blocks on a full pipe.
            let mut sink = String::new();
            while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(l)) if l.starts_with("keyhaven listening on ") => l,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("no ready line ({other:?}); stderr:\n{}", stderr.lock().unwrap()));
            }
        };
        let url = line.trim().trim_start_matches("keyhaven listening on ").to_string();
        let hostport = url.split("://").nth(1).unwrap().to_string();
        let addr: SocketAddr = hostport.parse().unwrap();
        assert!(
            !harness_pg || !dir.path().join("keyhaven.db").exists(),
            "KEYHAVEN_TEST_BACKEND=postgres, yet the daemon made a SQLite database in {}",
            dir.path().display()
        );
        Ok(Daemon { child: Some(child), dir, url, addr, stderr })
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{}", self.url.replacen("http", "ws", 1), path)
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url("/api/current")).await
    }

    pub async fn admin(&self) -> Client {
        let mut c = self.client().await;
        c.login("admin", ADMIN_PASSWORD).await;
        c
    }

    /// SHA-256 fingerprint of the daemon's self-signed certificate, as
    /// `openssl x509 -noout -fingerprint -sha256` prints it (`AB:CD:…`).
    pub fn tls_fingerprint(&self) -> String {
        let o = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(self.dir.path().join("tls/cert.pem"))
            .output()
            .expect("run openssl");
        assert!(o.status.success(), "openssl: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .split_once('=')
            .map(|(_, f)| f.to_string())
            .expect("a fingerprint line")
    }

    /// `keyhaven call` through the local socket.
    pub fn call_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin()).arg("call").arg("--data-dir").arg(self.dir.path()).args(args).output().unwrap()
    }

    /// `keyhaven call` and parse the JSON it prints.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let o = self.call_cli(args);
        assert!(o.status.success(), "keyhaven call {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        signal(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A raw JSON-RPC 2.0 client.
pub struct Client {
    pub ws: Ws,
    next: u64,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Client { ws, next: 0 }
    }

    pub async fn connect_from(url: &str, addr: SocketAddr, source: std::net::IpAddr) -> Client {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(source, 0)).unwrap();
        let stream = sock.connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.unwrap();
        Client { ws, next: 0 }
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::Text(t.to_string().into())).await.unwrap();
    }

    /// Next text message, or None when the server closed the connection.
    pub async fn recv(&mut self) -> Option<Value> {
        self.recv_within(Duration::from_secs(30)).await
    }

    /// [`Client::recv`] with another patience than 30 s.
    pub async fn recv_within(&mut self, patience: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(patience, self.ws.next()).await.expect("a reply in time") {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Whether the server sends anything within `d`.
    pub async fn silent_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.ws.next()).await.is_err()
    }

    /// Full response object for a call.
    pub async fn raw(&mut self, method: &str, params: Value) -> Value {
        self.raw_within(method, params, Duration::from_secs(30)).await
    }

    /// [`Client::raw`] for a call that may take longer than 30 s.
    pub async fn raw_within(&mut self, method: &str, params: Value, patience: Duration) -> Value {
        self.next += 1;
        let id = self.next;
        self.send_text(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()).await;
        loop {
            let m = self.recv_within(patience).await.expect("connection closed before the reply");
            if m.get("id") == Some(&json!(id)) {
                return m;
            }
        }
    }

    /// Result of a call; panics on error.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let r = self.raw(method, params).await;
        if let Some(e) = r.get("error") {
            panic!("{method} failed: {e}");
        }
        r["result"].clone()
    }

    /// Error object of a call; panics on success.
    pub async fn err(&mut self, method: &str, params: Value) -> Value {
        let r = self.raw(method, params).await;
        match r.get("error") {
            Some(e) => e.clone(),
            None => panic!("{method} unexpectedly succeeded: {}", r["result"]),
        }
    }

    pub async fn login(&mut self, user: &str, pw: &str) {
        let r = self
            .call("auth.login_ex", json!([{"mechanism": "PASSWORD_PLAIN", "username": user, "password": pw}]))
            .await;
        assert_eq!(r["response_type"], "SUCCESS", "login as {user}: {r}");
    }
}

/// The `[attribute, message, errno]` triples of a -32602 error.
pub fn extra(e: &Value) -> Vec<(String, String)> {
    assert_eq!(e["code"], -32602, "expected a validation error, got {e}");
    e["data"]["extra"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x[0].as_str().unwrap_or("").to_string(), x[1].as_str().unwrap().to_string()))
        .collect()
}

/// Assert a validation error names `attr` (and its message contains `msg`).
pub fn assert_field(e: &Value, attr: &str, msg: &str) {
    let ex = extra(e);
    assert!(ex.iter().any(|(a, m)| a == attr && m.contains(msg)), "expected [{attr}] containing {msg:?}, got {ex:?}");
}

/// Assert a call error with errno name.
pub fn assert_call_error(e: &Value, errname: &str, msg: &str) {
    assert_eq!(e["code"], -32001, "expected a call error, got {e}");
    assert_eq!(e["data"]["errname"], errname, "{e}");
    assert!(e["data"]["reason"].as_str().unwrap().contains(msg), "expected {msg:?} in {e}");
}

/// Every file under `dir` (recursively), after checkpointing the SQLite WAL.
pub fn all_bytes_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The base32 seed of an `otpauth://` provisioning URI and a TOTP generator for it.
pub fn totp_from_uri(uri: &str) -> (String, totp_rs::Totp) {
    let secret = uri.split("secret=").nth(1).unwrap().split('&').next().unwrap().to_string();
    let totp = totp_rs::Builder::new()
        .with_secret(totp_rs::Secret::try_from_base32(&secret).unwrap())
        .with_digits(6)
        .with_step_duration(30)
        .with_skew(1)
        .build()
        .unwrap();
    (secret, totp)
}

// ---------------------------------------------------------------- plain HTTP

/// A minimal HTTP/1.1 response.
pub struct HttpResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let Some(i) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let size_text = String::from_utf8_lossy(&b[..i]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[i + 2 + size + 2..];
    }
}

/// One request over a fresh connection (`Connection: close`).
pub async fn http(d: &Daemon, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> HttpResp {
    http_from(d, None, method, path, headers, body).await
}

/// The same from a given local address (e.g. 127.0.0.2).
pub async fn http_from(
    d: &Daemon,
    source: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResp {
    http_on(d.addr, source, method, path, headers, body).await
}

/// One request to any address (e.g. a second listener of the daemon).
pub async fn http_on(
    addr: SocketAddr,
    source: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResp {
    let mut s = match source {
        None => TcpStream::connect(addr).await.unwrap(),
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(std::net::SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
            sock.connect(addr).await.unwrap()
        }
    };
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if method != "GET" || !body.is_empty() {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![];
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .expect("HTTP reply within 30 s")
        .unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("HTTP header end");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = buf[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = dechunk(&body);
    }
    HttpResp { status, headers, body }
}

// ---------------------------------------------------------------- process figures

/// Resident set size of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Bytes of the SQLite database with its journal.
pub fn db_bytes(dir: &Path) -> u64 {
    ["keyhaven.db", "keyhaven.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum()
}

// ---------------------------------------------------------------- OS accounts

/// An OS account name reserved for one test (`<prefix>-<hex>`); whatever
/// account of that name exists when the guard drops is removed with its home
/// (`userdel -r`), also when the test fails.
pub struct OsUserGuard {
    pub name: String,
}

impl OsUserGuard {
    pub fn new(prefix: &str) -> OsUserGuard {
        let mut r = [0u8; 4];
        getrandom(&mut r);
        OsUserGuard { name: format!("{prefix}-{}", hex(&r)) }
    }

    /// `useradd -m -s SHELL [-u UID] NAME`.
    pub fn useradd(&self, shell: &str, uid: Option<u32>) {
        let mut c = Command::new("useradd");
        c.args(["-m", "-s", shell]);
        if let Some(u) = uid {
            c.args(["-u", &u.to_string()]);
        }
        let o = c.arg(&self.name).output().expect("useradd (Debian package `passwd`)");
        assert!(o.status.success(), "useradd {}: {}", self.name, String::from_utf8_lossy(&o.stderr));
    }

    /// `userdel -r NAME` now (behind keyhaven's back).
    ///
    /// An `ssh` client returns as soon as its command's exit status arrives,
    /// while sshd's session child running as the user is still tearing down;
    /// under load it outlives the client long enough for `userdel` to refuse
    /// with "user ... is currently used by process". So first wait (bounded)
    /// for the account's processes to end, then SIGKILL any left by PID.
    pub fn userdel(&self) {
        let uid = self.uid();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = processes_of_uid(uid);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for pid in left {
                    signal(pid, libc::SIGKILL);
                }
                let gone = Instant::now() + Duration::from_secs(5);
                while !processes_of_uid(uid).is_empty() && Instant::now() < gone {
                    std::thread::sleep(Duration::from_millis(20));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = Command::new("userdel").args(["-r", &self.name]).output().unwrap();
        assert!(o.status.success(), "userdel {}: {}", self.name, String::from_utf8_lossy(&o.stderr));
    }

    pub fn uid(&self) -> u32 {
        let o = Command::new("id").args(["-u", &self.name]).output().unwrap();
        String::from_utf8(o.stdout).unwrap().trim().parse().unwrap()
    }
}

impl Drop for OsUserGuard {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-r", &self.name]).stderr(Stdio::null()).status();
    }
}

/// PIDs of the live processes whose real or effective uid is `uid` (from `/proc/PID/status`).
pub fn processes_of_uid(uid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let owned = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|ids| ids.split_whitespace().take(2).any(|id| id.parse::<u32>().ok() == Some(uid)));
        // Zombies count too: userdel refuses until their parent reaps them.
        if owned {
            pids.push(pid);
        }
    }
    pids
}

/// The effective uid of the test process.
pub fn euid() -> u32 {
    keyhaven_ssh::uid::effective()
}

/// kill(2) `sig` to a process this test started; the result of the call.
pub fn signal(pid: u32, sig: i32) -> i32 {
    let Ok(pid) = i32::try_from(pid) else { return -1 };
    if pid <= 0 {
        return -1;
    }
    // SAFETY: a positive PID (never a group or -1) of a process the test started.
    unsafe { libc::kill(pid, sig) }
}

/// Open the API's WebSocket with this `Origin` header (if any): `Err(status)` when refused.
pub async fn ws_with_origin(d: &Daemon, origin: Option<&str>) -> Result<(), u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = d.ws_url("/api/current").into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

// ---------------------------------------------------------------- backend

/// Whether this run keeps the daemons' state in PostgreSQL
/// (`KEYHAVEN_TEST_BACKEND=postgres`) instead of SQLite in the data dir.
pub fn on_postgres() -> bool {
    std::env::var("KEYHAVEN_TEST_BACKEND").is_ok_and(|v| v == "postgres")
}

/// Skip the test on the PostgreSQL run, saying why: for tests about SQLite
/// files (keyhaven.db, backups, snapshots, upgrade fixtures).
macro_rules! sqlite_only {
    ($why:expr) => {
        if $crate::util::on_postgres() {
            eprintln!("skipping on PostgreSQL ({}:{}): {}", file!(), line!(), $why);
            return;
        }
    };
}

/// The run's one cluster and the database of each data dir.
struct SharedPg {
    /// Taken (stopped and deleted) by [`stop_shared_pg`] at exit.
    pg: Mutex<Option<keyhaven_testpg::TestPg>>,
    databases: Mutex<HashMap<PathBuf, String>>,
    next: std::sync::atomic::AtomicU32,
    /// The write end of the watchdog's stdin: never written, closed only by
    /// the kernel when this process ends, however it ends.
    _watchdog: Mutex<Child>,
}

static SHARED_PG: OnceLock<SharedPg> = OnceLock::new();

/// The cluster, started on first use. A static is never dropped, so two
/// things stop it: an `atexit` handler stops it (by PID) and deletes its
/// directory when the test binary exits normally; a watchdog `sh`, in a
/// process group of its own, blocks reading a pipe only this process holds
/// and, when that pipe closes (the test binary ended in any way: exit, panic
/// abort, SIGKILL), kills the postmaster by PID and deletes the directory.
fn shared_pg() -> &'static SharedPg {
    SHARED_PG.get_or_init(|| {
        let pg = keyhaven_testpg::TestPg::start()
            .unwrap_or_else(|e| panic!("KEYHAVEN_TEST_BACKEND=postgres: no throwaway PostgreSQL: {e}"));
        let pid = pg.pid().expect("a running postmaster");
        use std::os::unix::process::CommandExt;
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                r#"read -r _; kill -QUIT "$1" 2>/dev/null; i=0
while kill -0 "$1" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
kill -KILL "$1" 2>/dev/null; rm -rf "$2""#,
            )
            .arg("keyhaven-testpg-watchdog")
            .arg(pid.to_string())
            .arg(pg.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the PostgreSQL watchdog (sh)");
        // SAFETY: registers a plain `extern "C"` function without arguments.
        let registered = unsafe { libc::atexit(stop_shared_pg) };
        assert_eq!(registered, 0, "atexit");
        SharedPg {
            pg: Mutex::new(Some(pg)),
            databases: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU32::new(0),
            _watchdog: Mutex::new(watchdog),
        }
    })
}

extern "C" fn stop_shared_pg() {
    if let Some(shared) = SHARED_PG.get() {
        // TestPg's drop stops the postmaster by PID and removes its directory.
        let taken = shared.pg.lock().map(|mut g| g.take()).unwrap_or(None);
        drop(taken);
    }
}

fn with_pg<T>(f: impl FnOnce(&keyhaven_testpg::TestPg) -> T) -> T {
    let guard = shared_pg().pg.lock().unwrap();
    f(guard.as_ref().expect("the shared PostgreSQL is still running"))
}

/// The URL of `dir`'s database on the shared cluster, created on first use:
/// a restart of the same data dir finds its state again.
pub fn test_database(dir: &Path) -> String {
    let shared = shared_pg();
    let mut dbs = shared.databases.lock().unwrap();
    let name = match dbs.get(dir) {
        Some(n) => n.clone(),
        None => {
            let n = format!("kh{}", shared.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            with_pg(|pg| pg.create_database(&n)).unwrap_or_else(|e| panic!("CREATE DATABASE {n}: {e}"));
            dbs.insert(dir.to_path_buf(), n.clone());
            n
        }
    };
    with_pg(|pg| pg.url(&name))
}

/// A data dir was renamed: its database goes with it.
pub fn test_database_moved(from: &Path, to: &Path) {
    if !on_postgres() {
        return;
    }
    let mut dbs = shared_pg().databases.lock().unwrap();
    if let Some(n) = dbs.remove(from) {
        dbs.insert(to.to_path_buf(), n);
    }
}

/// Dropped with its data dir, so a long run does not fill the disk.
fn drop_test_database(dir: &Path) {
    let Some(shared) = SHARED_PG.get() else { return };
    let Some(name) = shared.databases.lock().unwrap().remove(dir) else { return };
    let guard = shared.pg.lock().unwrap();
    if let Some(pg) = guard.as_ref() {
        let _ = pg.psql("postgres", &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
    }
}

/// What a daemon has stored: every file under its data dir and, on the
/// PostgreSQL run, a plain `pg_dump` of its database (named `<dir>/pg_dump.sql`,
/// bytea columns hex-encoded in it: see [`hex`]).
pub fn stored_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = all_bytes_under(dir);
    if on_postgres() {
        let url = test_database(dir);
        // Beside the real initdb (PATH may hold a symlink to it alone).
        let pg_dump = keyhaven_testpg::PgBin::find()
            .and_then(|b| std::fs::canonicalize(b.initdb).ok())
            .and_then(|initdb| initdb.parent().map(|d| d.join("pg_dump")))
            .filter(|p| p.is_file())
            .expect("pg_dump beside initdb");
        let o = Command::new(pg_dump).args(["--data-only", "--no-owner"]).arg(&url).output().expect("run pg_dump");
        assert!(o.status.success(), "pg_dump: {}", String::from_utf8_lossy(&o.stderr));
        out.push((dir.join("pg_dump.sql"), o.stdout));
    }
    out
}

/// Whether `path` (from [`stored_bytes`]) is the database itself.
pub fn is_database(path: &Path) -> bool {
    path.ends_with("keyhaven.db") || path.ends_with("pg_dump.sql")
}
