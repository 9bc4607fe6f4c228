//! `keyhaven serve`: self-checks, first-start setup, listeners, the ready line
//! (and systemd's `READY=1`), reloading on SIGHUP and clean shutdown on
//! SIGTERM/SIGINT.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use zeroize::Zeroizing;

use crate::config::{Config, ADMIN_PASSWORD_ENV, SETTINGS};
use crate::service::{users, App};
use crate::transport;
use keyhaven_store::{Store, DB_FILE, MASTER_KEY_FILE};

pub const INITIAL_PASSWORD_FILE: &str = "initial-admin-password";

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Unsafe(String),
    #[error("cannot create data dir {path}: {source}; create it yourself (mode 0711) or choose another --data-dir")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Store(#[from] keyhaven_store::StoreError),
    #[error(
        "cannot listen on {addr}: {source}; is another keyhaven (or another service) using it? pick another --listen"
    )]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot create the local socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Tls(#[from] transport::tls::TlsError),
    #[error("first-start setup failed: {0}")]
    Bootstrap(String),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Backup(#[from] crate::backup::BackupError),
    #[error("{0}")]
    NodeId(#[from] crate::service::cluster::NodeIdError),
}

/// Refuse files or folders that group or others can read (DESIGN.md §2).
fn check_mode(path: &Path, what: &str, allowed_extra: u32, fix_mode: u32) -> Result<(), StartupError> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    let mode = meta.permissions().mode() & 0o777;
    let forbidden = 0o077 & !allowed_extra;
    if mode & forbidden != 0 {
        return Err(StartupError::Unsafe(format!(
            "{what} {} has mode {:04o}, which lets group or others read or change it; \
             run `chmod {:04o} {}` and start keyhaven again",
            path.display(),
            mode,
            fix_mode,
            path.display()
        )));
    }
    Ok(())
}

/// Create the data dir (0711) on first start, and check the modes of what exists.
pub fn prepare_data_dir(dir: &Path) -> Result<(), StartupError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(|source| StartupError::CreateDir { path: dir.to_path_buf(), source })?;
    }
    // 0711: traversable (sshd reads per-user key files as that user), not listable.
    check_mode(dir, "data dir", 0o011, 0o711)?;
    check_mode(&dir.join(DB_FILE), "database", 0, 0o600)?;
    check_mode(&dir.join(MASTER_KEY_FILE), "master key", 0, 0o600)?;
    check_mode(&dir.join(INITIAL_PASSWORD_FILE), "initial admin password file", 0, 0o600)?;
    Ok(())
}

/// Open the store and create the built-in accounts on first start.
pub fn open_store(cfg: &Config) -> Result<Store, StartupError> {
    prepare_data_dir(&cfg.data_dir)?;
    let (store, first_start) = Store::open_database(&cfg.data_dir, cfg.database.expose())?;
    if cfg.database.is_postgres() {
        tracing::info!("the state is in PostgreSQL at {}", store.location());
    } else {
        // SQLite creates -wal/-shm files with the DB's mode; check them as well.
        check_mode(&cfg.data_dir.join(format!("{DB_FILE}-wal")), "database journal", 0, 0o600)?;
    }
    let admin_pw = std::env::var(ADMIN_PASSWORD_ENV).ok().filter(|s| !s.is_empty()).map(Zeroizing::new);
    let boot = users::bootstrap(&store, admin_pw).map_err(|e| StartupError::Bootstrap(e.to_string()))?;
    if let Some(pw) = boot.generated_admin_password {
        let path = cfg.data_dir.join(INITIAL_PASSWORD_FILE);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StartupError::Write { path: path.clone(), source })?;
        f.write_all(format!("{}\n", pw.as_str()).as_bytes())
            .map_err(|source| StartupError::Write { path: path.clone(), source })?;
        // The password stays out of the log (the journal keeps it and more
        // people read it than the data dir): only where to find it. Through
        // the logger, so that it is a JSON line with `log_format = json`.
        tracing::warn!(
            "created account `admin`; its password is in {} (readable by root only): log in, change it, then delete that file",
            path.display()
        );
    } else if first_start {
        tracing::info!("created account `admin` with the password from {ADMIN_PASSWORD_ENV}");
    }
    Ok(store)
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed at the call, not
/// at the first poll: a SIGTERM right after the ready line (systemd may send
/// one as soon as it has READY=1) must shut down cleanly, not kill the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// Why the log filter was not switched to a new `log` setting.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    #[error("`{filter}` is not a log filter: {source}")]
    NotAFilter { filter: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("the log filter could not be switched: {0}")]
    Switch(Box<dyn std::error::Error + Send + Sync>),
}

