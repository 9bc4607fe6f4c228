//! Command-line parsing and the subcommands.

mod call;
mod keypair;
mod rsync;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keyhaven_server::config::{Config, SETTINGS};

#[derive(Parser)]
#[command(
    name = "keyhaven",
    version,
    about = "SSH credentials service: key pairs, connections, authorized keys and a supervised sshd"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Default)]
pub struct Common {
    /// Data directory [env: KEYHAVEN_DATA_DIR] [default: ./keyhaven-data]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// TOML config file (keys as in the README's configuration table)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Serve {
        #[command(flatten)]
        common: Common,
        /// ADDRESS:PORT to listen on [env: KEYHAVEN_LISTEN] [default: 127.0.0.1:8080]
        #[arg(long)]
        listen: Option<String>,
    },
    /// Call an API method and print its JSON result, e.g. `keyhaven call core.ping`.
    Call(call::CallArgs),
    /// Manage SSH key pairs (generate, import, list, show, download, delete).
    #[command(subcommand)]
    Keypair(keypair::KeypairCmd),
    /// Rsync tasks: list them, run one now (--wait shows progress).
    #[command(subcommand)]
    Rsync(rsync::RsyncCmd),
    /// Re-encrypt every stored secret under a new master key (stop the daemon first).
    RotateMasterKey {
        #[command(flatten)]
        common: Common,
    },
    /// Print the configuration table (Markdown) that README.md carries.
    #[command(hide = true)]
    SettingsTable,
}

pub fn resolve_config(common: &Common, listen: Option<String>) -> Result<Config, String> {
    let mut flags: BTreeMap<&'static str, String> = BTreeMap::new();
    if let Some(d) = &common.data_dir {
        flags.insert("data_dir", d.display().to_string());
    }
    if let Some(l) = listen {
        flags.insert("listen", l);
    }
    debug_assert!(SETTINGS.iter().any(|s| s.name == "data_dir"));
    Config::resolve(&flags, &|k| std::env::var(k).ok(), common.config.as_deref()).map_err(|e| e.to_string())
}

fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

pub fn run() -> Result<ExitCode, String> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { common, listen } => {
            let cfg = resolve_config(&common, listen)?;
            init_logging(&cfg.log);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(keyhaven_server::startup::serve(cfg)).map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Call(args) => call::run(args),
        Cmd::Keypair(k) => keypair::run(k),
        Cmd::Rsync(r) => rsync::run(r),
        Cmd::RotateMasterKey { common } => {
            let cfg = resolve_config(&common, None)?;
            init_logging(&cfg.log);
            let sock = keyhaven_server::transport::unix::socket_path(&cfg.data_dir);
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return Err(format!(
                    "keyhaven is running ({} answers); stop it first, then run rotate-master-key again",
                    sock.display()
                ));
            }
            let store = keyhaven_server::startup::open_store(&cfg).map_err(|e| e.to_string())?;
            let n = store.rotate_master_key().map_err(|e| format!("rotation failed, nothing was changed: {e}"))?;
            println!("re-encrypted {n} secrets under a new master key in {}", store.key_path().display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SettingsTable => {
            print!("{}", keyhaven_server::config::markdown_table());
            Ok(ExitCode::SUCCESS)
        }
    }
}
