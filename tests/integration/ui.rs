//! The web UI (issue 6) in headless Chromium driven by chromedriver, and in
//! headless Firefox ESR driven by geckodriver: a real daemon, a real browser,
//! the same JSON-RPC API. Screenshots of each screen go to
//! `target/ui-screenshots/<name>.png` (`firefox-<step>.png` for Firefox).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thirtyfour::prelude::*;
use thirtyfour::ChromiumLikeCapabilities;

use crate::sshd::{free_port, known_hosts, ssh_key_login, sshd_available};
use crate::util::*;

/// chromedriver as a child process, killed by PID on drop.
pub(crate) struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        let exe = which("chromedriver").unwrap_or_else(|| {
            panic!(
                "chromedriver is not installed: the UI tests need Debian's `chromium` and `chromium-driver` \
                 (run scripts/install-test-deps.sh, or apt-get install -y chromium chromium-driver)"
            )
        });
        let port = free_port();
        let child = Command::new(exe)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        ChromeDriver { child, port }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        crate::util::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(cmd)).find(|p| p.is_file())
}

fn screenshot_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("ui-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub(crate) async fn shot(driver: &WebDriver, name: &str) {
    let path = screenshot_dir().join(format!("{name}.png"));
    driver.screenshot(&path).await.unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
}

/// Evaluate `body` (a JS function body) until it returns something truthy; returns it.
pub(crate) async fn wait_js(driver: &WebDriver, what: &str, body: &str, args: Vec<Value>) -> Value {
    wait_js_within(driver, what, body, args, Duration::from_secs(20)).await
}

