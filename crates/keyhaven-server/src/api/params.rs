//! Strict decoding of positional JSON-RPC parameters into typed arguments.
//!
//! Like TrueNAS's pydantic models: no type coercion, unknown fields refused,
//! plain strings capped at 1024 characters ([`Str`]) while long texts
//! (keys, sshpubkey, options) use `String`. Every failure is a field-named
//! validation error `<schema>.<path>`.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ServiceError;
use keyhaven_core::error::FieldError;

use crate::service::input::FLAT_FIELD;
pub use crate::service::input::{Secret, SecretText, Str, STR_MAX};

/// Turn serde's message into TrueNAS/pydantic wording.
fn pydantic_message(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let expected = rest.split("expected ").nth(1).unwrap_or("").trim_end_matches(['.', ' ']);
        let what = if expected.contains("string") || expected.contains("Str") {
            "Input should be a valid string"
        } else if expected.contains("bool") {
            "Input should be a valid boolean"
        } else if expected.contains("integer") || expected.starts_with("i64") || expected.starts_with("u") {
            "Input should be a valid integer"
        } else if expected.contains("sequence") || expected.contains("array") {
            "Input should be a valid list"
        } else if expected.contains("map") || expected.contains("struct") {
            "Input should be a valid dictionary"
        } else {
            return format!("Input should be {expected}");
        };
        return what.to_string();
    }
    if msg.starts_with("unknown field") {
        return "Extra inputs are not permitted".into();
    }
    if msg.starts_with("missing field") {
        return "Field required".into();
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        // "unknown variant `X`, expected one of `A`, `B`"
        let expected = rest.split("expected ").nth(1).unwrap_or("").replace('`', "'");
        return format!("Input should be {expected}");
    }
    if msg.starts_with("invalid value: integer") {
        return "Input should be a valid integer in range".into();
    }
    msg.to_string()
}

fn backticked(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let end = start + msg[start..].find('`')?;
    Some(&msg[start..end])
}

/// Decode one value against a schema name, mapping errors to `<schema>.<path>`.
pub fn decode<T: DeserializeOwned>(v: Value, schema: &str) -> Result<T, ServiceError> {
    // serde lets a derived struct be read from a JSON array (as a tuple);
    // pydantic does not. Every non-list parameter type is refused an array.
    if v.is_array() && !std::any::type_name::<T>().contains("Vec<") {
        return Err(ServiceError::Validation(FieldError::new(schema, "Input should be a valid dictionary").into()));
    }
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let mut path = e.path().to_string();
        let mut inner = e.inner().to_string();
        // A field of a flattened block names itself (see `FLAT_FIELD`).
        if let Some((field, rest)) = inner.strip_prefix(FLAT_FIELD).and_then(|r| r.split_once("`: ")) {
            path = if path == "." || path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
            inner = rest.to_string();
        }
        // serde_path_to_error points at the struct for unknown or missing fields.
        if inner.starts_with("unknown field") || inner.starts_with("missing field") {
            if let Some(f) = backticked(&inner) {
                if !path.ends_with(f) {
                    path = if path == "." || path.is_empty() { f.to_string() } else { format!("{path}.{f}") };
                }
            }
        }
        let path = path.replace('[', ".").replace(']', "");
        let path = path.trim_matches('.').replace("..", ".");
        let attr = if path.is_empty() { schema.to_string() } else { format!("{schema}.{path}") };
        let msg = pydantic_message(inner.split(" at line ").next().unwrap_or(&inner));
        ServiceError::Validation(FieldError::new(attr, msg).into())
    })
}

/// The positional parameters of one call.
#[derive(Debug, Clone, Default)]
pub struct Params(pub Vec<Value>);

impl Params {
    /// A required argument.
    pub fn req<T: DeserializeOwned>(&self, idx: usize, schema: &str) -> Result<T, ServiceError> {
        match self.0.get(idx) {
            Some(v) => decode(v.clone(), schema),
            None => Err(ServiceError::field(schema, "Field required")),
        }
    }

    /// An optional argument: absent or null gives `T::default()`.
    pub fn opt<T: DeserializeOwned + Default>(&self, idx: usize, schema: &str) -> Result<T, ServiceError> {
        match self.0.get(idx) {
            None | Some(Value::Null) => Ok(T::default()),
            Some(v) => decode(v.clone(), schema),
        }
    }

