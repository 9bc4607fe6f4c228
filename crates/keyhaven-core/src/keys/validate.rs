//! Validating an imported key pair (`SSH_KEY_PAIR`): the private/public match and normalisation.

use super::*;

/// Which attribute of a key pair an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPairField {
    PrivateKey,
    PublicKey,
    Passphrase,
}

impl KeyPairField {
    /// `"private_key"`, `"public_key"` or `"passphrase"`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPairField::PrivateKey => "private_key",
            KeyPairField::PublicKey => "public_key",
            KeyPairField::Passphrase => "passphrase",
        }
    }
}

impl fmt::Display for KeyPairField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed key-pair check. The message never contains key material or the passphrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPairError {
    pub field: KeyPairField,
    pub message: String,
}

impl KeyPairError {
    fn new(field: KeyPairField, message: impl fmt::Display) -> Self {
        Self { field, message: message.to_string() }
    }
    pub(super) fn private(message: impl fmt::Display) -> Self {
        Self::new(KeyPairField::PrivateKey, message)
    }
    fn public(message: impl fmt::Display) -> Self {
        Self::new(KeyPairField::PublicKey, message)
    }
    pub(super) fn passphrase(message: impl fmt::Display) -> Self {
        Self::new(KeyPairField::Passphrase, message)
    }

    /// As a [`FieldError`] on `field` (callers prefix the schema path).
    pub fn to_field_error(&self) -> FieldError {
        FieldError::new(self.field.as_str(), self.message.clone())
    }
}

impl fmt::Display for KeyPairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for KeyPairError {}

impl From<KeyPairError> for FieldError {
    fn from(e: KeyPairError) -> Self {
        FieldError::new(e.field.as_str(), e.message)
    }
}

/// A key pair that passed [`validate_key_pair`], normalised for storage. `Debug` does
/// not show the private key, and it cannot be cloned: the key has one owner.
pub struct ValidatedKeyPair {
    /// Unencrypted OpenSSH private key text ending in `\n`; `None` for a public-only pair.
    pub private_key: Option<Zeroizing<String>>,
    /// `"type base64[ comment]\n"`.
    pub public_key: String,
    pub info: KeyInfo,
}

impl fmt::Debug for ValidatedKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidatedKeyPair")
            .field("private_key", &self.private_key.as_ref().map(|_| "<redacted>"))
            .field("public_key", &self.public_key)
            .field("info", &self.info)
            .finish()
    }
}

/// Validate and normalise an imported key pair (see the module docs).
///
/// * A private key may be OpenSSH, PEM (PKCS#1 `RSA PRIVATE KEY`, SEC1 `EC PRIVATE KEY`,
///   including legacy OpenSSL encryption), PKCS#8 (plain or encrypted) or PuTTY;
///   Ed25519, ECDSA P-256/384/521 or RSA >= 2048 bits. It is stored decrypted, in
///   OpenSSH format; an OpenSSH key keeps its comment.
/// * An encrypted key needs `passphrase`; a passphrase given for an unencrypted key is ignored.
/// * With both keys, they must match (type and key data; comments are ignored). The
///   stored public key is the given one, else the one derived from the private key.
pub fn validate_key_pair(
    private_key: Option<&str>,
    public_key: Option<&str>,
    passphrase: Option<&str>,
) -> Result<ValidatedKeyPair, KeyPairError> {
    // Before trimming, so the line numbers are those of the text as sent.
    if let Some(Err(e)) = public_key.map(text::check_multi_line) {
        return Err(KeyPairError::public(e.to_string()));
    }
    if let Some(Err(e)) = private_key.map(text::check_multi_line) {
        return Err(KeyPairError::private(e.to_string()));
    }
    let private_key = private_key.map(str::trim).filter(|s| !s.is_empty());
    let public_key = public_key.map(str::trim).filter(|s| !s.is_empty());
    let passphrase = passphrase.filter(|p| !p.is_empty());
    if let Some(p) = passphrase {
        if p.len() > MAX_PASSPHRASE_LEN {
            return Err(KeyPairError::passphrase(format!("The passphrase must be at most {MAX_PASSPHRASE_LEN} bytes")));
        }
    }

    // The public key given, parsed first so its errors are reported even with a private key.
    let given_public = match public_key {
        None => None,
        Some(text) => {
            if is_private_key_text(text) {
                return Err(KeyPairError::public(MSG_IS_PRIVATE));
            }
            let (key_data, comment) = parse_public_line(text).map_err(KeyPairError::public)?;
            Some((key_data, comment))
        }
    };

    match private_key {
        Some(text) => {
            let key = parse_private_key(text, passphrase)?;
            check_supported(key.public_key().key_data()).map_err(KeyPairError::private)?;
            let derived = key.public_key().key_data();
            let (public_data, comment) = match given_public {
                Some((given, comment)) => {
                    if !same_key(&given, derived) {
                        return Err(KeyPairError::public(MSG_MISMATCH));
                    }
                    (given, comment)
                }
                None => (derived.clone(), sanitize_comment(key.comment().as_str_lossy())),
            };
            let public_text = public_line(&public_data, &comment).map_err(KeyPairError::public)?;
            let info = key_info(&public_data, &comment).map_err(KeyPairError::public)?;
            let private_text = openssh_text(&key).map_err(KeyPairError::private)?;
            Ok(ValidatedKeyPair { private_key: Some(private_text), public_key: public_text, info })
        }
        None => {
            let Some((key_data, comment)) = given_public else {
                return Err(KeyPairError::public(MSG_NO_KEY));
            };
            check_supported(&key_data).map_err(KeyPairError::public)?;
            let public_text = public_line(&key_data, &comment).map_err(KeyPairError::public)?;
            let info = key_info(&key_data, &comment).map_err(KeyPairError::public)?;
            Ok(ValidatedKeyPair { private_key: None, public_key: public_text, info })
        }
    }
}

/// Supported type and, for RSA, at least [`MIN_RSA_BITS`].
pub(super) fn check_supported(key_data: &KeyData) -> Result<(KeyAlgorithm, u32), KeyError> {
    let (alg, bits) = classify(key_data)?;
    if alg == KeyAlgorithm::Rsa && bits < MIN_RSA_BITS {
        return Err(KeyError::RsaTooSmall(bits));
    }
    Ok((alg, bits))
}

/// Same type and key data (comments are not part of [`KeyData`]).
pub(super) fn same_key(a: &KeyData, b: &KeyData) -> bool {
    match (a.encode_vec(), b.encode_vec()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

pub(super) fn openssh_text(key: &PrivateKey) -> Result<Zeroizing<String>, KeyError> {
    let mut text = key.to_openssh(LineEnding::LF).map_err(|_| KeyError::EncodePrivate)?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}
