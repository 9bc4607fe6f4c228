//! `keyhaven`: the single binary. `serve` runs the daemon; `call` is a generic
//! API client (like TrueNAS's `midclt call`); the other subcommands are thin,
//! human-friendly wrappers around API calls or offline maintenance.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyhaven: {e}");
            ExitCode::from(1)
        }
    }
}
