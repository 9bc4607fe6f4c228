//! Command-line parsing and the subcommands.

mod backup;
mod call;
mod cluster;
mod keypair;
mod package;
mod rsync;
mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::PossibleValuesParser;
use clap::{value_parser, Arg, ArgMatches, Args, Command, CommandFactory, FromArgMatches, Parser, Subcommand};
use keyhaven_server::config::{Config, Kind, LogFormat, Scope, SettingDef, SETTINGS};

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

/// A subcommand's setting flags, built from [`SETTINGS`]: one clap argument per
/// setting with a `flag` (id = the setting's name, help = its doc), plus
/// `--config FILE`. `SERVE`: every flagged setting (`serve`); otherwise only
/// those of [`Scope::AllCommands`] (the data directory).
#[derive(Clone, Default)]
pub struct SettingFlags<const SERVE: bool> {
    /// The flags given, by setting name.
    values: BTreeMap<&'static str, String>,
    config: Option<PathBuf>,
}

/// The flags of every subcommand that works on the local data directory.
pub type Common = SettingFlags<false>;
/// The flags of `serve`.
type ServeFlags = SettingFlags<true>;

/// The clap id of `--config` (no setting is named so: see the config tests).
const CONFIG_ID: &str = "config";

impl<const SERVE: bool> SettingFlags<SERVE> {
    /// The settings this subcommand takes as flags, with their long names.
    fn settings() -> impl Iterator<Item = (&'static SettingDef, &'static str)> {
        SETTINGS.iter().filter_map(|def| {
            let long = def.flag?.strip_prefix("--")?;
            (SERVE || def.scope == Scope::AllCommands).then_some((def, long))
        })
    }
}

fn setting_arg(def: &'static SettingDef, long: &'static str) -> Arg {
    let default = match def.default {
        "" => String::new(),
        d => format!(" [default: {d}]"),
    };
    let arg =
        Arg::new(def.name).long(long).global(true).help(format!("{} [env: {}]{default}", def.doc, def.env)).value_name(
            match def.kind {
                Kind::Path => "PATH",
                Kind::Addr => "ADDRESS:PORT",
                Kind::Bool => "BOOL",
                Kind::Str | Kind::Choice(_) => "VALUE",
                Kind::Uint(..) => "N",
            },
        );
    match def.kind {
        Kind::Choice(choices) => arg.value_parser(PossibleValuesParser::new(choices)),
        _ => arg.value_parser(value_parser!(String)),
    }
}

impl<const SERVE: bool> Args for SettingFlags<SERVE> {
    fn augment_args(cmd: Command) -> Command {
        cmd.args(Self::settings().map(|(def, long)| setting_arg(def, long))).arg(
            Arg::new(CONFIG_ID)
                .long("config")
                .global(true)
                .value_name("FILE")
                .value_parser(value_parser!(PathBuf))
                .help("TOML config file (`keyhaven config-template` prints one with every setting and its default)"),
        )
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<const SERVE: bool> FromArgMatches for SettingFlags<SERVE> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Self::default();
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        for (def, _) in Self::settings() {
            if let Some(v) = m.get_one::<String>(def.name) {
                self.values.insert(def.name, v.clone());
            }
        }
        if let Some(c) = m.get_one::<PathBuf>(CONFIG_ID) {
            self.config = Some(c.clone());
        }
        Ok(())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Serve {
        #[command(flatten)]
        flags: ServeFlags,
    },
    /// Call an API method and print its JSON result, e.g. `keyhaven call core.ping`.
    Call(call::CallArgs),
    /// Manage SSH key pairs (generate, import, list, show, download, delete).
    #[command(subcommand)]
    Keypair(keypair::KeypairCmd),
    /// Rsync tasks: list them, run one now (--wait shows progress).
    #[command(subcommand)]
    Rsync(rsync::RsyncCmd),
    /// Cluster: the nodes sharing this keyhaven's database and the leader.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Write an encrypted backup (database, master key, sshd host keys, TLS
    /// material) of the data dir; works whether or not the daemon runs.
    Backup(backup::BackupArgs),
    /// Restore an encrypted backup into the data dir (stop the daemon first).
    Restore(backup::RestoreArgs),
    /// The store itself: `store migrate` copies an installation between the
    /// embedded SQLite database and PostgreSQL (either way).
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Re-encrypt every stored secret under a new master key (stop the daemon first).
    RotateMasterKey {
        #[command(flatten)]
        common: Common,
    },
    /// Print a commented config file: every setting, what it means and its default.
    ConfigTemplate,
    /// Print the configuration table (Markdown) that README.md carries.
    #[command(hide = true)]
    SettingsTable,
    /// Write what the Debian package ships besides the binary (config file,
    /// man pages, shell completions) into DIR.
    #[command(hide = true)]
    PackageFiles { dir: PathBuf },
}

/// The configuration from the flags given (flag > environment > `--config` file > default).
pub fn resolve_config<const SERVE: bool>(flags: &SettingFlags<SERVE>) -> Result<Config, String> {
    resolve(flags).map_err(|e| e.to_string())
}

fn resolve<const SERVE: bool>(flags: &SettingFlags<SERVE>) -> Result<Config, keyhaven_server::config::ConfigError> {
    Config::resolve(&flags.values, &|k| std::env::var(k).ok(), flags.config.as_deref())
}

/// Logs on stderr: lines for people, or one JSON object per line
/// (`log_format = "json"`) for journald or Loki. Returns how to switch the
/// filter later (SIGHUP reload).
fn init_logging(cfg: &Config) -> keyhaven_server::startup::SetLogFilter {
    use keyhaven_server::startup::LogFilterError;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&cfg.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    // The two formats are two subscriber types, each with its own handle.
    type Switch = Box<dyn Fn(EnvFilter) -> Result<(), LogFilterError> + Send + Sync>;
    let reload: Switch = match cfg.log_format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = builder.try_init();
            Box::new(move |f| handle.reload(f).map_err(|e| LogFilterError::Switch(e.into())))
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = builder.try_init();
            Box::new(move |f| handle.reload(f).map_err(|e| LogFilterError::Switch(e.into())))
        }
    };
    Box::new(move |f| {
        reload(
            EnvFilter::try_new(f)
                .map_err(|e| LogFilterError::NotAFilter { filter: f.to_string(), source: e.into() })?,
        )
    })
}

