//! keyhaven's integration tests: one binary (like ripgrep's), real daemons,
//! real sockets. Modules follow the capabilities they test.

#[macro_use]
mod util;

mod accounts;
mod api_auth;
mod api_protocol;
mod backup;
mod badinput;
mod cluster;
mod cluster_sync;
mod daemon;
mod hostile;
mod hostile_cluster;
mod hostile_home;
mod hostile_sshd;
mod keychain;
mod monitoring;
mod package;
mod pairing;
mod postgres;
mod rsync;
mod service;
mod sshd;
mod store_migrate;
mod ui;
mod upgrade;
