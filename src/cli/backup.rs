//! `keyhaven backup` and `keyhaven restore`: encrypted backups of the data dir
//! (see `keyhaven_server::backup` for the format).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use keyhaven_server::backup;

use super::{resolve_config, Common};

#[derive(Args)]
pub struct BackupArgs {
    #[command(flatten)]
    common: Common,
    /// The backup file to write (created 0600; replaced only once complete).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// A file holding the passphrase to encrypt with (one line).
    #[arg(long, value_name = "FILE")]
    passphrase_file: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    common: Common,
    /// The backup file to restore.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// A file holding the passphrase the backup is encrypted with (one line).
    #[arg(long, value_name = "FILE")]
    passphrase_file: PathBuf,
}

pub fn backup(a: BackupArgs) -> Result<ExitCode, String> {
    let cfg = resolve_config(&a.common)?;
    if cfg.database.is_postgres() {
        return Err(format!(
            "backup failed, no file was written: {}",
            keyhaven_store::StoreError::BackupOnPostgres { target: cfg.database.masked() }
        ));
    }
    let pass = backup::read_passphrase_file(&a.passphrase_file).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let s = backup::create::create_backup_file(&cfg.data_dir, &a.out, &pass)
        .map_err(|e| format!("backup failed, no file was written: {e}"))?;
    let size = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({size} bytes, schema version {}, {} parts: {}) in {:.2} s",
        a.out.display(),
        s.schema_version,
        s.parts.len(),
        s.parts.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn restore(a: RestoreArgs) -> Result<ExitCode, String> {
    let cfg = resolve_config(&a.common)?;
    let sock = keyhaven_server::transport::unix::socket_path(&cfg.data_dir);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        return Err(format!(
            "keyhaven is running ({} answers); stop it first (systemctl stop keyhaven), then run restore again",
            sock.display()
        ));
    }
    let pass = backup::read_passphrase_file(&a.passphrase_file).map_err(|e| e.to_string())?;
    // Restoring into a new, empty data dir is how a lost system comes back.
    keyhaven_server::startup::prepare_data_dir(&cfg.data_dir).map_err(|e| e.to_string())?;
    let (m, previous) =
        backup::restore::restore_offline(&cfg.data_dir, &a.input, &pass).map_err(|e| format!("restore failed: {e}"))?;
    println!(
        "restored the backup made by keyhaven {} at {} (schema version {}) into {}",
        m.keyhaven_version,
        m.created,
        m.schema_version,
        cfg.data_dir.display()
    );
    if let Some(p) = previous {
        println!("the state it replaced is in {} until keyhaven next starts, then removed", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
