//! Public keys: parsing one-line public keys, their type, size, comment and `SHA256:` fingerprint.

use super::*;

/// What a public key is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// SSH key type name: `ssh-ed25519`, `ecdsa-sha2-nistp256` (`384`, `521`), `ssh-rsa`.
    pub key_type: String,
    pub algorithm: KeyAlgorithm,
    /// Size in bits as `ssh-keygen -l` prints it.
    pub bits: u32,
    pub comment: String,
    /// `SHA256:<base64 without padding>`, identical to `ssh-keygen -l`.
    pub fingerprint: String,
}

/// Why a key text or key was refused. Each message says what to give
/// instead; none contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{}", MSG_IS_PRIVATE)]
    IsPrivate,
    #[error("{}", MSG_NO_KEY)]
    NoKey,
    /// Not a one-line public key; the detail (possibly empty) says what it looks like instead.
    #[error("{}{detail}", MSG_INVALID_PUBLIC)]
    InvalidPublic { detail: &'static str },
    #[error(transparent)]
    Text(#[from] text::ControlCharError),
    #[error("RSA keys larger than {max} bits are not supported; this key has {0} bits", max = MAX_RSA_BITS)]
    RsaTooLarge(u32),
    #[error("RSA keys must be at least {min} bits; this key has {0} bits. {hint}", min = MIN_RSA_BITS, hint = MSG_GENERATE_NEW)]
    RsaTooSmall(u32),
    #[error("DSA keys are not supported: OpenSSH has disabled them. {}", MSG_GENERATE_NEW)]
    Dsa,
    #[error(
        "Security-key (FIDO, sk-...) keys are not supported: they need the hardware token at every use. {}.",
        MSG_SUPPORTED
    )]
    SecurityKey,
    #[error("SSH certificates are not supported here; use the plain public key (the .pub file without -cert)")]
    Certificate,
    /// Another key type, named (quoted when safe to show).
    #[error("Unsupported key type {0}. {supported}.", supported = MSG_SUPPORTED)]
    UnsupportedType(String),
    #[error("The public key could not be encoded")]
    EncodePublic,
    #[error("The private key could not be encoded in OpenSSH format")]
    EncodePrivate,
}

/// Type, size, comment and fingerprint of a one-line public key
/// (`"type base64[ comment]"`). Does not apply the minimum RSA size; the key type
/// must be Ed25519, ECDSA or RSA.
pub fn public_key_info(public_key_line: &str) -> Result<KeyInfo, KeyError> {
    if is_private_key_text(public_key_line) {
        return Err(KeyError::IsPrivate);
    }
    let (key_data, comment) = parse_public_line(public_key_line)?;
    key_info(&key_data, &comment)
}

pub(super) fn key_info(key_data: &KeyData, comment: &str) -> Result<KeyInfo, KeyError> {
    let (algorithm, bits) = classify(key_data)?;
    Ok(KeyInfo {
        key_type: key_data.algorithm().as_str().to_string(),
        algorithm,
        bits,
        comment: comment.to_string(),
        fingerprint: fingerprint(key_data),
    })
}

pub(super) fn fingerprint(key_data: &KeyData) -> String {
    key_data.fingerprint(HashAlg::Sha256).to_string()
}

/// Algorithm and size of a supported key, or a message saying why it is not supported.
pub(super) fn classify(key_data: &KeyData) -> Result<(KeyAlgorithm, u32), KeyError> {
    match key_data {
        KeyData::Ed25519(_) => Ok((KeyAlgorithm::Ed25519, 256)),
        KeyData::Ecdsa(k) => Ok((
            KeyAlgorithm::Ecdsa,
            match k.curve() {
                EcdsaCurve::NistP256 => 256,
                EcdsaCurve::NistP384 => 384,
                EcdsaCurve::NistP521 => 521,
            },
        )),
        KeyData::Rsa(k) => {
            let bits = mpint_bits(k.n().as_positive_bytes().unwrap_or_default());
            if bits > MAX_RSA_BITS {
                return Err(KeyError::RsaTooLarge(bits));
            }
            Ok((KeyAlgorithm::Rsa, bits))
        }
        KeyData::Dsa(_) => Err(KeyError::Dsa),
        KeyData::SkEd25519(_) | KeyData::SkEcdsaSha2NistP256(_) => Err(KeyError::SecurityKey),
        KeyData::Certificate(_) => Err(KeyError::Certificate),
        other => Err(KeyError::UnsupportedType(quote_if_safe(other.algorithm().as_str(), 64))),
    }
}

/// Bit length of a big-endian unsigned integer (like OpenSSL's `BN_num_bits`).
pub(super) fn mpint_bits(bytes: &[u8]) -> u32 {
    let mut b = bytes;
    while let [0, rest @ ..] = b {
        b = rest;
    }
    match b.first() {
        None => 0,
        Some(first) => (b.len() as u32 - 1) * 8 + (8 - first.leading_zeros()),
    }
}

