//! `keychaincredential.*`: SSH key pairs and SSH connections (reference §2–3).
//! This file declares the methods and the attribute shapes they share;
//! `crud`, `connections` and `setup` hold the handlers.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::params::{decode, Secret, Str};
use super::{query, to_json, Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;
use crate::service::keychain::{self, AttributesInput, SSH_CREDENTIALS, SSH_KEY_PAIR};
use crate::service::pairing;
use keyhaven_core::keys::{GenerateOptions, KeyAlgorithm};
use keyhaven_core::net::ConnectTimeout;

mod connections;
mod crud;
mod setup;

use connections::*;
use crud::*;
use setup::*;

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("keychaincredential.query", Read, query_m, 2, heavy),
        method!("keychaincredential.get_instance", Read, get_instance, 2),
        method!("keychaincredential.get_of_type", Write, get_of_type, 2),
        method!("keychaincredential.create", Write, create, 1),
        method!("keychaincredential.update", Write, update, 2),
        method!("keychaincredential.delete", Write, delete, 2),
        method!("keychaincredential.used_by", Read, used_by, 1),
        method!("keychaincredential.generate_ssh_key_pair", Write, generate_ssh_key_pair, 1),
        method!("keychaincredential.download_private_key", Write, download_private_key, 2),
        method!("keychaincredential.remote_ssh_host_key_scan", Write, remote_ssh_host_key_scan, 1),
        method!(
            "keychaincredential.remote_ssh_host_key_scan_fingerprints",
            Write,
            remote_ssh_host_key_scan_fingerprints,
            1
        ),
        method!("keychaincredential.test_ssh_connection", Write, test_ssh_connection, 2),
        method!("keychaincredential.ssh_connection_status", Read, ssh_connection_status, 2, heavy),
        method!("keychaincredential.ssh_pair", Write, ssh_pair, 1),
        method!("keychaincredential.remote_ssh_semiautomatic_setup", Write, remote_ssh_semiautomatic_setup, 1),
        method!("keychaincredential.setup_ssh_connection", Write, setup_ssh_connection, 1),
        method!("keychaincredential.re_pair_ssh_connection", Write, re_pair_ssh_connection, 2),
    ]
}

const CREATE: &str = "keychain_credential_create";
const UPDATE: &str = "keychain_credentials_update";

use crate::service::input::{default_connect_timeout as default_timeout, KeyOptionsIn, SshEndpoint};
fn default_user() -> Str {
    Str("root".into())
}

/// Decode `attributes` of `kind` into the keychain's input (TrueNAS's shape).
pub fn decode_attributes(kind: &str, v: Value, schema: &str) -> Result<AttributesInput, ServiceError> {
    let prefix = format!("{schema}.attributes");
    if kind == SSH_KEY_PAIR {
        Ok(AttributesInput::KeyPair(decode(v, &prefix)?))
    } else {
        Ok(AttributesInput::Connection(decode(v, &prefix)?))
    }
}
