//! Host-key lines: the pinned `remote_host_key` text of an `SSH_CREDENTIALS` entry.

use super::*;

/// One pinned host key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostKeyLine {
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`, ...
    pub key_type: String,
    /// The key blob, canonical base64.
    pub base64: String,
    /// `SHA256:...` as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

impl HostKeyLine {
    /// `"type base64"`.
    pub fn to_line(&self) -> String {
        format!("{} {}", self.key_type, self.base64)
    }
}

/// Parse the `remote_host_key` text: blank lines and `#` lines are skipped; each other
/// line is `"[host-field ]type base64[ comment]"` (a known_hosts host field such as
/// `[127.0.0.1]:2222` is dropped). Errors carry the 1-based line number.
///
/// Text without any key line gives `Ok(vec![])`; callers that need a key check for it.
pub fn parse_host_key_lines(text: &str) -> Result<Vec<HostKeyLine>, (usize, String)> {
    if is_private_key_text(text) {
        return Err((
            1,
            "This is a private key. Give the remote host's public host keys instead (lines \
             such as \"ssh-ed25519 AAAA...\", e.g. from ssh-keyscan)"
                .to_string(),
        ));
    }
    if text.len() > MAX_HOST_KEY_TEXT_LEN {
        return Err((1, "The host key text is too long".to_string()));
    }
    if let Err(e) = text::check_multi_line(text) {
        return Err((e.line.unwrap_or(1), e.reason()));
    }
    let mut out = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let n = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.len() > MAX_PUBLIC_KEY_LEN {
            return Err((n, "The line is too long for a host key".to_string()));
        }
        if line.starts_with('@') {
            return Err((
                n,
                "known_hosts markers (@cert-authority, @revoked) are not supported; give plain \
                 host keys"
                    .to_string(),
            ));
        }
        let (mut key_type, mut rest) = split_token(line);
        if !is_key_type_name(key_type) {
            // A known_hosts host field ("host", "[host]:port", "|1|hash").
            (key_type, rest) = split_token(rest);
        }
        if key_type.is_empty() {
            return Err((
                n,
                "Expected a host key line: \"[host ]type base64[ comment]\", e.g. \
                 \"ssh-ed25519 AAAA...\""
                    .to_string(),
            ));
        }
        if !is_key_type_name(key_type) {
            return Err((
                n,
                format!(
                    "Unknown key type {}; expected e.g. ssh-ed25519, ecdsa-sha2-nistp256 or \
                     ssh-rsa",
                    quote_if_type_like(key_type)
                ),
            ));
        }
        if key_type.ends_with(CERT_SUFFIX) {
            return Err((n, "Host certificates are not supported; give the plain host key".into()));
        }
        let (b64, _comment) = split_token(rest);
        if b64.is_empty() {
            return Err((n, format!("The {key_type} key data (base64) is missing")));
        }
        let key_data =
            decode_key_blob(key_type, b64).map_err(|why| (n, format!("Invalid {key_type} host key: {why}")))?;
        let blob = key_data.encode_vec().map_err(|_| (n, format!("Invalid {key_type} host key")))?;
        out.push(HostKeyLine {
            key_type: key_type.to_string(),
            base64: STANDARD.encode(blob),
            fingerprint: fingerprint(&key_data),
        });
    }
    Ok(out)
}