/// `"type base64[ comment]\n"`.
pub(super) fn public_line(key_data: &KeyData, comment: &str) -> Result<String, KeyError> {
    let blob = key_data.encode_vec().map_err(|_| KeyError::EncodePublic)?;
    let mut s = format!("{} {}", key_data.algorithm().as_str(), STANDARD.encode(blob));
    let comment = sanitize_comment(comment);
    if !comment.is_empty() {
        s.push(' ');
        s.push_str(&comment);
    }
    s.push('\n');
    Ok(s)
}

/// One line, printable, at most [`MAX_COMMENT_CHARS`] characters.
///
/// Text the caller typed never reaches this with a control character (the
/// key text is refused first, see [`text::check_multi_line`]); what is still
/// replaced here is the comment stored inside a private key's binary body,
/// which is not text the caller can see or edit.
pub(super) fn sanitize_comment(comment: &str) -> String {
    let s: String = comment.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_COMMENT_CHARS).collect();
    s.trim().to_string()
}

pub(super) fn is_key_type_name(tok: &str) -> bool {
    let base = tok.strip_suffix(CERT_SUFFIX).unwrap_or(tok);
    KNOWN_KEY_TYPES.contains(&base)
}

/// Split off the first whitespace-separated token: `(token, rest_trimmed_start)`.
pub(super) fn split_token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

/// Decode `base64` as an SSH public key blob of type `key_type`.
pub(super) fn decode_key_blob(key_type: &str, b64: &str) -> Result<KeyData, &'static str> {
    let blob = STANDARD.decode(b64).map_err(|_| "the key data is not valid base64")?;
    let pk = PublicKey::from_bytes(&blob).map_err(|_| "the key data is not a valid SSH key")?;
    let key_data = pk.key_data().clone();
    if key_data.algorithm().as_str() != key_type && !key_data.is_certificate() {
        return Err("the key data does not match the key type");
    }
    if key_data.is_certificate() && !key_type.ends_with(CERT_SUFFIX) {
        return Err("the key data does not match the key type");
    }
    Ok(key_data)
}

/// Parse `"type base64[ comment]"` (one line).
pub(super) fn parse_public_line(text: &str) -> Result<(KeyData, String), KeyError> {
    let invalid = |detail| KeyError::InvalidPublic { detail };
    if text.len() > MAX_PUBLIC_KEY_LEN {
        return Err(invalid(": it is too long"));
    }
    // Refused rather than cleaned: a NUL or an escape sequence in the comment
    // would otherwise be stored (and shown) as something the caller did not send.
    text::check_multi_line(text)?;
    let t = text.trim();
    if t.is_empty() {
        return Err(KeyError::NoKey);
    }
    if t.contains("BEGIN SSH2 PUBLIC KEY") {
        return Err(invalid(
            ": this is an SSH2 (RFC 4716) public key; give the OpenSSH one-line form (ssh-keygen -i -f <file> \
             converts it)",
        ));
    }
    if t.contains("-----BEGIN") && t.contains("PUBLIC KEY-----") {
        return Err(invalid(
            ": this is a PEM public key; give the OpenSSH one-line form (ssh-keygen -i -m PKCS8 -f <file> converts it)",
        ));
    }
    if t.contains('\n') || t.contains('\r') {
        return Err(invalid(": give exactly one key on a single line (\"type base64 comment\")"));
    }
    let (key_type, rest) = split_token(t);
    if !is_key_type_name(key_type) {
        return Err(invalid(""));
    }
    let (b64, comment) = split_token(rest);
    if b64.is_empty() {
        return Err(invalid(""));
    }
    let key_data = decode_key_blob(key_type, b64).map_err(|_| invalid(""))?;
    if key_data.is_certificate() {
        return Err(KeyError::Certificate);
    }
    Ok((key_data, sanitize_comment(comment)))
}

/// Does the text look like a public key (line, PEM or SSH2 public block)?
pub(super) fn looks_like_public_key(text: &str) -> bool {
    if text.contains("PUBLIC KEY-----") || text.contains("BEGIN SSH2 PUBLIC KEY") {
        return true;
    }
    text.lines().any(|line| {
        let (first, rest) = split_token(line);
        let (second, _) = split_token(rest);
        is_key_type_name(first) || is_key_type_name(second)
    })
}

/// True if the text holds a private key: a `-----BEGIN ... PRIVATE KEY-----` armour
/// (OpenSSH, PEM, PKCS#8, also the SSH2 `---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----`)
/// or a PuTTY private key header. Other validators use this to refuse pasted private keys.
pub fn is_private_key_text(s: &str) -> bool {
    s.lines().any(|line| {
        let l = line.trim();
        l.starts_with("PuTTY-User-Key-File-")
            || (l.starts_with("---") && l.contains("BEGIN") && l.contains("PRIVATE KEY"))
    })
}
