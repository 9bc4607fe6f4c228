//! Value types of caller input, shared by the API edge (which decodes
//! parameters into them) and the services (whose input structs are built from
//! them): capped strings, secrets that `Debug` does not show, and the field
//! blocks several inputs share ([`SshEndpoint`], [`KeyOptionsIn`]).

use std::fmt;
use std::ops::Deref;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize};

use keyhaven_core::error::ValidationErrors;
use keyhaven_core::net::{ConnectTimeout, Port};

/// Cap of plain strings, as TrueNAS's models.
pub const STR_MAX: usize = 1024;

/// A string of at most [`STR_MAX`] characters.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Str(pub String);

impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Deref for Str {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.chars().count() > STR_MAX {
            return Err(serde::de::Error::custom(format!("String should have at most {STR_MAX} characters")));
        }
        Ok(Str(s))
    }
}

/// A secret string parameter (password, token, OTP): redacted in Debug, zeroed on
/// drop, not `Clone`.
#[derive(Default)]
pub struct Secret(pub secrecy::SecretString);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.chars().count() > STR_MAX {
            return Err(serde::de::Error::custom(format!("String should have at most {STR_MAX} characters")));
        }
        Ok(Secret(secrecy::SecretString::from(s)))
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret;
        self.0.expose_secret()
    }
}

/// Secret text of any length (an imported private key): redacted in `Debug`,
/// zeroed when dropped. Its size is bounded by the request size limit.
pub struct SecretText(pub secrecy::SecretString);

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(SecretText(secrecy::SecretString::from(String::deserialize(d)?)))
    }
}

/// A plain string of at most [`STR_MAX`] characters, for `deserialize_with`.
pub fn capped<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Str::deserialize(d).map(|s| s.0)
}

/// An optional capped string (absent or null: `None`), for `deserialize_with`
/// (with `#[serde(default)]`).
pub fn capped_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<Str>::deserialize(d).map(|s| s.map(|s| s.0))
}

/// An optional list of capped strings, for `deserialize_with` (with `#[serde(default)]`).
pub fn capped_list_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Option::<Vec<Str>>::deserialize(d).map(|l| l.map(|l| l.into_iter().map(|s| s.0).collect()))
}

/// A field that may be absent (`None`: unchanged), null (`Some(None)`:
/// cleared) or set, for `deserialize_with` (with `#[serde(default)]`).
pub fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// [`nullable`] for a capped string.
pub fn capped_nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<Str>::deserialize(d).map(|s| Some(s.map(|s| s.0)))
}

/// Any JSON value, kept only when it is an integer id (TrueNAS clients send
/// `group` as an id; other shapes are accepted and ignored).
pub fn lenient_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<serde_json::Value>::deserialize(d).map(|v| v.as_ref().and_then(serde_json::Value::as_i64))
}

/// TrueNAS's defaults for an SSH target.
pub fn default_port() -> i64 {
    i64::from(keyhaven_core::net::Port::SSH.get())
}

pub fn default_username() -> String {
    "root".into()
}

pub fn default_connect_timeout() -> i64 {
    keyhaven_core::net::ConnectTimeout::DEFAULT.secs() as i64
}

/// Errors of a field inside a `#[serde(flatten)]` block begin with this and
/// the field's name: serde reports a flattened block's errors at the
/// enclosing struct, so these fields name themselves and
/// [`crate::api::params::decode`] moves the name back into the path.
pub const FLAT_FIELD: &str = "flattened field `";

/// Decode a field of a flattened block so that its errors name it (see [`FLAT_FIELD`]).
fn flat_field<'de, T: Deserialize<'de>, D: Deserializer<'de>>(field: &str, d: D) -> Result<T, D::Error> {
    T::deserialize(d).map_err(|e| serde::de::Error::custom(format_args!("{FLAT_FIELD}{field}`: {e}")))
}

fn host_field<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    flat_field::<Str, D>("host", d).map(|s| s.0)
}

fn port_field<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    flat_field("port", d)
}

fn connect_timeout_field<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    flat_field("connect_timeout", d)
}

fn key_type_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Str>, D::Error> {
    flat_field("key_type", d)
}

fn size_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    flat_field("size", d)
}

/// Where an SSH server listens and how long to wait for it: TrueNAS's
/// `host`, `port` (22) and `connect_timeout` (10), the one declaration of
/// these fields, used with `#[serde(flatten)]` by every input that names an
/// SSH server (host-key scans, connections, manual setup).
///
/// A flattened block must not itself flatten another: serde then reads it
/// as a map that leaves its fields to the enclosing struct, whose
/// `deny_unknown_fields` refuses them.
///
/// The numbers are decoded as sent and checked by [`SshEndpoint::check`]
/// (ranges of [`Port`] and [`ConnectTimeout`]), so that one reply names every
/// out-of-range value together with the request's other problems, as
/// TrueNAS does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SshEndpoint {
    #[serde(deserialize_with = "host_field")]
    pub host: String,
    #[serde(default = "default_port", deserialize_with = "port_field")]
    pub port: i64,
    #[serde(default = "default_connect_timeout", deserialize_with = "connect_timeout_field")]
    pub connect_timeout: i64,
}

impl SshEndpoint {
    /// The port and timeout as checked values; errors are named relative to
    /// the block (`port`, `connect_timeout`): the caller places them.
    pub fn check(&self) -> Result<(Port, ConnectTimeout), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        let port = errs.take("port", Port::new(self.port));
        let timeout = errs.take("connect_timeout", ConnectTimeout::new(self.connect_timeout));
        match (port, timeout) {
            (Some(p), Some(t)) => Ok((p, t)),
            _ => Err(errs),
        }
    }
}

/// The options of a key pair generated on the caller's behalf (pairing,
/// re-pairing): keyhaven's `key_type` (`ED25519` by default, `ECDSA`, `RSA`)
/// and `size`.
///
/// Used with `#[serde(flatten)]` (by `generate_ssh_key_pair`, pairing's
/// `private_key` and re-pairing's `new_key`), so its fields name themselves.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct KeyOptionsIn {
    #[serde(default, deserialize_with = "key_type_field")]
    pub key_type: Option<Str>,
    #[serde(default, deserialize_with = "size_field")]
    pub size: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct WithTarget {
        #[serde(flatten)]
        endpoint: SshEndpoint,
        key: i64,
    }

    #[test]
    fn flattened_endpoint_takes_defaults_and_names_its_fields() {
        let v: WithTarget = serde_json::from_value(json!({"host": "h", "key": 1})).unwrap();
        assert_eq!(v.endpoint, SshEndpoint { host: "h".into(), port: 22, connect_timeout: 10 });
        assert_eq!(v.key, 1);
        let e = serde_json::from_value::<WithTarget>(json!({"host": "h", "key": 1, "port": "22"})).unwrap_err();
        assert!(e.to_string().starts_with("flattened field `port`: invalid type"), "{e}");
        let e = serde_json::from_value::<WithTarget>(json!({"host": "h", "key": 1, "bogus": 1})).unwrap_err();
        assert!(e.to_string().starts_with("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn endpoint_check_names_every_range_relative() {
        let ep = SshEndpoint { host: "h".into(), port: 0, connect_timeout: 301 };
        let errs = ep.check().unwrap_err();
        let attrs: Vec<&str> = errs.0.iter().map(|e| e.attribute.as_str()).collect();
        assert_eq!(attrs, ["port", "connect_timeout"]);
        let ok = SshEndpoint { host: "h".into(), port: 2222, connect_timeout: 5 }.check().unwrap();
        assert_eq!((ok.0.get(), ok.1.secs()), (2222, 5));
    }
}
