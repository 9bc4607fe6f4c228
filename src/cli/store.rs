//! `keyhaven store migrate`: copy an installation from the embedded SQLite
//! database of a data dir into an empty PostgreSQL database, or back (see
//! `keyhaven_store::migrate`). The source may keep running; the destination
//! must be empty and is written all at once, verified, or not at all.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use keyhaven_store::migrate::{self, MigrateReport, Progress};
use keyhaven_store::MASTER_KEY_FILE;

use super::{resolve_config, Common};

#[derive(Subcommand)]
pub enum StoreCmd {
    /// Copy every record between a data dir's SQLite database and an empty
    /// PostgreSQL database (either way), ids and sealed secrets included,
    /// and verify the copy before committing it. The source may keep running.
    Migrate(MigrateArgs),
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    common: Common,
    /// Where to copy from: a data dir (its keyhaven.db and master.key) or a
    /// postgres:// URL.
    #[arg(long, value_name = "DIR|URL")]
    from: String,
    /// Where to copy to: an empty postgres:// database, or a data dir
    /// without keyhaven rows (created if missing).
    #[arg(long, value_name = "DIR|URL")]
    to: String,
    /// From PostgreSQL: the master key the database is sealed with [default:
    /// master.key in the data dir]; it is copied into the destination dir.
    #[arg(long, value_name = "FILE")]
    master_key: Option<PathBuf>,
}

fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

pub fn run(cmd: StoreCmd) -> Result<ExitCode, String> {
    match cmd {
        StoreCmd::Migrate(a) => migrate(a),
    }
}

fn migrate(a: MigrateArgs) -> Result<ExitCode, String> {
    let refused = |e: keyhaven_store::StoreError| format!("store migrate failed, nothing was copied: {e}");
    let progress: Progress = Box::new(|table, rows| println!("  {table:<20} {rows:>9} rows"));
    let started = std::time::Instant::now();
    let report = match (is_url(&a.from), is_url(&a.to)) {
        (false, true) => {
            if a.master_key.is_some() {
                return Err(
                    "--master-key applies to a PostgreSQL source; a data dir's key is its own master.key".into()
                );
            }
            let dir = PathBuf::from(&a.from);
            if !dir.join(keyhaven_store::DB_FILE).exists() {
                return Err(format!(
                    "store migrate failed, nothing was copied: {} holds no {}; --from names the data dir of the installation to copy",
                    dir.display(),
                    keyhaven_store::DB_FILE
                ));
            }
            println!("copying {} into PostgreSQL (a snapshot: keyhaven may keep running)", dir.display());
            migrate::sqlite_to_postgres(&dir, &a.to, progress).map_err(refused)?
        }
        (true, false) => {
            let cfg = resolve_config(&a.common)?;
            let dir = PathBuf::from(&a.to);
            let sock = keyhaven_server::transport::unix::socket_path(&dir);
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return Err(format!(
                    "keyhaven is running in {} ({} answers); migrate into a data dir no daemon uses",
                    dir.display(),
                    sock.display()
                ));
            }
            keyhaven_server::startup::prepare_data_dir(&dir).map_err(|e| e.to_string())?;
            let key = a.master_key.clone().unwrap_or_else(|| cfg.data_dir.join(MASTER_KEY_FILE));
            println!("copying PostgreSQL into {} (one snapshot: nodes may keep running)", dir.display());
            migrate::postgres_to_sqlite(&a.from, &key, &dir, progress).map_err(refused)?
        }
        (true, true) => {
            return Err(
                "both --from and --to are PostgreSQL: copy between databases with pg_dump | psql (keep master.key)"
                    .into(),
            )
        }
        (false, false) => {
            return Err("both --from and --to are data dirs: copy one with keyhaven backup and keyhaven restore".into())
        }
    };
    print_summary(&report, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

fn print_summary(r: &MigrateReport, took: std::time::Duration) {
    let rows: u64 = r.tables.iter().map(|(_, n)| n).sum();
    println!(
        "copied {rows} rows in {} tables from {} to {} in {:.2} s; verified: every row equal, {} sealed secrets decrypt to the same bytes",
        r.tables.len(),
        r.from,
        r.to,
        took.as_secs_f64(),
        r.secrets_verified
    );
}