/// Switches the log filter to a new `log` setting.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), LogFilterError> + Send + Sync>;

/// What `serve` does on SIGHUP, given by the binary, which owns the command
/// line and the logger.
pub struct Reload {
    /// The configuration resolved anew: the same flags and environment, the
    /// config file read again.
    pub resolve: Box<dyn Fn() -> Result<Config, crate::config::ConfigError> + Send + Sync>,
    pub set_log_filter: SetLogFilter,
}

/// Tell systemd (when it started us with `Type=notify`) how we are doing.
/// Without `NOTIFY_SOCKET` this does nothing.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd through NOTIFY_SOCKET: {e}");
    }
}

/// Re-read the configuration on each SIGHUP and apply the settings that can
/// change while running ([`crate::config::SettingDef::reload`]); name the others,
/// which keep their running values until a restart.
async fn reload_on_sighup(
    app: Arc<App>,
    reload: Reload,
    audit_wake: Arc<tokio::sync::Notify>,
    tls: Option<transport::tls::SharedAcceptor>,
) {
    use sd_notify::NotifyState;
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP, so the configuration cannot be reloaded: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let mut reloading = vec![NotifyState::Reloading];
        reloading.extend(NotifyState::monotonic_usec_now().ok());
        notify_systemd(&reloading);
        match (reload.resolve)() {
            Err(e) => tracing::warn!("reloading the configuration failed, nothing was changed: {e}"),
            Ok(new) => apply_reload(&app, &reload, new, &audit_wake, tls.as_ref()),
        }
        notify_systemd(&[NotifyState::Ready]);
    }
}

fn apply_reload(
    app: &App,
    reload: &Reload,
    new: Config,
    audit_wake: &tokio::sync::Notify,
    tls: Option<&transport::tls::SharedAcceptor>,
) {
    let reloadable = |name: &str| SETTINGS.iter().any(|d| d.name == name && d.reload);
    for name in app.config.changed_settings(&new).into_iter().filter(|n| !reloadable(n)) {
        tracing::warn!(
            "setting `{name}` changed in the configuration, but applies only at start: \
             keyhaven keeps the running value until it is restarted (systemctl restart keyhaven)"
        );
    }
    let applied: Vec<&str> = app.live_config().changed_settings(&new).into_iter().filter(|n| reloadable(n)).collect();
    tracing::info!(
        "configuration reloaded; applied: {}",
        if applied.is_empty() { "nothing changed".into() } else { applied.join(", ") }
    );
    // The certificate is read again whether or not its paths changed: a
    // renewal (certbot and the like) rewrites the same files, then reloads.
    if let Some(shared) = tls {
        match load_tls(&new) {
            Ok((acceptor, fp, validity)) => {
                *shared.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
                *app.tls_fingerprint.write().unwrap_or_else(|e| e.into_inner()) = fp;
                app.metrics.set_tls_validity(validity);
            }
            Err(e) => tracing::warn!("{e}; still serving the previous certificate"),
        }
    }
    let log = new.log.clone();
    app.set_live_config(new);
    if applied.contains(&"audit.retention_days") {
        audit_wake.notify_one();
    }
    // Last, so that the lines above still go out under the old filter.
    if applied.contains(&"log") {
        if let Err(e) = (reload.set_log_filter)(&log) {
            tracing::warn!("setting `log`: {e}; keeping the previous log filter");
        }
    }
}

/// The certificate to serve (configured, or self-signed in the data dir) as an
/// acceptor, with its fingerprint and validity (for `/metrics`).
type LoadedTls = (tokio_rustls::TlsAcceptor, Option<String>, Option<(i64, i64)>);

fn load_tls(cfg: &Config) -> Result<LoadedTls, transport::tls::TlsError> {
    let (c, k) = transport::tls::ensure_cert(
        &cfg.data_dir,
        cfg.tls_cert.as_deref(),
        cfg.tls_key.as_deref(),
        &[cfg.listen.ip().to_string()],
    )?;
    let acceptor = transport::tls::acceptor(&c, &k)?;
    let fp = transport::tls::leaf_fingerprint(&c);
    if let Some(fp) = &fp {
        // Admins compare this with what a pairing system shows before trusting it.
        tracing::info!("serving TLS with the certificate {} (SHA-256 fingerprint {fp})", c.display());
    }
    Ok((acceptor, fp, transport::tls::leaf_validity(&c)))
}

