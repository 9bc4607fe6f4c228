//! Value types of caller input, shared by the API edge (which decodes
//! parameters into them) and the services (whose input structs are built from
//! them): capped strings and secrets that `Debug` does not show.

use std::fmt;
use std::ops::Deref;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize};

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

/// A secret string parameter (password, token, OTP): redacted in Debug and zeroed on drop.
#[derive(Clone, Default)]
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
