//! Key algorithms, generation options and generating new key pairs.

use super::*;

/// The key algorithms keyhaven generates and accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum KeyAlgorithm {
    /// Ed25519 (256 bits), the default.
    #[default]
    Ed25519,
    /// ECDSA on NIST P-256, P-384 or P-521.
    Ecdsa,
    /// RSA, 2048 bits or more.
    Rsa,
}

impl KeyAlgorithm {
    /// `"ED25519"`, `"ECDSA"` or `"RSA"` (the API spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Ed25519 => "ED25519",
            KeyAlgorithm::Ecdsa => "ECDSA",
            KeyAlgorithm::Rsa => "RSA",
        }
    }

    /// Size used when the caller gives none.
    pub fn default_bits(self) -> u32 {
        match self {
            KeyAlgorithm::Ed25519 => 256,
            KeyAlgorithm::Ecdsa => 256,
            KeyAlgorithm::Rsa => 3072,
        }
    }

    /// Sizes [`generate`] accepts for this algorithm.
    pub fn allowed_bits(self) -> &'static [u32] {
        match self {
            KeyAlgorithm::Ed25519 => &[256],
            KeyAlgorithm::Ecdsa => &[256, 384, 521],
            KeyAlgorithm::Rsa => &[2048, 3072, 4096],
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("ED25519") {
            Ok(KeyAlgorithm::Ed25519)
        } else if t.eq_ignore_ascii_case("ECDSA") {
            Ok(KeyAlgorithm::Ecdsa)
        } else if t.eq_ignore_ascii_case("RSA") {
            Ok(KeyAlgorithm::Rsa)
        } else {
            Err(format!("Unknown key type {}: use ED25519, ECDSA or RSA", quote_if_safe(t, 32)))
        }
    }
}

/// What to generate. `Default` is Ed25519 without a comment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GenerateOptions {
    pub algorithm: KeyAlgorithm,
    /// Key size in bits; `None` picks the algorithm's default (RSA 3072, ECDSA 256).
    pub bits: Option<u32>,
    pub comment: Option<String>,
}

/// Check the options of a key generation; returns the effective size in bits.
///
/// Errors name the attribute `size` or `comment`.
pub fn validate_generate_options(o: &GenerateOptions) -> Result<u32, FieldError> {
    let alg = o.algorithm;
    let bits = match o.bits {
        None => alg.default_bits(),
        Some(b) if alg.allowed_bits().contains(&b) => b,
        Some(b) => {
            let msg = match alg {
                KeyAlgorithm::Ed25519 => {
                    format!("Ed25519 keys are always 256 bits (got {b}); leave size empty")
                }
                KeyAlgorithm::Ecdsa => {
                    format!("ECDSA keys must be 256, 384 or 521 bits (got {b}); the default is 256")
                }
                KeyAlgorithm::Rsa => format!("RSA keys must be 2048, 3072 or 4096 bits (got {b}); the default is 3072"),
            };
            return Err(FieldError::new("size", msg));
        }
    };
    if let Some(c) = &o.comment {
        if c.chars().count() > MAX_COMMENT_CHARS {
            return Err(FieldError::new(
                "comment",
                format!("The comment must be at most {MAX_COMMENT_CHARS} characters"),
            ));
        }
        if let Err(e) = text::check_single_line(c) {
            return Err(FieldError::new("comment", format!("The comment {}: it must be a single line", e.reason())));
        }
    }
    Ok(bits)
}

/// A freshly generated key pair, as text. `Debug` does not show the private key,
/// and it cannot be cloned: the key has one owner.
pub struct KeyPairText {
    /// Unencrypted OpenSSH private key (`-----BEGIN OPENSSH PRIVATE KEY-----`), ending in `\n`.
    pub private_key: Zeroizing<String>,
    /// `"type base64[ comment]\n"`.
    pub public_key: String,
}

impl fmt::Debug for KeyPairText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPairText").field("private_key", &"<redacted>").field("public_key", &self.public_key).finish()
    }
}

/// Generate a key pair. Synchronous and CPU-bound: RSA-4096 can take seconds, so
/// async callers run it in `spawn_blocking`.
pub fn generate(o: &GenerateOptions) -> Result<KeyPairText, FieldError> {
    let bits = validate_generate_options(o)?;
    let mut rng = os_rng();
    let failed = |e: ssh_key::Error| FieldError::new("key_type", format!("Key generation failed: {e}"));
    let mut key = match o.algorithm {
        KeyAlgorithm::Ed25519 => PrivateKey::random(&mut rng, Algorithm::Ed25519).map_err(failed)?,
        KeyAlgorithm::Ecdsa => {
            let curve = match bits {
                384 => EcdsaCurve::NistP384,
                521 => EcdsaCurve::NistP521,
                _ => EcdsaCurve::NistP256,
            };
            PrivateKey::random(&mut rng, Algorithm::Ecdsa { curve }).map_err(failed)?
        }
        KeyAlgorithm::Rsa => {
            let kp = RsaKeypair::random(&mut rng, bits as usize).map_err(failed)?;
            PrivateKey::new(KeypairData::Rsa(kp), "").map_err(failed)?
        }
    };
    let comment = o.comment.as_deref().unwrap_or("").trim();
    key.set_comment(comment);
    let private_key = openssh_text(&key).map_err(|e| FieldError::new("key_type", e.to_string()))?;
    let public_key =
        public_line(key.public_key().key_data(), comment).map_err(|e| FieldError::new("key_type", e.to_string()))?;
    Ok(KeyPairText { private_key, public_key })
}

/// File name stem ssh-keygen uses for the algorithm.
/// The file name a key pair downloads as: `<name>_id_<type>`, plus `.pub` for
/// the public half, with anything but `[A-Za-z0-9._-]` in the name replaced.
pub fn download_file_name(name: &str, algorithm: KeyAlgorithm, public: bool) -> String {
    let mut safe: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if safe.is_empty() {
        safe.push_str("key");
    }
    format!("{safe}_{}{}", file_stem(algorithm), if public { ".pub" } else { "" })
}

pub fn file_stem(algorithm: KeyAlgorithm) -> &'static str {
    match algorithm {
        KeyAlgorithm::Ed25519 => "id_ed25519",
        KeyAlgorithm::Ecdsa => "id_ecdsa",
        KeyAlgorithm::Rsa => "id_rsa",
    }
}