/// Run the daemon until SIGTERM/SIGINT.
pub async fn serve(cfg: Config, reload: Reload) -> Result<(), StartupError> {
    let started = Instant::now();
    prepare_data_dir(&cfg.data_dir)?;
    // One daemon per data dir; `keyhaven restore` checks this lock too.
    let _lock = crate::backup::lock::DataDirLock::acquire(&cfg.data_dir)?;
    // A restore staged by `config.upload` (or interrupted) is put in place
    // before anything opens the files it replaces.
    if let Some(previous) = crate::backup::apply_staged(&cfg.data_dir)? {
        tracing::warn!(
            "restored the staged backup; the state it replaced is in {} until this start completes",
            previous.display()
        );
    }
    let store = open_store(&cfg)?;
    if let Some(problem) = keyhaven_ssh::reach::strict_modes_problem(&cfg.data_dir) {
        tracing::warn!("{problem}");
    }
    if !cfg.authorized_keys_in_home() {
        if let Some(problem) = keyhaven_ssh::reach::others_cannot_reach(&cfg.data_dir) {
            tracing::warn!("keys set on accounts other than root will not work: {problem}");
        }
    }
    let tls = if cfg.use_tls() { Some(load_tls(&cfg)?) } else { None };
    let tls_fingerprint = tls.as_ref().and_then(|(_, fp, _)| fp.clone());
    let tls_validity = tls.as_ref().and_then(|(_, _, v)| *v);
    let tls = tls.map(|(a, _, _)| Arc::new(std::sync::RwLock::new(a)));
    let listener = match crate::backup::restart::take_inherited() {
        // Restarted in place after a restore: the same socket, same port.
        Some(l) => l.set_nonblocking(true).and_then(|_| TcpListener::from_std(l)),
        None => TcpListener::bind(cfg.listen).await,
    }
    .map_err(|source| StartupError::Listen { addr: cfg.listen, source })?;
    crate::backup::restart::keep_listener(&listener);
    let local = listener.local_addr().map_err(|source| StartupError::Listen { addr: cfg.listen, source })?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|source| StartupError::Listen { addr, source })?;
            let local = l.local_addr().map_err(|source| StartupError::Listen { addr, source })?;
            Some((l, local))
        }
        None => None,
    };
    let unix = transport::unix::bind(&cfg.data_dir)
        .map_err(|source| StartupError::Socket { path: transport::unix::socket_path(&cfg.data_dir), source })?;

    let data_dir = cfg.data_dir.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let node_id = crate::service::cluster::node_id(&data_dir)?;
    let app = App::new(cfg, store);
    // Membership first: on PostgreSQL the scheduled work below waits for
    // this node to lead the cluster.
    let membership = app
        .cluster()
        .start(keyhaven_store::cluster::NodeRecord {
            node_id,
            hostname: crate::service::cluster::hostname(),
            version: env!("CARGO_PKG_VERSION").into(),
            address: format!("{scheme}://{local}"),
            started_at: crate::service::jobs::now(),
        })
        .await
        .map_err(|e| StartupError::Bootstrap(e.to_string()))?;
    // Jobs and rsync runs this node's previous process left RUNNING did not
    // finish (on PostgreSQL only this node's: others may be running theirs);
    // failed before any call can start new ones.
    app.jobs.recover();
    app.rsync().recover();
    *app.tls_fingerprint.write().unwrap_or_else(|e| e.into_inner()) = tls_fingerprint;
    app.metrics.set_tls_validity(tls_validity);
    let router = transport::router(app.clone());
    let nofile = transport::limits::raise_nofile_limit();
    let max_connections = transport::limits::effective_max(app.config.max_connections, nofile);
    if max_connections < app.config.max_connections {
        tracing::warn!(
            "serving at most {max_connections} connections, not {}: the open-file limit is {} (raise LimitNOFILE)",
            app.config.max_connections,
            nofile.unwrap_or(0)
        );
    }
    let edge = transport::EdgeLimits {
        registry: transport::limits::Registry::new(max_connections, app.config.max_connections_per_address),
        header_read_timeout: app.config.header_read_timeout,
    };
    let audit_wake = Arc::new(tokio::sync::Notify::new());
    {
        // Audit retention: at start, then hourly, and when a reload changes
        // it; on the cluster's leader only (and at once when this node
        // becomes the leader).
        let app = app.clone();
        let wake = audit_wake.clone();
        let gained = app.cluster().leadership_gained();
        tokio::spawn(async move {
            loop {
                if !app.cluster().is_leader() {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = gained.notified() => {}
                    }
                    continue;
                }
                let keep = (app.live_config().audit_retention_days * 86_400) as i64;
                let a = app.clone();
                match tokio::task::spawn_blocking(move || a.store.audit_prune(keep)).await {
                    Ok(Ok(n)) if n > 0 => tracing::info!("deleted {n} audit entries older than the retention period"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("pruning the audit log: {e}"),
                    Err(e) => tracing::warn!("pruning the audit log: {e}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                    _ = wake.notified() => {}
                    _ = gained.notified() => {}
                }
            }
        });
    }
    tokio::spawn(reload_on_sighup(app.clone(), reload, audit_wake, tls.clone()));
    // Several nodes on one PostgreSQL: other nodes' changes (returns at once on SQLite).
    tokio::spawn(crate::service::sync::follow(Arc::downgrade(&app)));
    {
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = app.accounts().report_unusable_keys() {
                tracing::warn!("checking the accounts' keys: {e}");
            }
        });
    }
    {
        // Keys files follow the OS accounts: withdrawn when one is removed or
        // changes uid behind keyhaven's back, restored when it is back.
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                let a = app.clone();
                match tokio::task::spawn_blocking(move || a.accounts().reconcile_keys()).await {
                    Ok(Ok(withdrawn)) => {
                        for user in withdrawn {
                            let session = crate::service::auth::Session::new("system".into());
                            crate::service::audit::record(
                                &app,
                                &session,
                                crate::service::audit::AuditEvent::method(
                                    "user.keys",
                                    &format!("Keys withdrawn: the OS account {user} is missing or has another uid"),
                                    None,
                                    true,
                                    None,
                                ),
                            );
                        }
                    }
                    Ok(Err(e)) => tracing::warn!("reconciling keys files with the OS accounts: {e}"),
                    Err(e) => tracing::warn!("reconciling keys files with the OS accounts: {e}"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            }
        });
    }
    {
        // Refused-login summaries once their lock ends; the failure map pruned.
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(15)).await;
                app.auth().flush_refusal_summaries(false);
                app.auth.limiter.prune();
                crate::service::crypto::release_idle_hash_memory(crate::service::crypto::HASH_MEMORY_IDLE);
            }
        });
    }
    let unix_task = tokio::spawn(transport::unix::serve(app.clone(), unix));
    // Its own connection limits: a local scraper never takes the admin's room.
    let metrics_task = metrics_listener.map(|(listener, local)| {
        tracing::info!("serving /metrics without login on http://{local}/metrics");
        let limits = transport::EdgeLimits {
            registry: transport::limits::Registry::new(16, 16),
            header_read_timeout: app.config.header_read_timeout,
        };
        let router = transport::monitoring::metrics_router(app.clone());
        tokio::spawn(transport::serve_tcp(listener, router, None, limits, std::future::pending()))
    });
    // Rsync tasks: the scheduler starts (interrupted runs were failed above).
    let scheduler = app.rsync().scheduler();
    {
        let app = app.clone();
        tokio::spawn(async move { app.sshd().start_enabled_services().await });
    }
    // glibc keeps freed memory after bursts (bulk creates, large queries);
    // hand it back to the system now and then so an idle daemon stays small.
    // (The binary tunes the allocator at start: see `tune_allocator` in
    // src/main.rs.)
    #[cfg(target_env = "gnu")]
    tokio::spawn(async {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            // SAFETY: malloc_trim only returns free memory to the system.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        }
    });

    let shutdown = {
        let signal = shutdown_signal();
        async move {
            tokio::select! {
                _ = signal => {}
                _ = crate::backup::restart::requested() => tracing::info!("restarting onto the restored state"),
            }
        }
    };
    println!("keyhaven listening on {scheme}://{local}");
    let _ = std::io::stdout().flush();
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "ready");
    // The listener is bound (connections queue from here on), so systemd may
    // start what comes after keyhaven.service.
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("listening on {scheme}://{local}")),
    ]);
    // The restored state (if any) has started: the one it replaced goes.
    let forgotten = crate::backup::forget_previous(&data_dir);
    if forgotten > 0 {
        tracing::info!("removed {forgotten} state(s) kept aside by a restore, now that the restored one runs");
    }

    transport::serve_tcp(listener, router, tls, edge, shutdown).await;

    tracing::info!("shutting down");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    app.auth().flush_refusal_summaries(true);
    unix_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    scheduler.abort();
    membership.abort();
    app.cluster().resign();
    app.rsync().stop_all();
    if let Err(e) = app.sshd().supervisor().stop().await {
        tracing::warn!("stopping sshd: {e}");
    }
    let _ = std::fs::remove_file(transport::unix::socket_path(&data_dir));
    drop(Arc::try_unwrap(app).ok());
    Ok(())
}