    pub fn raw(&self, idx: usize) -> Option<&Value> {
        self.0.get(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: i64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: Str,
        #[serde(default)]
        flag: bool,
        attributes: Option<Inner>,
        #[serde(default)]
        tags: Vec<String>,
        mode: Option<Mode>,
        small: Option<u8>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    enum Mode {
        A,
        B,
    }

    fn err(v: Value) -> (String, String) {
        match decode::<Outer>(v, "x_create") {
            Err(ServiceError::Validation(v)) => (v.0[0].attribute.clone(), v.0[0].message.clone()),
            other => panic!("expected validation error, got {other:?}"),
        }
    }

    #[test]
    fn field_named_errors() {
        assert_eq!(
            err(serde_json::json!({"name": 5})),
            ("x_create.name".into(), "Input should be a valid string".into())
        );
        assert_eq!(
            err(serde_json::json!({"name": "a", "bogus": 1})),
            ("x_create.bogus".into(), "Extra inputs are not permitted".into())
        );
        assert_eq!(err(serde_json::json!({})), ("x_create.name".into(), "Field required".into()));
        assert_eq!(
            err(serde_json::json!({"name": "a", "attributes": {"port": "22"}})),
            ("x_create.attributes.port".into(), "Input should be a valid integer".into())
        );
        assert_eq!(
            err(serde_json::json!({"name": "a", "attributes": {"port": 1, "x": 1}})),
            ("x_create.attributes.x".into(), "Extra inputs are not permitted".into())
        );
        assert_eq!(
            err(serde_json::json!({"name": "a", "flag": 1})),
            ("x_create.flag".into(), "Input should be a valid boolean".into())
        );
        let long = "a".repeat(1025);
        assert_eq!(err(serde_json::json!({"name": long})).1, "String should have at most 1024 characters");
        assert_eq!(err(serde_json::json!([1])), ("x_create".into(), "Input should be a valid dictionary".into()));
        // Every kind of message serde produces, pinned: a serde release that
        // rewords one fails here, not in front of a TrueNAS client.
        assert_eq!(
            err(serde_json::json!({"name": "a", "tags": "x"})),
            ("x_create.tags".into(), "Input should be a valid list".into())
        );
        assert_eq!(
            err(serde_json::json!({"name": "a", "attributes": 5})),
            ("x_create.attributes".into(), "Input should be a valid dictionary".into())
        );
        assert_eq!(
            err(serde_json::json!({"name": "a", "mode": "C"})),
            ("x_create.mode".into(), "Input should be 'A' or 'B'".into())
        );
        assert_eq!(
            err(serde_json::json!({"name": "a", "small": 300})),
            ("x_create.small".into(), "Input should be a valid integer in range".into())
        );
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct WithTarget {
        #[serde(flatten)]
        endpoint: crate::service::input::SshEndpoint,
        #[serde(default)]
        username: Option<Str>,
        private_key: i64,
    }

    #[test]
    fn flattened_fields_keep_their_path() {
        let err = |v: Value| match decode::<WithTarget>(v, "x.attributes") {
            Err(ServiceError::Validation(v)) => (v.0[0].attribute.clone(), v.0[0].message.clone()),
            other => panic!("expected validation error, got {other:?}"),
        };
        let at = |k: &str, v: Value| {
            let mut o = serde_json::json!({"host": "h", "private_key": 1});
            o[k] = v;
            o
        };
        for (k, v, msg) in [
            ("port", serde_json::json!("22"), "Input should be a valid integer"),
            ("port", serde_json::json!(null), "Input should be a valid integer"),
            ("connect_timeout", serde_json::json!(1.5), "Input should be a valid integer"),
            ("username", serde_json::json!(5), "Input should be a valid string"),
            ("host", serde_json::json!("h".repeat(1025)), "String should have at most 1024 characters"),
            ("bogus", serde_json::json!(1), "Extra inputs are not permitted"),
        ] {
            assert_eq!(err(at(k, v)), (format!("x.attributes.{k}"), msg.to_string()), "{k}");
        }
        assert_eq!(err(serde_json::json!({"private_key": 1})), ("x.attributes.host".into(), "Field required".into()));
    }
}
