//! keyhaven's domain layer: pure rules with no I/O, no async and no SQL.
//!
//! Everything here is deterministic given its inputs (key generation takes its
//! randomness from the OS RNG, which is the one exception), so every rule can be
//! tested on its own: the TrueNAS query engine, SSH key parsing, validation,
//! generation and fingerprints, authorized_keys lines, host-key lines, the
//! rendering of `sshd_config`, and the control-character rule for text fields.

#![forbid(unsafe_code)]

pub mod authorized_keys;
pub mod error;
pub mod keys;
pub mod net;
pub mod query;
pub mod rsync;
pub mod sshd_config;
pub mod text;

pub use error::{FieldError, ValidationErrors};
