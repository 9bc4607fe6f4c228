//! keyhaven's ssh layer: the russh client (host-key scan, connection test,
//! login with pinned host keys) and the supervision of OpenSSH's sshd
//! (`sshd -t`, start, SIGHUP reload, stop, restart with backoff).
//!
//! It knows nothing about API types: callers pass plain values and get typed
//! results and errors.

pub mod client;
pub mod supervisor;
