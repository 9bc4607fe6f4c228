//! The process's effective user id: the one place keyhaven asks for it
//! (through rustix, no `unsafe`), for every ownership and privilege check.

/// The effective uid of this process.
pub fn effective() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