pub fn run() -> Result<ExitCode, String> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { flags } => {
            let cfg = resolve_config(&flags)?;
            let set_log_filter = init_logging(&cfg);
            let reload =
                keyhaven_server::startup::Reload { resolve: Box::new(move || resolve(&flags)), set_log_filter };
            // Before any thread starts: a listener handed over by a restart in place.
            keyhaven_server::backup::restart::adopt_inherited_listener();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(keyhaven_server::startup::serve(cfg, reload)).map_err(|e| e.to_string())?;
            if keyhaven_server::backup::restart::pending() {
                // Onto the restored state (config.upload): same pid, same listener.
                rt.shutdown_timeout(std::time::Duration::from_secs(5));
                return Err(format!(
                    "restarting after the restore failed: {}",
                    keyhaven_server::backup::restart::exec_self()
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Call(args) => call::run(args),
        Cmd::Keypair(k) => keypair::run(k),
        Cmd::Rsync(r) => rsync::run(r),
        Cmd::Cluster(c) => cluster::run(c),
        Cmd::Backup(a) => backup::backup(a),
        Cmd::Restore(a) => backup::restore(a),
        Cmd::Store(s) => store::run(s),
        Cmd::RotateMasterKey { common } => {
            let cfg = resolve_config(&common)?;
            let _ = init_logging(&cfg);
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
        Cmd::ConfigTemplate => {
            print!("{}", keyhaven_server::config::toml_template(&[]));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SettingsTable => {
            print!("{}", keyhaven_server::config::markdown_table());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::PackageFiles { dir } => {
            package::write(&dir, Cli::command())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn setting_flags_come_from_the_declared_settings() {
        let cli = Cli::try_parse_from(["keyhaven", "serve", "--listen", "127.0.0.1:0", "--data-dir", "/d"]).unwrap();
        let Cmd::Serve { flags } = cli.cmd else { panic!("not serve") };
        assert_eq!(flags.values.get("data_dir").map(String::as_str), Some("/d"));
        assert_eq!(flags.values.get("listen").map(String::as_str), Some("127.0.0.1:0"));
        let cfg = resolve_config(&flags).unwrap();
        assert_eq!(cfg.listen.port(), 0);

        // Every flagged setting is a flag of `serve`, with its doc as help.
        let mut cmd = Cli::command();
        let serve = cmd.find_subcommand_mut("serve").unwrap();
        for def in SETTINGS.iter().filter(|d| d.flag.is_some()) {
            let arg = serve.get_arguments().find(|a| a.get_id() == def.name).unwrap();
            assert_eq!(arg.get_long().map(|l| format!("--{l}")).as_deref(), def.flag);
            assert!(arg.get_help().unwrap().to_string().starts_with(def.doc));
        }

        // Other subcommands take only the data directory's flag.
        let e = Cli::try_parse_from(["keyhaven", "rotate-master-key", "--listen", "127.0.0.1:0"]).err().unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
        let cli = Cli::try_parse_from(["keyhaven", "rotate-master-key", "--data-dir", "/d", "--config", "/c"]).unwrap();
        let Cmd::RotateMasterKey { common } = cli.cmd else { panic!("not rotate-master-key") };
        assert_eq!(common.values.keys().copied().collect::<Vec<_>>(), ["data_dir"]);
        assert_eq!(common.config.as_deref(), Some(std::path::Path::new("/c")));
    }

    #[test]
    fn package_files_come_from_the_command_line_and_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        package::write(dir.path(), Cli::command()).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        // A man page per visible subcommand, each flag of serve in its page.
        for sub in Cli::command().get_subcommands().filter(|s| !s.is_hide_set()) {
            read(&format!("man/keyhaven-{}.1", sub.get_name()));
        }
        assert!(!dir.path().join("man/keyhaven-package-files.1").exists());
        let serve = read("man/keyhaven-serve.1");
        let (bash, zsh, fish) =
            (read("completions/keyhaven.bash"), read("completions/_keyhaven"), read("completions/keyhaven.fish"));
        for flag in SETTINGS.iter().filter_map(|d| d.flag) {
            assert!(serve.contains(&flag.replace('-', "\\-")), "{flag} not in keyhaven-serve.1");
            assert!(bash.contains(flag) && zsh.contains(flag), "{flag} not completed");
            assert!(fish.contains(&format!("-l {}", &flag[2..])), "{flag} not completed by fish");
        }
        // The config file parses and points at the package's data dir.
        let cfg = Config::resolve(&BTreeMap::new(), &|_| None, Some(&dir.path().join("keyhaven.toml"))).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from(package::PACKAGE_DATA_DIR));
    }
}
