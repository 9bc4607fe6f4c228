//! keyhaven's ssh layer: the russh client (host-key scan, connection test,
//! login with pinned host keys), the supervision of OpenSSH's sshd
//! (`sshd -t`, start, SIGHUP reload, stop, restart with backoff), the files
//! sshd reads (authorized keys, host keys) and the OS accounts it needs.
//!
//! It knows nothing about API types: callers pass plain values and get typed
//! results and errors.

pub mod accounts;
pub mod agent;
pub mod client;
pub mod files;
pub mod reach;
pub mod rsync;
pub mod supervisor;
pub mod uid;
