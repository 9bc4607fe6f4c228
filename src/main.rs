//! `keyhaven`: the single binary. `serve` runs the daemon; `call` is a generic
//! API client (like TrueNAS's `midclt call`); the other subcommands are thin,
//! human-friendly wrappers around API calls or offline maintenance.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // glibc gives each thread that allocates its own arena; with tokio's worker
    // and blocking threads that multiplies resident memory without speeding
    // anything up here. Two arenas keep RSS small.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyhaven: {e}");
            ExitCode::from(1)
        }
    }
}
