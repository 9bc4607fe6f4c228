//! `keyhaven`: the single binary. `serve` runs the daemon; `call` is a generic
//! API client (like TrueNAS's `midclt call`); the other subcommands are thin,
//! human-friendly wrappers around API calls or offline maintenance.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    tune_allocator();
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyhaven: {e}");
            ExitCode::from(1)
        }
    }
}

/// glibc's allocator, tuned so that an idle daemon's memory is small and the
/// same from run to run (measured in the `perf` benchmark group). Set before
/// any thread starts, so every arena sees it.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; no allocation is live in
    // another thread yet.
    unsafe {
        // Each thread that allocates would get its own arena; with tokio's
        // worker and blocking threads that multiplies resident memory without
        // speeding anything up here.
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // Argon2 works in ~19 MiB blocks and large replies are megabytes:
        // served by mmap, they go back to the system as soon as they are
        // freed instead of staying in an arena (the dynamic threshold would
        // rise past them after the first free).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        // No fastbins: a free next to an arena's top always merges and lets
        // glibc shrink the arena. With fastbins, the frees that end a burst
        // could merge into the top only later, inside malloc_trim, which
        // does not shrink a thread arena's top: one run in ten kept ~25 MB
        // of free memory resident for good.
        libc::mallopt(libc::M_MXFAST, 0);
    }
}
