//! keyhaven's service and transport layers.
//!
//! * [`service`] holds the use cases (auth, sessions, API keys, tokens, audit,
//!   jobs, keychain, users, the SSH service, pairing) and speaks in domain types
//!   and [`error::ServiceError`], never in wire formats.
//! * [`api`] declares every API method once (name, role, parameter schema) and
//!   decodes positional parameters strictly into typed arguments.
//! * [`transport`] carries [`api`] over JSON-RPC 2.0 (`/api/current`), TrueNAS's
//!   legacy dialect (`/websocket`), the download endpoints and the local
//!   unix socket used by `keyhaven call`.
//! * [`backup`] makes and restores encrypted backups of a data dir.
//! * [`remote`] is the client for another system's API (JSON-RPC or legacy),
//!   used by pairing and by `keyhaven call --url`.

pub mod api;
pub mod backup;
pub mod config;
pub mod error;
pub mod remote;
pub mod service;
pub mod startup;
pub mod transport;

pub use config::Config;