/// [`wait_js`] with a longer (or shorter) deadline, for slow server-side work.
async fn wait_js_within(driver: &WebDriver, what: &str, body: &str, args: Vec<Value>, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = driver.execute(body, args.clone()).await.unwrap().json().clone();
        let truthy = !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let page = driver
                .execute("return document.body.innerText", vec![])
                .await
                .map(|r| r.json().to_string())
                .unwrap_or_default();
            shot(driver, &format!("timeout-{}", what.replace(' ', "-"))).await;
            panic!("timed out waiting for {what}; page text: {page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn js(driver: &WebDriver, body: &str, args: Vec<Value>) -> Value {
    driver.execute(body, args).await.unwrap_or_else(|e| panic!("script failed: {e}\n{body}")).json().clone()
}

/// Set a form control's value by id or selector (fires input/change like typing would).
pub(crate) async fn fill(driver: &WebDriver, selector: &str, value: &str) {
    let ok = js(
        driver,
        "const el = document.querySelector(arguments[0]); if (!el) return false;
         el.value = arguments[1]; el.dispatchEvent(new Event('input', {bubbles: true}));
         el.dispatchEvent(new Event('change', {bubbles: true})); return true;",
        vec![json!(selector), json!(value)],
    )
    .await;
    assert_eq!(ok, json!(true), "no element {selector}");
}

pub(crate) async fn click(driver: &WebDriver, css: &str) {
    driver.find(By::Css(css)).await.unwrap_or_else(|e| panic!("no element {css}: {e}")).click().await.unwrap();
}

/// The modal form's control for a field name.
pub(crate) fn field(name: &str) -> String {
    format!("#modal [name='{name}']")
}

pub(crate) async fn modal_closed(driver: &WebDriver, what: &str) {
    wait_js(
        driver,
        what,
        "return !document.getElementById('modal').open && !document.getElementById('busy').open;",
        vec![],
    )
    .await;
}

/// Wait until Chromium has finished saving `name` into `dir` (it writes
/// `<name>.crdownload` and renames it when complete); returns the path.
async fn downloaded(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let partial = std::fs::read_dir(dir)
            .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".crdownload")))
            .unwrap_or(false);
        if !partial && std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false) {
            return p;
        }
        if Instant::now() > deadline {
            let names: Vec<String> = std::fs::read_dir(dir)
                .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            panic!("download {name} did not appear in {}; it holds {names:?}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `type base64` part of an OpenSSH public key line (the comment dropped).
fn key_body(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// chromedriver plus a headless Chromium at 1280×800 that saves downloads into `downloads`.
pub(crate) async fn start_chromium(downloads: &Path) -> (ChromeDriver, WebDriver) {
    let cd = ChromeDriver::start();
    let mut caps = DesiredCapabilities::chrome();
    if std::path::Path::new("/usr/bin/chromium").exists() {
        caps.set_binary("/usr/bin/chromium").unwrap();
    }
    for a in [
        "--headless",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,800",
    ] {
        caps.add_arg(a).unwrap();
    }
    caps.add_experimental_option(
        "prefs",
        json!({
            "download.default_directory": downloads,
            "download.prompt_for_download": false,
            "download.directory_upgrade": true,
            "safebrowsing.enabled": false,
        }),
    )
    .unwrap();
    let driver = WebDriver::new(format!("http://127.0.0.1:{}", cd.port), caps).await.expect("start headless chromium");
    // Headless Chromium may ignore the download prefs; the CDP command is authoritative.
    driver
        .cdp()
        .send_raw(
            "Browser.setDownloadBehavior",
            json!({"behavior": "allow", "downloadPath": downloads, "eventsEnabled": false}),
        )
        .await
        .expect("Browser.setDownloadBehavior");
    (cd, driver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_in_headless_chromium() {
    let started = Instant::now();
    let d = Daemon::start();
    // Chromium saves the UI's downloads here (no prompt).
    let downloads = TestDir::new("ui-downloads");
    std::fs::create_dir_all(downloads.path()).unwrap();
    let (cd, driver) = start_chromium(downloads.path()).await;
    let result = std::panic::AssertUnwindSafe(run(&driver, &d, downloads.path()));
    let outcome = futures_util::FutureExt::catch_unwind(result).await;
    let _ = driver.quit().await;
    drop(cd);
    if let Err(p) = outcome {
        eprintln!("daemon stderr:\n{}", d.stderr());
        std::panic::resume_unwind(p);
    }
    eprintln!("UI test took {:?}", started.elapsed());
}

/// The UI session is a token session: activity keeps it alive, and idle for
/// the account's session timeout (set in Preferences) it ends on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_session_ends_on_token_expiry() {
    let d = Daemon::start();
    let downloads = TestDir::new("ui-session");
    std::fs::create_dir_all(downloads.path()).unwrap();
    let (cd, driver) = start_chromium(downloads.path()).await;
    let outcome =
        futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run_session_expiry(&driver, &d))).await;
    let _ = driver.quit().await;
    drop(cd);
    if let Err(p) = outcome {
        eprintln!("daemon stderr:\n{}", d.stderr());
        std::panic::resume_unwind(p);
    }
}

/// Log in on the page as admin and wait for the first screen.
pub(crate) async fn ui_login(driver: &WebDriver, d: &Daemon) {
    driver.goto(format!("{}/", d.url)).await.unwrap();
    wait_js(driver, "login form", "return !document.getElementById('login').hidden;", vec![]).await;
    fill(driver, "#login-username", "admin").await;
    fill(driver, "#login-password", ADMIN_PASSWORD).await;
    click(driver, "#login-submit").await;
    wait_js(driver, "backup credentials page", "return document.querySelector('#view-backup h1');", vec![]).await;
}

/// Semi-automatic pairing with a remote keyhaven over HTTPS with a self-signed
/// certificate, logging in with a pairing token: the certificate question, the
/// retry without verification, the decision remembered for the address; and
/// the page's own pairing-token dialog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_pairs_over_https_with_a_token() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let d = Daemon::start();
    let tls = DaemonOpts { env: vec![("KEYHAVEN_TLS".into(), "true".into())], ..DaemonOpts::default() };
    let b = Daemon::start_in(Arc::new(TestDir::new("ui-tls-b")), tls);
    assert!(b.url.starts_with("https://"), "{}", b.url);
    let b_ssh = free_port();
    let o = b.call_cli(&["ssh.update", &json!({"tcpport": b_ssh}).to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let downloads = TestDir::new("ui-tls");
    std::fs::create_dir_all(downloads.path()).unwrap();
    let (cd, driver) = start_chromium(downloads.path()).await;
    let outcome =
        futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run_https_token_pairing(&driver, &d, &b)))
            .await;
    let _ = driver.quit().await;
    drop(cd);
    if let Err(p) = outcome {
        eprintln!("daemon stderr:\n{}\nremote stderr:\n{}", d.stderr(), b.stderr());
        std::panic::resume_unwind(p);
    }
}

async fn run_https_token_pairing(driver: &WebDriver, d: &Daemon, b: &Daemon) {
    ui_login(driver, d).await;

    // This page's own pairing token: shown once, logs in once.
    click(driver, "#pairing-token").await;
    let token = wait_js(
        driver,
        "pairing token",
        "const i = document.querySelector('#modal[open] input.mono'); return i && i.value;",
        vec![],
    )
    .await;
    shot(driver, "40-pairing-token").await;
    click(driver, "#modal .modal-foot button").await;
    modal_closed(driver, "token dialog closed").await;
    let mut c = d.client().await;
    assert_eq!(c.call("auth.login_with_token", json!([token.clone()])).await, true, "the shown token logs in");
    let mut c = d.client().await;
    assert_eq!(c.call("auth.login_with_token", json!([token])).await, false, "the pairing token is single-use");

    // B serves TLS with a self-signed certificate: its tokens come over its local socket.
    let pair = |name: &'static str| async move {
        click(driver, "#add-connection").await;
        wait_js(driver, "connection form", "return document.querySelector(\"#modal[open] [name='url']\");", vec![])
            .await;
        fill(driver, &field("name"), name).await;
        fill(driver, &field("setup_method"), "SEMI-AUTOMATIC").await;
        fill(driver, &field("url"), &b.url).await;
        fill(driver, &field("auth_method"), "TOKEN").await;
    };
    // First pairing: the certificate is not trusted; the page asks, and retries without checking.
    let t1 = b.cli_json(&["auth.generate_token", "600", "{}", "false"]);
    pair("tls-1").await;
    let hidden = js(
        driver,
        "return ['admin_username', 'password', 'otp_token', 'trusted_cert'].every((n) => document.querySelector(`#modal [name='${n}']`).closest('.field').hidden);",
        vec![],
    )
    .await;
    assert_eq!(hidden, json!(true), "password fields (or a remembered certificate) shown for token login");
    fill(driver, &field("token"), t1.as_str().unwrap()).await;
    fill(driver, &field("private_key"), "NEW").await;
    click(driver, "#form-submit").await;
    let question = wait_js_within(
        driver,
        "certificate question",
        "const t = document.querySelector('#modal[open] .modal-title'); return t && t.textContent === 'Certificate not trusted' && document.querySelector('#modal .modal-body').textContent;",
        vec![],
        Duration::from_secs(60),
    )
    .await;
    assert!(question.as_str().unwrap().contains("Compare it with the remote"), "{question}");
    // The fingerprint shown is B's certificate's, as openssl prints it.
    let b_fp = b.tls_fingerprint();
    let shown = js(driver, "return document.getElementById('cert-fingerprint').textContent;", vec![]).await;
    assert_eq!(shown, json!(b_fp));
    shot(driver, "41-certificate-question").await;
    click(driver, "#confirm-ok").await;
    wait_js_within(
        driver,
        "paired over https",
        "return !document.getElementById('modal').open && !document.getElementById('busy').open && document.querySelector(\"tr[data-name='tls-1']\");",
        vec![],
        Duration::from_secs(90),
    )
    .await;
    let mut ca = d.admin().await;
    let me = ca.call("auth.me", json!([])).await;
    let origin = b.url.trim_end_matches('/').to_string();
    assert_eq!(me["attributes"]["keyhaven_tls_pins"], json!({origin: b_fp}), "certificate remembered");
    assert!(me["attributes"]["keyhaven_pairing_urls"]
        .as_object()
        .is_some_and(|u| u.values().any(|v| *v == json!(b.url))));

    // Second pairing with the same address: no question, the remembered decision is shown and used.
    let t2 = b.cli_json(&["auth.generate_token", "600", "{}", "false"]);
    pair("tls-2").await;
    let trusted = js(
        driver,
        "const i = document.querySelector(\"#modal [name='trusted_cert']\"); return !i.closest('.field').hidden && i.checked;",
        vec![],
    )
    .await;
    assert_eq!(trusted, json!(true), "remembered certificate not offered");
    fill(driver, &field("token"), t2.as_str().unwrap()).await;
    fill(driver, &field("private_key"), "NEW").await;
    shot(driver, "42-remembered-certificate").await;
    click(driver, "#form-submit").await;
    wait_js_within(
        driver,
        "second pairing",
        "return !document.getElementById('modal').open && !document.getElementById('busy').open && document.querySelector(\"tr[data-name='tls-2']\");",
        vec![],
        Duration::from_secs(90),
    )
    .await;
    for name in ["tls-1", "tls-2"] {
        let conn = ca.call("keychaincredential.query", json!([[["name", "=", name]], {"get": true}])).await;
        let r = ca.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
        assert_eq!(r["ok"], true, "{name}: {r}");
    }
    // Re-pair tls-1 with a new key pair: the address and the certificate decision are
    // remembered, the old key leaves B, and the page offers to delete the old key pair.
    let before = ca.call("keychaincredential.query", json!([[["name", "=", "tls-1"]], {"get": true}])).await;
    let old_key = before["attributes"]["private_key"].clone();
    let t3 = b.cli_json(&["auth.generate_token", "600", "{}", "false"]);
    click(driver, "button[aria-label='Re-pair tls-1']").await;
    wait_js(driver, "re-pair form", "return document.querySelector(\"#modal[open] [name='rotate']\");", vec![]).await;
    let prefilled = js(
        driver,
        "const q = (n) => document.querySelector(`#modal [name='${n}']`); return [q('url').value, q('trusted_cert').checked, q('rotate').checked, q('remove_old_key').checked, q('new_key_name').value];",
        vec![],
    )
    .await;
    assert_eq!(prefilled, json!([b.url, true, true, true, "tls-1 Key 2"]), "re-pair form defaults");
    fill(driver, &field("auth_method"), "TOKEN").await;
    fill(driver, &field("token"), t3.as_str().unwrap()).await;
    fill(driver, &field("new_key_type"), "RSA").await;
    shot(driver, "43-re-pair-form").await;
    click(driver, "#form-submit").await;
    let q = wait_js_within(
        driver,
        "offer to delete the old key pair",
        "const t = document.querySelector('#modal[open] .modal-title'); return t && t.textContent === 'Delete the old key pair?' && t.textContent;",
        vec![],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(q, json!("Delete the old key pair?"));
    click(driver, "#confirm-ok").await;
    modal_closed(driver, "old key pair deleted").await;
    wait_js(driver, "new key pair row", "return document.querySelector(\"tr[data-name='tls-1 Key 2']\");", vec![])
        .await;
    let after = ca.call("keychaincredential.query", json!([[["name", "=", "tls-1"]], {"get": true}])).await;
    let new_key = ca.call("keychaincredential.get_instance", json!([after["attributes"]["private_key"]])).await;
    assert_eq!(new_key["name"], "tls-1 Key 2");
    assert!(new_key["attributes"]["public_key"].as_str().unwrap().starts_with("ssh-rsa "), "{new_key}");
    assert_eq!(
        ca.call("keychaincredential.query", json!([[["id", "=", old_key]], {"count": true}])).await,
        0,
        "old key pair not deleted"
    );
    assert_eq!(ca.call("keychaincredential.test_ssh_connection", json!([after["id"]])).await["ok"], true);

    // Manual key rotation of tls-2: generate, install the public key on B by hand
    // (here through B's API), test it, switch; the old key pair is kept on request.
    let before = ca.call("keychaincredential.query", json!([[["name", "=", "tls-2"]], {"get": true}])).await;
    click(driver, "button[aria-label='Rotate the key of tls-2']").await;
    wait_js(driver, "rotate form", "return document.querySelector(\"#modal[open] [name='new_key_name']\");", vec![])
        .await;
    click(driver, "#form-submit").await;
    let public = wait_js(
        driver,
        "new public key",
        "const t = document.querySelector('#modal[open] textarea.mono'); return document.getElementById('rotate-test') && t && t.value;",
        vec![],
    )
    .await;
    let public = public.as_str().unwrap().to_string();
    let switch_disabled = js(driver, "return document.getElementById('rotate-switch').disabled;", vec![]).await;
    assert_eq!(switch_disabled, json!(true), "switch offered before a test");
    let root = b.cli_json(&["user.query", r#"[["username", "=", "root"]]"#, r#"{"get": true}"#]);
    let keys = format!("{}{public}\n", root["sshpubkey"].as_str().unwrap_or(""));
    let o = b.call_cli(&["user.update", &root["id"].to_string(), &json!({"sshpubkey": keys}).to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    click(driver, "#rotate-test").await;
    let r = wait_js_within(
        driver,
        "rotate test result",
        "const r = document.querySelector('#rotate-test-result .badge'); return r && r.textContent;",
        vec![],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(r, json!("OK"), "the installed key did not log in");
    shot(driver, "44-rotate-key").await;
    click(driver, "#rotate-switch").await;
    wait_js(
        driver,
        "old key pair question",
        "const t = document.querySelector('#modal[open] .modal-title'); return t && t.textContent === 'Delete the old key pair?';",
        vec![],
    )
    .await;
    click(driver, "#modal .modal-foot button.secondary").await;
    modal_closed(driver, "old key pair kept").await;
    let after = ca.call("keychaincredential.query", json!([[["name", "=", "tls-2"]], {"get": true}])).await;
    assert_ne!(after["attributes"]["private_key"], before["attributes"]["private_key"]);
    let new_kp = ca.call("keychaincredential.get_instance", json!([after["attributes"]["private_key"]])).await;
    assert_eq!(new_kp["name"], "tls-2 Key 2");
    assert_eq!(ca.call("keychaincredential.test_ssh_connection", json!([after["id"]])).await["ok"], true);
    let kept = ca
        .call("keychaincredential.query", json!([[["id", "=", before["attributes"]["private_key"]]], {"count": true}]))
        .await;
    assert_eq!(kept, 1, "the old key pair was deleted although Cancel was chosen");

    // A wrong token is refused with the remote's reason, on the form.
    pair("tls-3").await;
    fill(driver, &field("token"), "not-a-token").await;
    fill(driver, &field("private_key"), "NEW").await;
    click(driver, "#form-submit").await;
    let err = wait_js_within(
        driver,
        "token refused",
        "const e = document.getElementById('modal-error'); return document.getElementById('modal').open && e && e.textContent;",
        vec![],
        Duration::from_secs(60),
    )
    .await;
    assert!(err.as_str().unwrap().contains("Invalid token"), "{err}");
    click(driver, "#modal .modal-foot button").await;
    modal_closed(driver, "form cancelled").await;
    let n = ca.call("keychaincredential.query", json!([[["name", "^", "tls-3"]], {"count": true}])).await;
    assert_eq!(n, 0, "a refused pairing left a credential behind");
}

async fn run_session_expiry(driver: &WebDriver, d: &Daemon) {
    let logged_in = "return !document.getElementById('topbar').hidden && document.getElementById('login').hidden;";
    driver.goto(format!("{}/", d.url)).await.unwrap();
    wait_js(driver, "login form", "return !document.getElementById('login').hidden;", vec![]).await;
    fill(driver, "#login-username", "admin").await;
    fill(driver, "#login-password", ADMIN_PASSWORD).await;
    click(driver, "#login-submit").await;
    wait_js(driver, "backup credentials page", "return document.querySelector('#view-backup h1');", vec![]).await;
    // The page's connection is a token session now (a password login, then a token login).
    let mut api = d.admin().await;
    let logins = api
        .call(
            "audit.query",
            json!([[["event", "=", "AUTHENTICATION"], ["success", "=", true]], {"select": ["event_data"]}]),
        )
        .await;
    assert!(logins.to_string().contains("TOKEN_PLAIN"), "the UI did not switch to a token session: {logins}");

    // Preferences: an out-of-range timeout is refused on its field, a valid one is kept on the account.
    click(driver, "#preferences").await;
    wait_js(driver, "preferences form", "return document.querySelector(\"#modal[open] [name='lifetime']\");", vec![])
        .await;
    let shown = js(driver, "return document.querySelector(\"#modal [name='lifetime']\").value;", vec![]).await;
    assert_eq!(shown, json!("300"), "default session timeout");
    fill(driver, &field("lifetime"), "5").await;
    click(driver, "#form-submit").await;
    let err = wait_js(
        driver,
        "lifetime error",
        "return document.querySelector(\"#modal [data-error-for='lifetime']\").textContent;",
        vec![],
    )
    .await;
    assert!(err.as_str().unwrap().contains("from 10 to 86400"), "{err}");
    assert_eq!(api.call("auth.me", json!([])).await["attributes"], json!({}), "a refused value was stored");
    fill(driver, &field("lifetime"), "10").await;
    shot(driver, "30-preferences").await;
    click(driver, "#form-submit").await;
    modal_closed(driver, "preferences saved").await;
    assert_eq!(api.call("auth.me", json!([])).await["attributes"]["preferences"]["lifetime"], 10);

    // Activity for longer than the timeout keeps the session: key presses
    // (no page calls of their own) and page visits.
    let busy_until = Instant::now() + Duration::from_secs(16);
    let mut n = 0;
    while Instant::now() < busy_until {
        if n % 3 == 2 {
            open_page(
                driver,
                if n % 2 == 0 { "users" } else { "audit" },
                if n % 2 == 0 { "Credentials › Users" } else { "Audit log" },
            )
            .await;
        } else {
            driver.action_chain().send_keys(Key::Shift).perform().await.unwrap();
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(2000)).await;
    }
    assert_eq!(js(driver, logged_in, vec![]).await, json!(true), "an active session ended");
    open_page(driver, "backup", "Credentials › Backup Credentials").await;

    // Idle: a warning first, then the login page with the reason.
    let warning = wait_js(
        driver,
        "session warning",
        "const w = document.getElementById('session-warning'); return !w.hidden && w.textContent;",
        vec![],
    )
    .await;
    assert!(warning.as_str().unwrap().contains("Press a key or move the mouse to stay logged in"), "{warning}");
    shot(driver, "31-session-warning").await;
    // A key press answers the warning and keeps the session.
    driver.action_chain().send_keys(Key::Shift).perform().await.unwrap();
    wait_js(
        driver,
        "warning dismissed by activity",
        "return document.getElementById('session-warning').hidden;",
        vec![],
    )
    .await;
    assert_eq!(js(driver, logged_in, vec![]).await, json!(true), "the session ended despite the key press");
    let msg = wait_js(
        driver,
        "login after expiry",
        "return !document.getElementById('login').hidden && document.getElementById('topbar').hidden && document.getElementById('login-error').textContent;",
        vec![],
    )
    .await;
    assert_eq!(msg, json!("Your session expired after 10 seconds without activity. Log in again."));
    shot(driver, "32-session-expired").await;
    // The server ended it (and says so in the audit log); the page shows nothing of the old session.
    let expired = api
        .call("audit.query", json!([[["event_data.description", "=", "Session expired"]], {"select": ["username"]}]))
        .await;
    assert_eq!(expired, json!([{"username": "admin"}]), "server-side expiry");
    assert_eq!(js(driver, "return document.getElementById('view').children.length;", vec![]).await, json!(0));

    // Logging in again works and uses the stored timeout.
    fill(driver, "#login-password", ADMIN_PASSWORD).await;
    click(driver, "#login-submit").await;
    wait_js(driver, "logged in again", logged_in, vec![]).await;
}

async fn run(driver: &WebDriver, d: &Daemon, downloads: &Path) {
    // The page and its security headers.
    driver.goto(format!("{}/", d.url)).await.unwrap();
    wait_js(driver, "login form", "return !document.getElementById('login').hidden;", vec![]).await;
    shot(driver, "01-login").await;

    // Wrong password: the refusal is shown.
    fill(driver, "#login-username", "admin").await;
    fill(driver, "#login-password", "wrong").await;
    click(driver, "#login-submit").await;
    wait_js(driver, "login error", "return document.getElementById('login-error').textContent;", vec![]).await;

    // Log in.
    fill(driver, "#login-password", ADMIN_PASSWORD).await;
    click(driver, "#login-submit").await;
    wait_js(driver, "backup credentials page", "return document.querySelector('#view-backup h1');", vec![]).await;

    // Generate an Ed25519 key pair through the form.
    click(driver, "#add-keypair").await;
    fill(driver, &field("name"), "ui-key").await;
    fill(driver, &field("key_type"), "ED25519").await;
    shot(driver, "02-keypair-form").await;
    click(driver, "#form-submit").await;
    modal_closed(driver, "keypair saved").await;
    let fp = wait_js(
        driver,
        "fingerprint in table",
        "const r = document.querySelector(\"tr[data-name='ui-key']\"); return r && r.textContent.includes('SHA256:') ? r.textContent : null;",
        vec![],
    )
    .await;
    let keys = d.cli_json(&["keychaincredential.query", r#"[["name", "=", "ui-key"]]"#]);
    let kp = &keys[0];
    let fingerprint = kp["fingerprint"].as_str().unwrap();
    assert!(fp.as_str().unwrap().contains(fingerprint), "table row {fp} lacks {fingerprint}");
    assert!(fp.as_str().unwrap().contains("ED25519"), "{fp}");
    let private = kp["attributes"]["private_key"].as_str().unwrap().to_string();
    let public = kp["attributes"]["public_key"].as_str().unwrap().trim().to_string();
    // The private key never reaches the page's DOM.
    let body = js(driver, "return document.documentElement.outerHTML;", vec![]).await;
    assert!(!body.as_str().unwrap().contains("PRIVATE KEY"), "private key rendered in the page");
    shot(driver, "03-backup-credentials").await;

    // Download both halves through the UI: the files get the server's
    // Content-Disposition names and the API's contents.
    click(driver, "button[aria-label='Download public key of ui-key']").await;
    let pub_path = downloaded(downloads, "ui-key_id_ed25519.pub").await;
    let pub_file = std::fs::read_to_string(&pub_path).unwrap();
    assert_eq!(pub_file.trim(), public, "downloaded public key");
    click(driver, "button[aria-label='Download private key of ui-key']").await;
    wait_js(
        driver,
        "private key download dialog",
        "return document.querySelector(\"#modal[open] [name='passphrase']\");",
        vec![],
    )
    .await;
    shot(driver, "03a-download-private-key").await;
    click(driver, "#form-submit").await;
    modal_closed(driver, "private key downloaded").await;
    let priv_path = downloaded(downloads, "ui-key_id_ed25519").await;
    let priv_file = std::fs::read_to_string(&priv_path).unwrap();
    assert!(priv_file.contains("-----BEGIN OPENSSH PRIVATE KEY-----"), "downloaded private key: {priv_file}");
    assert_eq!(priv_file.trim(), private.trim(), "downloaded private key differs from the stored one");
    std::fs::set_permissions(&priv_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = Command::new("ssh-keygen").arg("-y").arg("-f").arg(&priv_path).stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "ssh-keygen -y: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        key_body(&String::from_utf8_lossy(&o.stdout)),
        key_body(&public),
        "ssh-keygen -y vs the API's public key"
    );
    let body = js(driver, "return document.documentElement.outerHTML;", vec![]).await;
    assert!(!body.as_str().unwrap().contains("PRIVATE KEY"), "private key rendered in the page after the download");

    // Users: a pasted private key is refused inline with the server's message.
    click(driver, "a[data-nav='users']").await;
    wait_js(driver, "users page", "return document.querySelector(\"#view-users tr[data-name='admin']\");", vec![])
        .await;
    shot(driver, "04-users").await;
    click(driver, "button[aria-label='Edit admin']").await;
    fill(driver, &field("sshpubkey"), &private).await;
    click(driver, "#form-submit").await;
    let err = wait_js(
        driver,
        "inline sshpubkey error",
        "const e = document.querySelector(\"#modal [data-error-for='sshpubkey']\"); return e && e.textContent;",
        vec![],
    )
    .await;
    assert!(err.as_str().unwrap().contains("private key"), "inline error: {err}");
    shot(driver, "05-user-private-key-refused").await;

    // admin is an API account without an OS account here: the page marks it,
    // and a public key is refused inline (sshd could never use it), not saved.
    let mark = js(driver, "return document.querySelector('#os-account-problem')?.textContent;", vec![]).await;
    assert!(mark.as_str().unwrap_or("").contains("API account without an OS account"), "{mark}");
    fill(driver, &field("sshpubkey"), &public).await;
    click(driver, "#form-submit").await;
    let err = wait_js(
        driver,
        "inline no-OS-account error",
        "const e = document.querySelector(\"#modal [data-error-for='sshpubkey']\"); return e && e.textContent.includes('without an OS account') && e.textContent;",
        vec![],
    )
    .await;
    assert!(err.as_str().unwrap().contains("useradd admin"), "{err}");
    click(driver, "#modal .modal-foot button.secondary").await;
    modal_closed(driver, "user dialog closed").await;
    let admin = d.cli_json(&["user.query", r#"[["username", "=", "admin"]]"#, r#"{"get": true}"#]);
    assert!(admin["sshpubkey"].is_null(), "{admin}");
    assert_eq!(admin["os_account"]["state"], "NONE");

    // System › Services › SSH: set a free port, start the service.
    click(driver, "a[data-nav='ssh']").await;
    wait_js(driver, "ssh page", "return document.getElementById('ssh-save');", vec![]).await;
    shot(driver, "06-ssh-service").await;
    if sshd_available() {
        let port = free_port();
        fill(driver, "#view-ssh [name='tcpport']", &port.to_string()).await;
        click(driver, "#ssh-save").await;
        wait_js(
            driver,
            "port saved",
            "return document.querySelector(\"#view-ssh [name='tcpport']\")?.value === arguments[0] && !document.getElementById('busy').open;",
            vec![json!(port.to_string())],
        )
        .await;
        click(driver, "#svc-start").await;
        wait_js(
            driver,
            "sshd running",
            "return document.getElementById('svc-state')?.textContent === 'RUNNING';",
            vec![],
        )
        .await;
        shot(driver, "07-ssh-running").await;

        // Root's Authorized Keys: upload the downloaded public key in the Users form.
        click(driver, "a[data-nav='users']").await;
        wait_js(
            driver,
            "root in users",
            "return document.querySelector(\"#view-users tr[data-name='root']\");",
            vec![],
        )
        .await;
        click(driver, "button[aria-label='Edit root']").await;
        let upload = driver
            .find(By::Css("#modal input[type='file']"))
            .await
            .unwrap_or_else(|e| panic!("no upload control in the user form: {e}"));
        upload.send_keys(pub_path.to_str().unwrap()).await.unwrap();
        wait_js(
            driver,
            "uploaded key in the form",
            "return document.querySelector(arguments[0]).value.trim() === arguments[1];",
            vec![json!(field("sshpubkey")), json!(pub_file.trim())],
        )
        .await;
        shot(driver, "07a-root-authorized-keys").await;
        click(driver, "#form-submit").await;
        modal_closed(driver, "root saved").await;
        let root = d.cli_json(&["user.query", r#"[["username", "=", "root"]]"#, r#"{"get": true}"#]);
        assert_eq!(root["sshpubkey"].as_str().unwrap().trim(), public, "{root}");

        // Plain ssh with the downloaded private key, host keys pinned from ssh.config.
        let mut c = d.admin().await;
        let kh = known_hosts(&mut c, downloads, port).await;
        let o = ssh_key_login(&priv_path, &kh, port, "root");
        assert!(o.status.success(), "ssh -i <downloaded key> root@127.0.0.1: {}", String::from_utf8_lossy(&o.stderr));

        // A manual connection to it, with Discover Remote Host Key.
        click(driver, "a[data-nav='backup']").await;
        wait_js(driver, "backup page again", "return document.getElementById('add-connection');", vec![]).await;
        click(driver, "#add-connection").await;
        fill(driver, &field("name"), "loopback").await;
        if js(driver, "return !!document.querySelector(\"#modal [name='setup_method']\");", vec![]).await == json!(true)
        {
            fill(driver, &field("setup_method"), "MANUAL").await;
        }
        fill(driver, &field("host"), "127.0.0.1").await;
        fill(driver, &field("port"), &port.to_string()).await;
        fill(driver, &field("username"), "admin").await;
        fill(driver, &field("private_key"), &kp["id"].to_string()).await;
        let can_discover = js(driver, "return !!document.getElementById('discover');", vec![]).await == json!(true);
        if can_discover {
            click(driver, "#discover").await;
            wait_js(driver, "discovered fingerprints", "return document.getElementById('discover-confirm');", vec![])
                .await;
            shot(driver, "08-discover").await;
            click(driver, "#discover-confirm").await;
            let hk =
                js(driver, &format!("return document.querySelector(\"{}\").value;", field("remote_host_key")), vec![])
                    .await;
            assert!(hk.as_str().unwrap().contains("ssh-ed25519 "), "{hk}");
        } else {
            let cfg = d.cli_json(&["ssh.config"]);
            let lines: Vec<&str> =
                cfg["host_keys"].as_array().unwrap().iter().map(|k| k["public_key"].as_str().unwrap()).collect();
            fill(driver, &field("remote_host_key"), &lines.join("\n")).await;
        }
        shot(driver, "09-connection-form").await;
        click(driver, "#form-submit").await;
        modal_closed(driver, "connection saved").await;
        let row = wait_js(
            driver,
            "connection row",
            "const r = document.querySelector(\"tr[data-name='loopback']\"); return r && r.textContent;",
            vec![],
        )
        .await;
        assert!(row.as_str().unwrap().contains("ui-key"), "{row}");
        shot(driver, "10-connections").await;

        // Test action: the result stages are shown (whatever the outcome).
        click(driver, "button[aria-label='Test loopback']").await;
        let r = wait_js(
            driver,
            "test result",
            "const e = document.getElementById('test-result'); return e && e.textContent;",
            vec![],
        )
        .await;
        assert!(r.as_str().unwrap().contains("Stage"), "{r}");
        // What the dialog says is what the list's Status column says from now on.
        let loopback_result = js(
            driver,
            "const dd = [...document.querySelectorAll('#test-result dd')].map((d) => d.textContent); return dd[0] === 'OK' ? 'OK' : `FAILED (${dd[1]})`;",
            vec![],
        )
        .await;
        shot(driver, "11-connection-test").await;
        click(driver, "#modal .modal-foot button").await;
        modal_closed(driver, "test dialog closed").await;
        let status = js(
            driver,
            "return document.querySelector(\"tr[data-name='loopback'] .status .badge\").textContent;",
            vec![],
        )
        .await;
        assert_eq!(status, loopback_result, "status column vs the test dialog");

        // Semi-automatic pairing with a second keyhaven through the form.
        let b = Daemon::start_in(Arc::new(TestDir::new("ui-b")), DaemonOpts::default());
        let b_ssh = free_port();
        let o = b.call_cli(&["ssh.update", &json!({"tcpport": b_ssh}).to_string()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        click(driver, "#add-connection").await;
        fill(driver, &field("name"), "to-b").await;
        fill(driver, &field("setup_method"), "SEMI-AUTOMATIC").await;
        fill(driver, &field("url"), &b.url).await;
        fill(driver, &field("admin_username"), "admin").await;
        fill(driver, &field("password"), ADMIN_PASSWORD).await;
        fill(driver, &field("username"), "root").await;
        fill(driver, &field("private_key"), "NEW").await;
        fill(driver, &field("new_key_type"), "ECDSA").await;
        let hidden = js(
            driver,
            "return ['host', 'port', 'remote_host_key'].every((n) => document.querySelector(`#modal [name='${n}']`).closest('.field').hidden);",
            vec![],
        )
        .await;
        assert_eq!(hidden, json!(true), "manual fields shown for the semi-automatic method");
        shot(driver, "11a-pairing-form").await;
        // B is plain HTTP on loopback: refused until the admin accepts sending the login unencrypted.
        click(driver, "#form-submit").await;
        wait_js(
            driver,
            "plain-HTTP refusal",
            "return document.querySelector('#modal[open]') && document.getElementById('modal').textContent.includes('http:// would send the remote admin password');",
            vec![],
        )
        .await;
        let visible = js(
            driver,
            "return !document.querySelector(\"#modal [name='allow_insecure_http']\").closest('.field').hidden;",
            vec![],
        )
        .await;
        assert_eq!(visible, json!(true), "the plain-HTTP checkbox is offered for an http:// URL");
        click(driver, &field("allow_insecure_http")).await;
        click(driver, "#form-submit").await;
        wait_js_within(
            driver,
            "pairing done",
            "return !document.getElementById('modal').open && !document.getElementById('busy').open
                    && document.querySelector(\"tr[data-name='to-b']\");",
            vec![],
            Duration::from_secs(90),
        )
        .await;
        let row = js(driver, "return document.querySelector(\"tr[data-name='to-b']\").textContent;", vec![]).await;
        let row = row.as_str().unwrap();
        assert!(row.contains("127.0.0.1") && row.contains(&b_ssh.to_string()) && row.contains("to-b Key"), "{row}");
        let key_row = wait_js(
            driver,
            "new key pair row",
            "const r = document.querySelector(\"tr[data-name='to-b Key']\"); return r && r.textContent;",
            vec![],
        )
        .await;
        assert!(key_row.as_str().unwrap().contains("ECDSA"), "the chosen key type: {key_row}");
        shot(driver, "11b-paired-connection").await;
        click(driver, "button[aria-label='Test to-b']").await;
        let r = wait_js_within(
            driver,
            "pairing test result",
            "const e = document.getElementById('test-result'); return e && e.textContent;",
            vec![],
            Duration::from_secs(60),
        )
        .await;
        let badge = js(driver, "return document.querySelector('#test-result .badge').textContent;", vec![]).await;
        assert_eq!(badge, json!("OK"), "test of the paired connection: {r}");
        shot(driver, "11c-paired-test-ok").await;
        click(driver, "#modal .modal-foot button").await;
        modal_closed(driver, "pairing test dialog closed").await;
        // The list shows the last test as the connection's status.
        wait_js(
            driver,
            "status column",
            "const r = document.querySelector(\"tr[data-name='to-b'] .status .badge\"); return r && r.textContent === 'OK';",
            vec![],
        )
        .await;
        let loopback = js(
            driver,
            "return document.querySelector(\"tr[data-name='loopback'] .status .badge\").textContent;",
            vec![],
        )
        .await;
        assert_eq!(loopback, loopback_result, "the loopback status after a page reload");

        // The remote's host key "changes" (the pinned one is replaced by another key):
        // the test fails at the host-key stage and offers a review of old against new
        // fingerprints; accepting re-pins and the test passes again.
        let mut ca = d.admin().await;
        let conn = ca.call("keychaincredential.query", json!([[["name", "=", "to-b"]], {"get": true}])).await;
        let decoy = ca.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
        let decoy_line = key_body(decoy["public_key"].as_str().unwrap());
        let decoy_file = downloads.join("decoy.pub");
        std::fs::write(&decoy_file, format!("{decoy_line}\n")).unwrap();
        let o = Command::new("ssh-keygen").arg("-lf").arg(&decoy_file).output().unwrap();
        let decoy_fp = String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1).unwrap().to_string();
        let mut attrs = conn["attributes"].clone();
        attrs["remote_host_key"] = json!(decoy_line);
        ca.call("keychaincredential.update", json!([conn["id"], {"attributes": attrs}])).await;
        click(driver, "button[aria-label='Test to-b']").await;
        wait_js_within(
            driver,
            "host key failure",
            "const e = document.getElementById('test-result'); return e && document.getElementById('review-host-keys') && e.textContent;",
            vec![],
            Duration::from_secs(60),
        )
        .await;
        let badge = js(driver, "return document.querySelector('#test-result .badge').textContent;", vec![]).await;
        assert_eq!(badge, json!("FAILED"));
        click(driver, "#review-host-keys").await;
        wait_js(driver, "host key review", "return document.getElementById('host-key-review');", vec![]).await;
        let old = js(
            driver,
            "return [...document.querySelectorAll('#host-key-review .old-key')].map((e) => e.textContent);",
            vec![],
        )
        .await;
        assert_eq!(old, json!([decoy_fp]), "pinned fingerprint shown");
        let new: BTreeSet<String> = serde_json::from_value(
            js(
                driver,
                "return [...document.querySelectorAll('#host-key-review .new-key')].map((e) => e.textContent);",
                vec![],
            )
            .await,
        )
        .unwrap();
        let b_cfg = b.cli_json(&["ssh.config"]);
        let b_fps: BTreeSet<String> = b_cfg["host_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["fingerprint"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(new, b_fps, "offered fingerprints = B's host keys");
        shot(driver, "11d-host-key-review").await;
        click(driver, "#confirm-ok").await;
        wait_js_within(
            driver,
            "re-test after re-pinning",
            "const b = document.querySelector('#test-result .badge'); return b && b.textContent === 'OK';",
            vec![],
            Duration::from_secs(60),
        )
        .await;
        let pinned = ca.call("keychaincredential.get_instance", json!([conn["id"]])).await["attributes"]
            ["remote_host_key"]
            .clone();
        let pinned: BTreeSet<&str> = pinned.as_str().unwrap().lines().collect();
        let b_keys: BTreeSet<&str> =
            b_cfg["host_keys"].as_array().unwrap().iter().map(|k| k["public_key"].as_str().unwrap()).collect();
        assert_eq!(pinned, b_keys, "re-pinned = B's host keys");
        click(driver, "#modal .modal-foot button").await;
        modal_closed(driver, "re-test dialog closed").await;
        drop(b);
    } else {
        eprintln!("not root or no /usr/sbin/sshd: skipping the SSH service start and the connection");
    }

    // Audit log.
    click(driver, "a[data-nav='audit']").await;
    wait_js(driver, "audit rows", "return document.querySelectorAll('#view-audit tbody tr').length > 2;", vec![]).await;
    shot(driver, "12-audit").await;

    // System › Cluster: on SQLite, this node alone, up and leading.
    click(driver, "a[data-nav='cluster']").await;
    let node = d.cli_json(&["keyhaven.cluster_status"])["node_id"].as_str().unwrap().to_string();
    wait_js(
        driver,
        "the cluster's node list",
        "const rows = document.querySelectorAll('#view-cluster tbody tr[data-node]'); \
         return rows.length === 1 && rows[0].dataset.node === arguments[0] && rows[0].textContent.includes('leader') \
           && rows[0].textContent.includes('up') && document.getElementById('cluster-leader').textContent === arguments[0];",
        vec![json!(node)],
    )
    .await;
    shot(driver, "12b-cluster").await;

    // Logout ends the session.
    click(driver, "#logout").await;
    wait_js(driver, "login after logout", "return !document.getElementById('login').hidden;", vec![]).await;

    // Two-factor login: password, then the OTP field on the same socket.
    let e = d.cli_json(&["user.renew_2fa_secret", "admin", "{}"]);
    let uri = e["provisioning_uri"].as_str().unwrap();
    let secret = uri.split("secret=").nth(1).unwrap().split('&').next().unwrap();
    let totp = totp_rs::Builder::new()
        .with_secret(totp_rs::Secret::try_from_base32(secret).unwrap())
        .with_digits(6)
        .with_step_duration(30)
        .with_skew(1)
        .build()
        .unwrap();
    fill(driver, "#login-username", "admin").await;
    fill(driver, "#login-password", ADMIN_PASSWORD).await;
    click(driver, "#login-submit").await;
    wait_js(driver, "OTP field", "return !document.getElementById('login-otp-box').hidden;", vec![]).await;
    fill(driver, "#login-otp", "000000").await;
    click(driver, "#login-submit").await;
    wait_js(driver, "wrong OTP message", "return document.getElementById('login-error').textContent;", vec![]).await;
    shot(driver, "13-login-otp").await;
    fill(driver, "#login-otp", &totp.generate_current().to_string()).await;
    click(driver, "#login-submit").await;
    wait_js(driver, "logged in with OTP", "return document.getElementById('login').hidden && !document.getElementById('topbar').hidden && document.querySelector('#view h1');", vec![]).await;
}

/// The UI's HTTP surface: assets embedded, strict headers, no traversal.
#[tokio::test]
async fn ui_assets_have_strict_security_headers() {
    let d = Daemon::start();
    for (path, ctype) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/backup.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let (status, headers, body) = http_get(d.addr, path).await;
        assert_eq!(status, 200, "{path}");
        let h = |n: &str| {
            headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone()).unwrap_or_default()
        };
        assert!(h("content-type").starts_with(ctype), "{path}: {}", h("content-type"));
        let csp = h("content-security-policy");
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(h("x-content-type-options"), "nosniff");
        assert_eq!(h("referrer-policy"), "no-referrer");
        assert_eq!(h("x-frame-options"), "DENY");
        assert!(!body.is_empty());
    }
    let (_, _, index) = http_get(d.addr, "/").await;
    assert!(!index.contains("<script>") && !index.contains("style="), "inline script or style in index.html");
    for bad in ["/ui/..%2fCargo.toml", "/ui/nope.js", "/ui/.hidden"] {
        let (status, _, _) = http_get(d.addr, bad).await;
        assert_eq!(status, 404, "{bad}");
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    (status, headers, body.to_string())
}

/// geckodriver (driving Firefox ESR) as a child process, killed by PID on drop
/// together with any Firefox processes it left behind.
struct GeckoDriver {
    child: Child,
    port: u16,
    /// Firefox's HOME (and geckodriver's log), removed on drop.
    home: TestDir,
}

const FIREFOX: &str = "/usr/bin/firefox-esr";

impl GeckoDriver {
    fn start() -> GeckoDriver {
        let exe = which("geckodriver")
            .or_else(|| {
                let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/geckodriver");
                p.is_file().then_some(p)
            })
            .unwrap_or_else(|| {
                panic!(
                    "geckodriver is not installed (looked on PATH and in $HOME/.cargo/bin): the Firefox UI test \
                     needs it (run scripts/install-test-deps.sh, or cargo install --locked geckodriver --version 0.37.1)"
                )
            });
        assert!(
            Path::new(FIREFOX).is_file(),
            "{FIREFOX} is not installed: the Firefox UI test needs Debian's `firefox-esr` \
             (run scripts/install-test-deps.sh, or apt-get install -y firefox-esr)"
        );
        let home = TestDir::new("ui-firefox-home");
        std::fs::create_dir_all(home.path()).unwrap();
        let log = std::fs::File::create(home.path().join("geckodriver.log")).unwrap();
        let port = free_port();
        let child = Command::new(exe)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--binary", FIREFOX])
            .env("HOME", home.path())
            .env("MOZ_HEADLESS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn geckodriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "geckodriver did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        GeckoDriver { child, port, home }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("geckodriver.log")).unwrap_or_default()
    }
}

/// PIDs of every live descendant of `pid` (from /proc).
fn descendants(pid: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let p: i32 = e.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                    // "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
                    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = vec![];
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &(c, pp) in &parents {
            if pp == p && !out.contains(&c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

impl Drop for GeckoDriver {
    fn drop(&mut self) {
        // After `driver.quit()` Firefox is gone already; after a failure it may not be.
        let left = descendants(self.child.id() as i32);
        crate::util::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in left {
            crate::util::signal(pid as u32, libc::SIGKILL);
        }
    }
}

/// The same UI in Firefox ESR through geckodriver: log in, generate a key pair,
/// visit each page, log out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_in_headless_firefox() {
    let started = Instant::now();
    let d = Daemon::start();
    let gd = GeckoDriver::start();
    let mut caps = DesiredCapabilities::firefox();
    caps.set_headless().unwrap();
    caps.set_firefox_binary(FIREFOX).unwrap();
    let driver = match WebDriver::new(format!("http://127.0.0.1:{}", gd.port), caps).await {
        Ok(driver) => driver,
        Err(e) => panic!("start headless firefox: {e}\ngeckodriver log:\n{}", gd.log()),
    };
    let body = async {
        driver.set_window_rect(0, 0, 1280, 800).await.expect("set the window size");
        run_firefox(&driver, &d).await;
    };
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(body)).await;
    // Always end the session: geckodriver then stops Firefox.
    let quit = driver.quit().await;
    if let Err(p) = outcome {
        eprintln!("daemon stderr:\n{}", d.stderr());
        eprintln!("geckodriver log:\n{}", gd.log());
        drop(gd);
        std::panic::resume_unwind(p);
    }
    quit.expect("quit firefox");
    drop(gd);
    eprintln!("Firefox UI test took {:?}", started.elapsed());
}

/// Navigate by the top bar and wait for the page's main heading.
async fn open_page(driver: &WebDriver, nav: &str, heading: &str) {
    click(driver, &format!("a[data-nav='{nav}']")).await;
    wait_js(
        driver,
        &format!("{nav} page"),
        "const h = document.querySelector(`#view-${arguments[0]} h1`); return h && h.textContent === arguments[1];",
        vec![json!(nav), json!(heading)],
    )
    .await;
}

async fn run_firefox(driver: &WebDriver, d: &Daemon) {
    driver.goto(format!("{}/", d.url)).await.unwrap();
    wait_js(driver, "login form", "return !document.getElementById('login').hidden;", vec![]).await;
    shot(driver, "firefox-01-login").await;

    fill(driver, "#login-username", "admin").await;
    fill(driver, "#login-password", ADMIN_PASSWORD).await;
    click(driver, "#login-submit").await;
    wait_js(
        driver,
        "logged in",
        "return document.getElementById('login').hidden && !document.getElementById('topbar').hidden && document.querySelector('#view h1');",
        vec![],
    )
    .await;

    // Credentials › Backup Credentials: generate an Ed25519 key pair.
    open_page(driver, "backup", "Credentials › Backup Credentials").await;
    wait_js(driver, "keypair table", "return document.getElementById('add-keypair');", vec![]).await;
    click(driver, "#add-keypair").await;
    wait_js(driver, "keypair form", "return document.querySelector(\"#modal[open] [name='name']\");", vec![]).await;
    fill(driver, &field("name"), "ff-key").await;
    fill(driver, &field("key_type"), "ED25519").await;
    shot(driver, "firefox-02-keypair-form").await;
    click(driver, "#form-submit").await;
    modal_closed(driver, "keypair saved").await;
    let row = wait_js(
        driver,
        "fingerprint in table",
        "const r = document.querySelector(\"tr[data-name='ff-key']\"); return r && r.textContent.includes('SHA256:') ? r.textContent : null;",
        vec![],
    )
    .await;
    let row = row.as_str().unwrap();
    let mut c = d.admin().await;
    let keys = c.call("keychaincredential.query", json!([[["name", "=", "ff-key"]]])).await;
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "{keys}");
    let fingerprint = keys[0]["fingerprint"].as_str().unwrap_or_else(|| panic!("no fingerprint in {keys}"));
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
    let cell = js(
        driver,
        "return [...document.querySelectorAll(\"tr[data-name='ff-key'] td\")].map((td) => td.textContent.trim()).find((t) => t.startsWith('SHA256:'));",
        vec![],
    )
    .await;
    assert_eq!(cell, json!(fingerprint), "fingerprint cell vs the API's (row: {row})");
    assert!(row.contains("ED25519"), "{row}");
    shot(driver, "firefox-03-backup-credentials").await;

    // Credentials › Users.
    open_page(driver, "users", "Credentials › Users").await;
    wait_js(driver, "admin in users", "return document.querySelector(\"#view-users tr[data-name='admin']\");", vec![])
        .await;
    shot(driver, "firefox-04-users").await;

    // System › Services › SSH.
    open_page(driver, "ssh", "System › Services › SSH").await;
    wait_js(
        driver,
        "ssh form",
        "return document.querySelector(\"#view-ssh [name='tcpport']\") && document.getElementById('ssh-save');",
        vec![],
    )
    .await;
    shot(driver, "firefox-05-ssh-service").await;

    // Log out: back to the login page.
    click(driver, "#logout").await;
    wait_js(
        driver,
        "login after logout",
        "return !document.getElementById('login').hidden && document.getElementById('topbar').hidden && document.getElementById('login-error').textContent.includes('logged out');",
        vec![],
    )
    .await;
    shot(driver, "firefox-06-logged-out").await;
}

/// System › General › Manage Configuration: Download Config saves an
/// encrypted backup the browser downloads; Upload Config sends it back, and
/// keyhaven restarts onto it (a key pair made in between is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_manage_configuration_saves_and_restores() {
    let d = Daemon::start();
    let downloads = TestDir::new("ui-config");
    std::fs::create_dir_all(downloads.path()).unwrap();
    let (cd, driver) = start_chromium(downloads.path()).await;
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run_manage_configuration(
        &driver,
        &d,
        downloads.path(),
    )))
    .await;
    let _ = driver.quit().await;
    drop(cd);
    if let Err(p) = outcome {
        eprintln!("daemon stderr:\n{}", d.stderr());
        std::panic::resume_unwind(p);
    }
}

async fn run_manage_configuration(driver: &WebDriver, d: &Daemon, downloads: &Path) {
    use crate::backup::{decrypt_bytes, pair, tar_entries, PASSPHRASE};
    ui_login(driver, d).await;
    driver.goto(format!("{}/#/system/general/config", d.url)).await.unwrap();
    wait_js(driver, "manage configuration page", "return document.querySelector('#view-config h1');", vec![]).await;
    click(driver, "#config-save").await;
    fill(driver, &field("passphrase"), PASSPHRASE).await;
    fill(driver, &field("confirm"), "something else").await;
    click(driver, "#form-submit").await;
    wait_js(
        driver,
        "mismatch error",
        "return document.querySelector(\"[data-error-for='confirm']\").textContent;",
        vec![],
    )
    .await;
    fill(driver, &field("confirm"), PASSPHRASE).await;
    click(driver, "#form-submit").await;
    modal_closed(driver, "save dialog closed").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let file = loop {
        let found = std::fs::read_dir(downloads)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "age") && std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
        if let Some(f) = found {
            break f;
        }
        assert!(Instant::now() < deadline, "no .age download appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let entries = tar_entries(&decrypt_bytes(&std::fs::read(&file).unwrap(), PASSPHRASE));
    assert_eq!(entries[0].0, "manifest.json");

    let mut c = d.admin().await;
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    c.call(
        "keychaincredential.create",
        json!([{"name": "made-after-save", "type": "SSH_KEY_PAIR", "attributes": pair(&kp)}]),
    )
    .await;
    click(driver, "#config-upload").await;
    driver.find(By::Css("#config-file")).await.unwrap().send_keys(file.to_str().unwrap()).await.unwrap();
    fill(driver, &field("passphrase"), PASSPHRASE).await;
    click(driver, "#form-submit").await;
    wait_js(driver, "restored toast", "return document.body.innerText.includes('Configuration restored');", vec![])
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(d.stderr().contains("restored the staged backup") && d.stderr().matches(" ready").count() >= 2) {
        assert!(Instant::now() < deadline, "no restart onto the restored state");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = d.admin().await;
    let n = c.call("keychaincredential.query", json!([[["name", "=", "made-after-save"]], {"count": true}])).await;
    assert_eq!(n, 0, "the upload did not restore the saved state");
}
