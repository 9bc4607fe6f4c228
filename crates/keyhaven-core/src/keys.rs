//! SSH key material: generation, import validation, normalisation, fingerprints
//! and host-key lines.
//!
//! This module owns every rule about what an SSH key pair may look like in keyhaven:
//!
//! * [`validate_generate_options`] / [`generate`]: new Ed25519, ECDSA (P-256/384/521)
//!   and RSA (2048/3072/4096) key pairs in OpenSSH format.
//! * [`validate_key_pair`]: the `SSH_KEY_PAIR` import rules (TrueNAS
//!   `keychaincredential` semantics, plus keyhaven's extensions): OpenSSH, PEM
//!   (PKCS#1, SEC1, including legacy OpenSSL encryption), PKCS#8 (plain and
//!   encrypted) and PuTTY private keys, optional passphrase, a minimum RSA size,
//!   and a private/public match check. Keys are normalised to unencrypted OpenSSH
//!   text and a one-line public key.
//! * [`public_key_info`]: type, size, comment and the `SHA256:` fingerprint exactly
//!   as `ssh-keygen -l` prints it.
//! * [`encrypt_private_key`]: OpenSSH passphrase protection (bcrypt-pbkdf +
//!   aes256-ctr) for downloads.
//! * [`parse_host_key_lines`]: the pinned `remote_host_key` text of an
//!   `SSH_CREDENTIALS` entry.
//!
//! Pure code: no I/O, no processes, no files. Randomness (key generation, the salt of
//! an encrypted download) comes from the OS RNG. Error messages never contain key
//! material or passphrases; they only name what is wrong and how to fix it.

use std::fmt;
use std::str::FromStr;

use base64::alphabet;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use russh::keys::ssh_key::encoding::Encode as _;
use russh::keys::ssh_key::private::{KeypairData, RsaKeypair};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, EcdsaCurve, HashAlg, LineEnding, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::FieldError;
use crate::text;

// ---------------------------------------------------------------------------
// Limits (adversarial input must not cost unbounded memory or CPU)
// ---------------------------------------------------------------------------

/// Largest private key text accepted (an RSA-16384 OpenSSH key is about 12.6 KiB).
const MAX_PRIVATE_KEY_LEN: usize = 64 * 1024;
/// Largest public key text accepted (an RSA-16384 public key line is about 2.8 KiB).
const MAX_PUBLIC_KEY_LEN: usize = 16 * 1024;
/// Longest passphrase accepted.
const MAX_PASSPHRASE_LEN: usize = 1024;
/// Largest host-key text accepted by [`parse_host_key_lines`].
const MAX_HOST_KEY_TEXT_LEN: usize = 256 * 1024;
/// Longest comment accepted for generation.
const MAX_COMMENT_CHARS: usize = 1024;
/// RSA limits.
const MIN_RSA_BITS: u32 = 2048;
const MAX_RSA_BITS: u32 = 16384;
/// bcrypt-pbkdf rounds of an encrypted OpenSSH key (ssh-keygen's default is 16,
/// one round costs about 8 ms).
const MAX_BCRYPT_ROUNDS: u32 = 1000;
/// PBKDF2 iterations of an encrypted PKCS#8 key (OpenSSL's default is 2048).
const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;
/// scrypt memory (128 * r * N bytes) of an encrypted PKCS#8 key.
const MAX_SCRYPT_MEMORY: u64 = 256 * 1024 * 1024;
/// Argon2 limits of an encrypted PuTTY (PPK v3) key; PuTTY's default is 8192 KiB.
const MAX_ARGON2_MEMORY_KIB: u64 = 256 * 1024;
const MAX_ARGON2_PASSES: u64 = 64;
const MAX_ARGON2_PARALLELISM: u64 = 16;

/// Key type names as they appear in public key lines and known_hosts files.
const KNOWN_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "ssh-dss",
    "ssh-ed448",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];
const CERT_SUFFIX: &str = "-cert-v01@openssh.com";

const MSG_ENCRYPTED: &str =
    "Encrypted private keys are not allowed unless you give its passphrase in attributes.passphrase";
const MSG_WRONG_PASSPHRASE: &str = "The passphrase does not decrypt this private key";
const MSG_LOOKS_PUBLIC: &str = "This looks like a public key, not a private key. Paste it into \
     public_key instead; the private key is the file without the .pub extension \
     (it starts with -----BEGIN ... PRIVATE KEY-----)";
const MSG_IS_PRIVATE: &str = "This is a private key, not a public key. Paste the content of the \
     .pub file instead (one line such as \"ssh-ed25519 AAAA... comment\"); the private key \
     belongs in private_key";
const MSG_MISMATCH: &str = "Private key and public key do not match";
const MSG_NO_KEY: &str = "You must specify a key";
const MSG_INVALID_PUBLIC: &str = "Invalid public key";
const MSG_UNREADABLE: &str = "The private key could not be read. Paste the whole key file, from \
     the -----BEGIN ... PRIVATE KEY----- line to the -----END ... PRIVATE KEY----- line \
     (OpenSSH, PEM or PKCS#8 format; Ed25519, ECDSA or RSA)";
const MSG_DAMAGED: &str = "The private key is damaged or incomplete (its content does not \
     decode). Paste the whole key file again, including the -----END ... line";
const MSG_SUPPORTED: &str = "Supported key types: Ed25519, ECDSA (P-256, P-384, P-521) and RSA \
     (2048 bits or more)";
const MSG_GENERATE_NEW: &str = "Generate a new key (Ed25519 is recommended).";

// ---------------------------------------------------------------------------
// Algorithms and generation
// ---------------------------------------------------------------------------

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

/// A freshly generated key pair, as text. `Debug` does not show the private key.
#[derive(Clone)]
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
    let mut rng = russh::keys::key::safe_rng();
    let failed = |e: russh::keys::ssh_key::Error| FieldError::new("key_type", format!("Key generation failed: {e}"));
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
    let private_key = openssh_text(&key).map_err(|e| FieldError::new("key_type", e))?;
    let public_key = public_line(key.public_key().key_data(), comment).map_err(|e| FieldError::new("key_type", e))?;
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

// ---------------------------------------------------------------------------
// Public keys and fingerprints
// ---------------------------------------------------------------------------

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

/// Type, size, comment and fingerprint of a one-line public key
/// (`"type base64[ comment]"`). Does not apply the minimum RSA size; the key type
/// must be Ed25519, ECDSA or RSA.
pub fn public_key_info(public_key_line: &str) -> Result<KeyInfo, String> {
    if is_private_key_text(public_key_line) {
        return Err(MSG_IS_PRIVATE.to_string());
    }
    let (key_data, comment) = parse_public_line(public_key_line)?;
    key_info(&key_data, &comment)
}

fn key_info(key_data: &KeyData, comment: &str) -> Result<KeyInfo, String> {
    let (algorithm, bits) = classify(key_data)?;
    Ok(KeyInfo {
        key_type: key_data.algorithm().as_str().to_string(),
        algorithm,
        bits,
        comment: comment.to_string(),
        fingerprint: fingerprint(key_data),
    })
}

fn fingerprint(key_data: &KeyData) -> String {
    key_data.fingerprint(HashAlg::Sha256).to_string()
}

/// Algorithm and size of a supported key, or a message saying why it is not supported.
fn classify(key_data: &KeyData) -> Result<(KeyAlgorithm, u32), String> {
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
                return Err(format!(
                    "RSA keys larger than {MAX_RSA_BITS} bits are not supported; this key has \
                     {bits} bits"
                ));
            }
            Ok((KeyAlgorithm::Rsa, bits))
        }
        KeyData::Dsa(_) => Err(format!("DSA keys are not supported: OpenSSH has disabled them. {MSG_GENERATE_NEW}")),
        KeyData::SkEd25519(_) | KeyData::SkEcdsaSha2NistP256(_) => Err(format!(
            "Security-key (FIDO, sk-...) keys are not supported: they need the hardware token \
             at every use. {MSG_SUPPORTED}."
        )),
        KeyData::Certificate(_) => {
            Err("SSH certificates are not supported here; use the plain public key (the .pub file \
             without -cert)"
                .to_string())
        }
        other => {
            Err(format!("Unsupported key type {}. {MSG_SUPPORTED}.", quote_if_safe(other.algorithm().as_str(), 64)))
        }
    }
}

/// Bit length of a big-endian unsigned integer (like OpenSSL's `BN_num_bits`).
fn mpint_bits(bytes: &[u8]) -> u32 {
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
fn public_line(key_data: &KeyData, comment: &str) -> Result<String, String> {
    let blob = key_data.encode_vec().map_err(|_| "The public key could not be encoded".to_string())?;
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
fn sanitize_comment(comment: &str) -> String {
    let s: String = comment.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_COMMENT_CHARS).collect();
    s.trim().to_string()
}

fn is_key_type_name(tok: &str) -> bool {
    let base = tok.strip_suffix(CERT_SUFFIX).unwrap_or(tok);
    KNOWN_KEY_TYPES.contains(&base)
}

/// Split off the first whitespace-separated token: `(token, rest_trimmed_start)`.
fn split_token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

/// Decode `base64` as an SSH public key blob of type `key_type`.
fn decode_key_blob(key_type: &str, b64: &str) -> Result<KeyData, &'static str> {
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

/// Parse `"type base64[ comment]"` (one line). Errors are user-facing messages.
fn parse_public_line(text: &str) -> Result<(KeyData, String), String> {
    if text.len() > MAX_PUBLIC_KEY_LEN {
        return Err(format!("{MSG_INVALID_PUBLIC}: it is too long"));
    }
    // Refused rather than cleaned: a NUL or an escape sequence in the comment
    // would otherwise be stored (and shown) as something the caller did not send.
    text::check_multi_line(text).map_err(|e| e.to_string())?;
    let t = text.trim();
    if t.is_empty() {
        return Err(MSG_NO_KEY.to_string());
    }
    if t.contains("BEGIN SSH2 PUBLIC KEY") {
        return Err(format!(
            "{MSG_INVALID_PUBLIC}: this is an SSH2 (RFC 4716) public key; give the OpenSSH \
             one-line form (ssh-keygen -i -f <file> converts it)"
        ));
    }
    if t.contains("-----BEGIN") && t.contains("PUBLIC KEY-----") {
        return Err(format!(
            "{MSG_INVALID_PUBLIC}: this is a PEM public key; give the OpenSSH one-line form \
             (ssh-keygen -i -m PKCS8 -f <file> converts it)"
        ));
    }
    if t.contains('\n') || t.contains('\r') {
        return Err(format!("{MSG_INVALID_PUBLIC}: give exactly one key on a single line (\"type base64 comment\")"));
    }
    let (key_type, rest) = split_token(t);
    if !is_key_type_name(key_type) {
        return Err(MSG_INVALID_PUBLIC.to_string());
    }
    let (b64, comment) = split_token(rest);
    if b64.is_empty() {
        return Err(MSG_INVALID_PUBLIC.to_string());
    }
    let key_data = decode_key_blob(key_type, b64).map_err(|_| MSG_INVALID_PUBLIC.to_string())?;
    if key_data.is_certificate() {
        return Err("SSH certificates are not supported here; use the plain public key (the .pub file \
             without -cert)"
            .to_string());
    }
    Ok((key_data, sanitize_comment(comment)))
}

/// Does the text look like a public key (line, PEM or SSH2 public block)?
fn looks_like_public_key(text: &str) -> bool {
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

// ---------------------------------------------------------------------------
// Key-pair validation (import)
// ---------------------------------------------------------------------------

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
    fn new(field: KeyPairField, message: impl Into<String>) -> Self {
        Self { field, message: message.into() }
    }
    fn private(message: impl Into<String>) -> Self {
        Self::new(KeyPairField::PrivateKey, message)
    }
    fn public(message: impl Into<String>) -> Self {
        Self::new(KeyPairField::PublicKey, message)
    }
    fn passphrase(message: impl Into<String>) -> Self {
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
/// not show the private key.
#[derive(Clone)]
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
fn check_supported(key_data: &KeyData) -> Result<(KeyAlgorithm, u32), String> {
    let (alg, bits) = classify(key_data)?;
    if alg == KeyAlgorithm::Rsa && bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA keys must be at least {MIN_RSA_BITS} bits; this key has {bits} bits. \
             {MSG_GENERATE_NEW}"
        ));
    }
    Ok((alg, bits))
}

/// Same type and key data (comments are not part of [`KeyData`]).
fn same_key(a: &KeyData, b: &KeyData) -> bool {
    match (a.encode_vec(), b.encode_vec()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn openssh_text(key: &PrivateKey) -> Result<Zeroizing<String>, String> {
    let mut text = key
        .to_openssh(LineEnding::LF)
        .map_err(|_| "The private key could not be encoded in OpenSSH format".to_string())?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

// ---------------------------------------------------------------------------
// Private key parsing
// ---------------------------------------------------------------------------

/// A PEM-style block found in the pasted text.
struct Armour<'a> {
    /// One of the fixed labels below (never user text).
    label: &'static str,
    /// `(Proc-Type | DEK-Info | other, value)`.
    headers: Vec<(&'static str, &'a str)>,
    /// Decoded body (secret).
    der: Zeroizing<Vec<u8>>,
}

/// Lenient base64 for pasted key bodies (padding optional, trailing bits allowed).
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn is_armour_begin(line: &str) -> Option<&str> {
    line.strip_prefix("-----BEGIN ")?.strip_suffix("-----").map(str::trim)
}

/// Find the first `-----BEGIN <...> PRIVATE KEY-----` block (skipping e.g. `EC PARAMETERS`).
fn find_private_armour<'a>(lines: &[&'a str]) -> Result<Armour<'a>, KeyPairError> {
    // Labels are matched against this fixed list, so messages never echo user text.
    const LABELS: &[&str] = &[
        "OPENSSH PRIVATE KEY",
        "RSA PRIVATE KEY",
        "EC PRIVATE KEY",
        "DSA PRIVATE KEY",
        "PRIVATE KEY",
        "ENCRYPTED PRIVATE KEY",
        "SSH2 ENCRYPTED PRIVATE KEY",
    ];
    let Some((start, label)) = lines
        .iter()
        .enumerate()
        .find_map(|(i, l)| is_armour_begin(l).filter(|lab| lab.ends_with("PRIVATE KEY")).map(|lab| (i, lab)))
    else {
        return Err(KeyPairError::private(MSG_UNREADABLE));
    };
    let Some(label) = LABELS.iter().copied().find(|l| *l == label) else {
        return Err(KeyPairError::private(format!(
            "Unsupported private key format{}. {MSG_UNREADABLE}",
            match safe_label(label) {
                Some(l) => format!(" ({l})"),
                None => String::new(),
            }
        )));
    };
    let end_line = format!("-----END {label}-----");
    let Some(end) = lines[start + 1..].iter().position(|l| *l == end_line) else {
        return Err(KeyPairError::private(format!(
            "The private key is incomplete: the {end_line} line is missing. Paste the whole key \
             file"
        )));
    };
    let body = &lines[start + 1..start + 1 + end];
    let mut headers = Vec::new();
    let mut b64 = Zeroizing::new(String::new());
    let mut in_headers = true;
    for line in body {
        if in_headers {
            if let Some((k, v)) = line.split_once(':') {
                headers.push((header_name(k.trim()), v.trim()));
                continue;
            }
            if line.is_empty() {
                continue;
            }
            in_headers = false;
        }
        if line.is_empty() {
            continue;
        }
        if !line.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=') {
            return Err(KeyPairError::private(MSG_DAMAGED));
        }
        b64.push_str(line);
    }
    if b64.is_empty() {
        return Err(KeyPairError::private(MSG_DAMAGED));
    }
    let der = LENIENT_B64.decode(b64.as_bytes()).map(Zeroizing::new).map_err(|_| KeyPairError::private(MSG_DAMAGED))?;
    Ok(Armour { label, headers, der })
}

/// The PEM header names we look at; others are kept as "other".
fn header_name(k: &str) -> &'static str {
    if k.eq_ignore_ascii_case("Proc-Type") {
        "Proc-Type"
    } else if k.eq_ignore_ascii_case("DEK-Info") {
        "DEK-Info"
    } else {
        "other"
    }
}

fn safe_label(label: &str) -> Option<&str> {
    (label.len() <= 40 && label.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' '))
        .then_some(label)
}

/// Parse a pasted private key into a decrypted [`PrivateKey`].
fn parse_private_key(text: &str, passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
    if text.len() > MAX_PRIVATE_KEY_LEN {
        return Err(KeyPairError::private(format!(
            "The private key is too large (over {} KiB); it is not an SSH key this service accepts",
            MAX_PRIVATE_KEY_LEN / 1024
        )));
    }
    if !is_private_key_text(text) && looks_like_public_key(text) {
        return Err(KeyPairError::private(MSG_LOOKS_PUBLIC));
    }
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    if lines.iter().find(|l| !l.is_empty()).is_some_and(|l| l.starts_with("PuTTY-User-Key-File-")) {
        return parse_ppk(&lines, passphrase);
    }
    if lines.iter().any(|l| l.starts_with("---- BEGIN SSH2 ENCRYPTED PRIVATE KEY")) {
        return Err(KeyPairError::private(
            "SSH2 (ssh.com / Tectia) private keys are not supported. Convert the key to OpenSSH \
             format first (ssh-keygen -i -f <file>)",
        ));
    }
    let armour = find_private_armour(&lines)?;
    match armour.label {
        "OPENSSH PRIVATE KEY" => parse_openssh(&armour.der, passphrase),
        "RSA PRIVATE KEY" | "EC PRIVATE KEY" => parse_traditional_pem(&armour, passphrase),
        "DSA PRIVATE KEY" => Err(KeyPairError::private(format!(
            "DSA keys are not supported: OpenSSH has disabled them. {MSG_GENERATE_NEW}"
        ))),
        "PRIVATE KEY" => {
            if !der_is_complete_sequence(&armour.der) {
                return Err(KeyPairError::private(MSG_DAMAGED));
            }
            russh::keys::pkcs8::decode_pkcs8(&armour.der, None).map_err(map_plain_decode_error)
        }
        "ENCRYPTED PRIVATE KEY" => parse_encrypted_pkcs8(&armour.der, passphrase),
        "SSH2 ENCRYPTED PRIVATE KEY" => Err(KeyPairError::private(
            "SSH2 (ssh.com / Tectia) private keys are not supported. Convert the key to OpenSSH \
             format first (ssh-keygen -i -f <file>)",
        )),
        _ => Err(KeyPairError::private(MSG_UNREADABLE)),
    }
}

fn parse_openssh(der: &[u8], passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
    if !der.starts_with(b"openssh-key-v1\0") {
        return Err(KeyPairError::private(MSG_DAMAGED));
    }
    // ssh-key refuses a P-256 scalar that OpenSSH encoded in fewer than 32
    // bytes (one key in 256 has a leading zero byte); pad it and retry.
    let repaired = PrivateKey::from_bytes(der).is_err().then(|| pad_short_ecdsa_scalar(der)).flatten();
    let der = repaired.as_deref().map(|v| v.as_slice()).unwrap_or(der);
    let key = PrivateKey::from_bytes(der).map_err(|e| match e {
        russh::keys::ssh_key::Error::AlgorithmUnknown | russh::keys::ssh_key::Error::AlgorithmUnsupported { .. } => {
            KeyPairError::private(format!("This private key's type is not supported. {MSG_SUPPORTED}."))
        }
        _ => KeyPairError::private(MSG_DAMAGED),
    })?;
    // The public half is in clear text even when the key is encrypted: refuse
    // unsupported keys before asking for (or spending time on) the passphrase.
    check_supported(key.public_key().key_data()).map_err(KeyPairError::private)?;
    if !key.is_encrypted() {
        return Ok(key);
    }
    let Some(pass) = passphrase else {
        return Err(KeyPairError::private(MSG_ENCRYPTED));
    };
    if let russh::keys::ssh_key::Kdf::Bcrypt { rounds, .. } = key.kdf() {
        if *rounds > MAX_BCRYPT_ROUNDS {
            return Err(KeyPairError::private(format!(
                "This key's passphrase protection uses {rounds} KDF rounds; at most \
                 {MAX_BCRYPT_ROUNDS} are accepted. Re-encrypt it with fewer rounds \
                 (ssh-keygen -p -a 100) or remove the passphrase"
            )));
        }
    }
    let decrypted = key.decrypt(pass);
    if decrypted.is_err() {
        // The short-P-256-scalar case again, inside the encryption: decrypt
        // here, re-encode the section with the scalar padded, and parse that.
        if let Some(k) = decrypt_padding_short_ecdsa_scalar(&key, der, pass) {
            return Ok(k);
        }
    }
    decrypted.map_err(|e| match e {
        russh::keys::ssh_key::Error::Crypto => KeyPairError::passphrase(MSG_WRONG_PASSPHRASE),
        russh::keys::ssh_key::Error::AlgorithmUnsupported { .. } | russh::keys::ssh_key::Error::AlgorithmUnknown => {
            KeyPairError::private(
                "This private key is encrypted with a cipher keyhaven cannot read. Re-encrypt it \
             with a current ssh-keygen (ssh-keygen -p -f <file>) or remove the passphrase",
            )
        }
        // A wrong passphrase usually fails the checkint comparison, which ssh-key may
        // report as an encoding error rather than `Crypto`.
        _ => KeyPairError::passphrase(MSG_WRONG_PASSPHRASE),
    })
}

/// Decrypt an encrypted OpenSSH key blob `der` (already parsed as `key`) and,
/// when it is an `ecdsa-sha2-nistp256` key with a short scalar, return it
/// repaired. `None` for anything else, a wrong passphrase included.
fn decrypt_padding_short_ecdsa_scalar(key: &PrivateKey, der: &[u8], pass: &str) -> Option<PrivateKey> {
    use russh::keys::ssh_key::cipher::Tag;
    if key.public_key().algorithm() != (Algorithm::Ecdsa { curve: EcdsaCurve::NistP256 }) {
        return None;
    }
    let mut r = SshReader(der.strip_prefix(OPENSSH_MAGIC)?);
    let (_cipher, _kdf, _kdf_opts) = (r.string()?, r.string()?, r.string()?);
    if r.u32()? != 1 {
        return None;
    }
    let public = r.string()?;
    let mut section = Zeroizing::new(r.string()?.to_vec());
    // AEAD ciphers append their tag after the encrypted section.
    let tag = match key.cipher().has_tag() {
        true => Some(Tag::try_from(r.0).ok()?),
        false => None,
    };
    let (k, iv) = key.kdf().derive_key_and_iv(key.cipher(), pass).ok()?;
    let k = Zeroizing::new(k);
    key.cipher().decrypt(&k, &iv, &mut section, tag).ok()?;
    // Without a tag, equal check integers are the only sign the passphrase was right.
    let mut check = SshReader(&section);
    if check.u32()? != check.u32()? {
        return None;
    }
    let mut plain = Zeroizing::new(OPENSSH_MAGIC.to_vec());
    for s in [&b"none"[..], b"none", b""] {
        put_ssh_string(&mut plain, s);
    }
    plain.extend_from_slice(&1u32.to_be_bytes());
    put_ssh_string(&mut plain, public);
    put_ssh_string(&mut plain, &section);
    PrivateKey::from_bytes(&pad_short_ecdsa_scalar(&plain)?).ok()
}

const OPENSSH_MAGIC: &[u8] = b"openssh-key-v1\0";

/// Reads SSH wire-format fields (RFC 4251 `uint32` and `string`).
struct SshReader<'a>(&'a [u8]);

impl<'a> SshReader<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
}

fn put_ssh_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Re-encode an unencrypted OpenSSH `ecdsa-sha2-nistp256` key whose private
/// scalar is shorter than 32 bytes with the scalar left-padded to 32 bytes.
/// `None` when the blob is anything else.
fn pad_short_ecdsa_scalar(der: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut r = SshReader(der.strip_prefix(OPENSSH_MAGIC)?);
    let (cipher, kdf, kdf_opts) = (r.string()?, r.string()?, r.string()?);
    if cipher != b"none" || r.u32()? != 1 {
        return None;
    }
    let public = r.string()?;
    let mut p = SshReader(r.string()?);
    let (c1, c2) = (p.u32()?, p.u32()?);
    let (alg, curve, q, d, comment) = (p.string()?, p.string()?, p.string()?, p.string()?, p.string()?);
    if alg != b"ecdsa-sha2-nistp256" || d.len() >= 32 || d.is_empty() {
        return None;
    }
    let mut padded = Zeroizing::new(vec![0u8; 32]);
    padded[32 - d.len()..].copy_from_slice(d);
    let mut section = Zeroizing::new(Vec::new());
    section.extend_from_slice(&c1.to_be_bytes());
    section.extend_from_slice(&c2.to_be_bytes());
    for s in [alg, curve, q, &padded[..], comment] {
        put_ssh_string(&mut section, s);
    }
    let mut pad = 1u8;
    while section.len() % 8 != 0 {
        section.push(pad);
        pad += 1;
    }
    let mut out = Zeroizing::new(OPENSSH_MAGIC.to_vec());
    for s in [cipher, kdf, kdf_opts] {
        put_ssh_string(&mut out, s);
    }
    out.extend_from_slice(&1u32.to_be_bytes());
    put_ssh_string(&mut out, public);
    put_ssh_string(&mut out, &section);
    Some(out)
}

/// `-----BEGIN RSA PRIVATE KEY-----` / `-----BEGIN EC PRIVATE KEY-----`, optionally with
/// `Proc-Type: 4,ENCRYPTED` and `DEK-Info:` (OpenSSL's legacy encryption).
fn parse_traditional_pem(armour: &Armour<'_>, passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
    let encrypted =
        armour.headers.iter().any(|(k, v)| *k == "Proc-Type" && v.to_ascii_uppercase().contains("ENCRYPTED"));
    let plain: Zeroizing<Vec<u8>> = if encrypted {
        let Some(dek) = armour.headers.iter().find(|(k, _)| *k == "DEK-Info").map(|(_, v)| *v) else {
            return Err(KeyPairError::private(MSG_DAMAGED));
        };
        let Some(pass) = passphrase else {
            return Err(KeyPairError::private(MSG_ENCRYPTED));
        };
        let plain = legacy_pem_decrypt(dek, &armour.der, pass.as_bytes())?;
        if !der_is_complete_sequence(&plain) {
            return Err(KeyPairError::passphrase(MSG_WRONG_PASSPHRASE));
        }
        plain
    } else {
        if !der_is_complete_sequence(&armour.der) {
            return Err(KeyPairError::private(MSG_DAMAGED));
        }
        armour.der.clone()
    };
    let map_err = |e| {
        if encrypted {
            match e {
                russh::keys::Error::UnknownAlgorithm(_) => map_plain_decode_error(e),
                _ => KeyPairError::passphrase(MSG_WRONG_PASSPHRASE),
            }
        } else {
            map_plain_decode_error(e)
        }
    };
    if armour.label == "EC PRIVATE KEY" {
        russh::keys::pkcs8::decode_pkcs8(&plain, None).map_err(map_err)
    } else {
        // PKCS#1 RSA: russh exposes it only through its PEM entry point.
        let mut pem = Zeroizing::new(String::from("-----BEGIN RSA PRIVATE KEY-----\n"));
        let b64 = Zeroizing::new(STANDARD.encode(&*plain));
        for chunk in b64.as_bytes().chunks(64) {
            // base64 output is ASCII, so every chunk is valid UTF-8.
            pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END RSA PRIVATE KEY-----\n");
        russh::keys::decode_secret_key(&pem, None).map_err(map_err)
    }
}

/// Errors of an unencrypted PEM/PKCS#8 decode.
fn map_plain_decode_error(e: russh::keys::Error) -> KeyPairError {
    match e {
        russh::keys::Error::UnknownAlgorithm(oid) => {
            let s = oid.to_string();
            let what = match s.as_str() {
                "1.2.840.10040.4.1" => {
                    return KeyPairError::private(format!(
                        "DSA keys are not supported: OpenSSH has disabled them. {MSG_GENERATE_NEW}"
                    ))
                }
                "1.3.101.113" => "Ed448".to_string(),
                "1.3.101.110" | "1.3.101.111" => "X25519/X448 (not a signing key)".to_string(),
                "1.3.132.0.10" => "ECDSA on secp256k1".to_string(),
                _ => format!("algorithm {s}"),
            };
            KeyPairError::private(format!("Unsupported key type ({what}). {MSG_SUPPORTED}."))
        }
        _ => KeyPairError::private(MSG_UNREADABLE),
    }
}

fn parse_encrypted_pkcs8(der: &[u8], passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
    if !der_is_complete_sequence(der) {
        return Err(KeyPairError::private(MSG_DAMAGED));
    }
    let unsupported = || {
        KeyPairError::private(
            "This PKCS#8 key is encrypted with a scheme keyhaven cannot read (supported: PBES2 \
             with AES and PBKDF2 or scrypt). Convert it with: ssh-keygen -p -f <file> (OpenSSH \
             format) or remove the passphrase",
        )
    };
    let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(der).map_err(|_| unsupported())?;
    let Some(params) = info.encryption_algorithm.pbes2() else {
        return Err(unsupported());
    };
    if let Some(p) = params.kdf.pbkdf2() {
        if p.iteration_count > MAX_PBKDF2_ITERATIONS {
            return Err(KeyPairError::private(format!(
                "This key's passphrase protection uses {} PBKDF2 iterations; at most \
                 {MAX_PBKDF2_ITERATIONS} are accepted",
                p.iteration_count
            )));
        }
    } else if let Some(s) = params.kdf.scrypt() {
        let mem = 128u64.saturating_mul(u64::from(s.block_size)).saturating_mul(s.cost_parameter);
        if mem > MAX_SCRYPT_MEMORY || s.parallelization > 16 {
            return Err(KeyPairError::private(
                "This key's scrypt passphrase protection asks for more memory or work than \
                 keyhaven allows; re-encrypt it with default settings",
            ));
        }
    } else {
        return Err(unsupported());
    }
    let Some(pass) = passphrase else {
        return Err(KeyPairError::private(MSG_ENCRYPTED));
    };
    russh::keys::pkcs8::decode_pkcs8(der, Some(pass.as_bytes())).map_err(|e| match e {
        russh::keys::Error::UnknownAlgorithm(_) => map_plain_decode_error(e),
        _ => KeyPairError::passphrase(MSG_WRONG_PASSPHRASE),
    })
}

/// PuTTY `.ppk` (v2/v3).
fn parse_ppk(lines: &[&str], passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
    let header = |name: &str| {
        lines.iter().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    };
    let encrypted = header("Encryption").is_some_and(|v| v != "none");
    let num = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    if num("Argon2-Memory") > MAX_ARGON2_MEMORY_KIB
        || num("Argon2-Passes") > MAX_ARGON2_PASSES
        || num("Argon2-Parallelism") > MAX_ARGON2_PARALLELISM
    {
        return Err(KeyPairError::private(
            "This PuTTY key's passphrase protection asks for more memory or work than keyhaven \
             allows; re-save it with PuTTYgen's default settings",
        ));
    }
    if encrypted && passphrase.is_none() {
        return Err(KeyPairError::private(MSG_ENCRYPTED));
    }
    let text = Zeroizing::new(lines.join("\n"));
    let pass = if encrypted { passphrase.map(str::to_string) } else { None };
    let key = PrivateKey::from_ppk(text.as_str(), pass).map_err(|_| {
        if encrypted {
            KeyPairError::passphrase(MSG_WRONG_PASSPHRASE)
        } else {
            KeyPairError::private(
                "The PuTTY private key could not be read. Paste the whole .ppk file, or export \
                 it from PuTTYgen as an OpenSSH key",
            )
        }
    })?;
    check_supported(key.public_key().key_data()).map_err(KeyPairError::private)?;
    Ok(key)
}

/// Is `der` exactly one complete DER SEQUENCE (catches truncated pastes)?
fn der_is_complete_sequence(der: &[u8]) -> bool {
    let [0x30, len0, rest @ ..] = der else {
        return false;
    };
    let (len, body) = match *len0 {
        l if l < 0x80 => (usize::from(l), rest),
        0x81..=0x84 => {
            let n = usize::from(len0 & 0x7f);
            if rest.len() < n {
                return false;
            }
            let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        }
        _ => return false,
    };
    body.len() == len
}

// ---------------------------------------------------------------------------
// Legacy OpenSSL PEM encryption (Proc-Type: 4,ENCRYPTED / DEK-Info)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum LegacyCipher {
    Aes128,
    Aes192,
    Aes256,
    DesEde3,
    Des,
}

impl LegacyCipher {
    fn key_len(self) -> usize {
        match self {
            LegacyCipher::Aes128 => 16,
            LegacyCipher::Aes192 => 24,
            LegacyCipher::Aes256 => 32,
            LegacyCipher::DesEde3 => 24,
            LegacyCipher::Des => 8,
        }
    }
    fn block_len(self) -> usize {
        match self {
            LegacyCipher::Aes128 | LegacyCipher::Aes192 | LegacyCipher::Aes256 => 16,
            LegacyCipher::DesEde3 | LegacyCipher::Des => 8,
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| {
            let hi = (p[0] as char).to_digit(16)?;
            let lo = (p[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// OpenSSL `EVP_BytesToKey(MD5, salt = iv[..8], count = 1)`.
fn evp_bytes_to_key(pass: &[u8], salt: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
    let mut key = Zeroizing::new(Vec::with_capacity(key_len + 16));
    let mut prev: Zeroizing<[u8; 16]> = Zeroizing::new([0; 16]);
    let mut first = true;
    while key.len() < key_len {
        let mut ctx = md5::Context::new();
        if !first {
            ctx.consume(&prev[..]);
        }
        ctx.consume(pass);
        ctx.consume(salt);
        *prev = ctx.finalize().0;
        key.extend_from_slice(&prev[..]);
        first = false;
    }
    key.truncate(key_len);
    key
}

/// Decrypt a legacy PEM body; `dek_info` is the `DEK-Info` value (`CIPHER,HEXIV`).
fn legacy_pem_decrypt(dek_info: &str, data: &[u8], pass: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyPairError> {
    use cbc::cipher::block_padding::Pkcs7;
    use cbc::cipher::{BlockModeDecrypt, KeyIvInit};

    let (name, iv_hex) = dek_info.split_once(',').unwrap_or((dek_info, ""));
    let cipher = match name.trim().to_ascii_uppercase().as_str() {
        "AES-128-CBC" => LegacyCipher::Aes128,
        "AES-192-CBC" => LegacyCipher::Aes192,
        "AES-256-CBC" => LegacyCipher::Aes256,
        "DES-EDE3-CBC" => LegacyCipher::DesEde3,
        "DES-CBC" => LegacyCipher::Des,
        _ => {
            return Err(KeyPairError::private(
                "This PEM key is encrypted with a cipher keyhaven cannot read (supported: \
                 AES-128/192/256-CBC, DES-EDE3-CBC). Convert it with: ssh-keygen -p -f <file>",
            ))
        }
    };
    let iv = decode_hex(iv_hex.trim()).ok_or_else(|| KeyPairError::private(MSG_DAMAGED))?;
    if iv.len() != cipher.block_len() || data.is_empty() || !data.len().is_multiple_of(cipher.block_len()) {
        return Err(KeyPairError::private(MSG_DAMAGED));
    }
    let key = evp_bytes_to_key(pass, &iv[..8], cipher.key_len());
    let mut buf = Zeroizing::new(data.to_vec());
    let bad = |_| KeyPairError::passphrase(MSG_WRONG_PASSPHRASE);
    let internal = |_| KeyPairError::private(MSG_DAMAGED);
    let n = match cipher {
        LegacyCipher::Aes128 => cbc::Decryptor::<aes::Aes128>::new_from_slices(&key, &iv)
            .map_err(internal)?
            .decrypt_padded::<Pkcs7>(&mut buf)
            .map_err(bad)?
            .len(),
        LegacyCipher::Aes192 => cbc::Decryptor::<aes::Aes192>::new_from_slices(&key, &iv)
            .map_err(internal)?
            .decrypt_padded::<Pkcs7>(&mut buf)
            .map_err(bad)?
            .len(),
        LegacyCipher::Aes256 => cbc::Decryptor::<aes::Aes256>::new_from_slices(&key, &iv)
            .map_err(internal)?
            .decrypt_padded::<Pkcs7>(&mut buf)
            .map_err(bad)?
            .len(),
        LegacyCipher::DesEde3 => cbc::Decryptor::<des::TdesEde3>::new_from_slices(&key, &iv)
            .map_err(internal)?
            .decrypt_padded::<Pkcs7>(&mut buf)
            .map_err(bad)?
            .len(),
        LegacyCipher::Des => cbc::Decryptor::<des::Des>::new_from_slices(&key, &iv)
            .map_err(internal)?
            .decrypt_padded::<Pkcs7>(&mut buf)
            .map_err(bad)?
            .len(),
    };
    buf.truncate(n);
    Ok(buf)
}

// ---------------------------------------------------------------------------
// Passphrase protection for downloads
// ---------------------------------------------------------------------------

/// Encrypt an unencrypted OpenSSH private key with `passphrase` (bcrypt-pbkdf,
/// aes256-ctr, as `ssh-keygen -p` does); readable by `ssh-keygen -y -P <pass>`.
pub fn encrypt_private_key(openssh_private: &str, passphrase: &str) -> Result<Zeroizing<String>, String> {
    if passphrase.is_empty() {
        return Err("The passphrase must not be empty".to_string());
    }
    if passphrase.len() > MAX_PASSPHRASE_LEN {
        return Err(format!("The passphrase must be at most {MAX_PASSPHRASE_LEN} bytes"));
    }
    if openssh_private.len() > MAX_PRIVATE_KEY_LEN {
        return Err("The private key is too large".to_string());
    }
    let key = PrivateKey::from_openssh(openssh_private.trim())
        .map_err(|_| "The private key is not an OpenSSH private key".to_string())?;
    if key.is_encrypted() {
        return Err("The private key is already encrypted".to_string());
    }
    let mut rng = russh::keys::key::safe_rng();
    let encrypted =
        key.encrypt(&mut rng, passphrase).map_err(|_| "The private key could not be encrypted".to_string())?;
    openssh_text(&encrypted)
}

// ---------------------------------------------------------------------------
// Host-key lines (SSH_CREDENTIALS.remote_host_key)
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Message helpers (never echo anything that could be key material)
// ---------------------------------------------------------------------------

/// `'text'` if it is short and plain (letters, digits, `-_.@`), else `"(not shown)"`.
fn quote_if_safe(s: &str, max: usize) -> String {
    if !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b)) {
        format!("'{s}'")
    } else {
        "(not shown)".to_string()
    }
}

/// Quote a would-be key type only if it looks like one (contains a `-`, lower case):
/// base64 never contains `-`, so this never echoes key data.
fn quote_if_type_like(s: &str) -> String {
    if s.len() <= 64
        && s.contains('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.@".contains(&b))
    {
        format!("'{s}'")
    } else {
        "(not shown)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Public test vectors from the ssh-key crate (tests/examples), not real credentials.
    const ED25519_PUB: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti user@example.com";
    const ED25519_FP: &str = "SHA256:UCUiLr7Pjs9wFFJMDByLgc3NrtdU344OgUM45wZPcIQ";
    const ED25519_OPENSSH: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACCzPq7zfqLffKoBDe/eo04kH2XxtSmk9D7RQyf1xUqrYgAAAJgAIAxdACAM
XQAAAAtzc2gtZWQyNTUxOQAAACCzPq7zfqLffKoBDe/eo04kH2XxtSmk9D7RQyf1xUqrYg
AAAEC2BsIi0QwW2uFscKTUUXNHLsYX4FxlaSDSblbAj7WR7bM+rvN+ot98qgEN796jTiQf
ZfG1KaT0PtFDJ/XFSqtiAAAAEHVzZXJAZXhhbXBsZS5jb20BAgMEBQ==
-----END OPENSSH PRIVATE KEY-----
";
    const ED25519_PPK: &str = "PuTTY-User-Key-File-3: ssh-ed25519
Encryption: none
Comment: user@example.com
Public-Lines: 2
AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XF
Sqti
Private-Lines: 1
AAAAILYGwiLRDBba4WxwpNRRc0cuxhfgXGVpINJuVsCPtZHt
Private-MAC: 94140d0344fad6aa1bf7b71e9c93db11ccac8a232f8a51e11c024869d608c82d
";
    /// Same key, PPK v3 encrypted with passphrase "123" (Argon2id).
    const ED25519_PPK_ENC: &str = "PuTTY-User-Key-File-3: ssh-ed25519
Encryption: aes256-cbc
Comment: user@example.com
Public-Lines: 2
AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XF
Sqti
Key-Derivation: Argon2id
Argon2-Memory: 8192
Argon2-Passes: 34
Argon2-Parallelism: 1
Argon2-Salt: 63d1d43f7bf7700720496646a2f5ec17
Private-Lines: 1
DyWtExZ3dxFutnb12tIwXBC6kWdozrvP+r6faHKBGDb4+qEar9XBiC0BmGySMHUi
Private-MAC: 52fd00d4ef47ebc506e4e709486c0c6bc0606e24fe2c6cb1b3d168f4da238a66
";
    const P256_PUB: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHwf2HMM5TRXvo2SQJjsNkiDD5KqiiNjrGVv3UUh+mMT5RHxiRtOnlqvjhQtBq0VpmpCV/PwUdhOig4vkbqAcEc= user@example.com";
    const P256_FP: &str = "SHA256:JQ6FV0rf7qqJHZqIj4zNH8eV0oB8KLKh9Pph3FTD98g";
    const RSA3072_PUB: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQCmjkeMm8k3JkNrf16eb5pG4bc77B6Mt3VN4saltsRV8vASpyWa/PlBgdaeldOaNJ5NK0gqU3KyiUNzHbdcc8572e7IUBDJS/rlaWARiSL4aos2VbNX0k56Z5zYp9m/bq5m9/mlb+PQkNBjIhimgpYNiq2TwBiYeA6tLb79cPtHA0cX5BLk/a5oUpLsiR4kI/f+Q98vVDKasKXXVh5YLkLobrruDB6er2A9fOcIUF0O4JCRLh/Dc161gE3fQrYTMQenbppZzfxrZfQ8YwLPvKjnqm+XRX+pbTtaJuj0EgTSzUK+EZxoSw8CNwiZpxrjwecTMVQ8w/srQmh4ABGuTqk0wP8HcI7hg+fpBv7kiejh5X/Oehxt+Puu85u9GVXb1a0av/vhJvUCBcuISvCA/z1wVJ0xdLhb1/ZiTDdTzyNbZQ0OQijzK+e1SlkNhp+3eGVZu3pNZvnTppwIXv3wg6kV1HodkWGgh1ayY7Buc52Z8okDYqvJat5CzOj5OaQNr/k= user@example.com";
    const RSA3072_FP: &str = "SHA256:Fmxts/GcV77PakFnf1Ueki5mpU4ZjUQWGRjZGAo3n/I";

    fn blob(line: &str) -> &str {
        line.split_whitespace().nth(1).unwrap()
    }

    /// No 12-character run of key body text and no passphrase in a message.
    fn assert_no_leak(msg: &str, secret_text: &str, pass: Option<&str>) {
        if let Some(p) = pass {
            assert!(!msg.contains(p), "passphrase leaked: {msg}");
        }
        for line in secret_text.lines().filter(|l| !l.starts_with("-----") && !l.contains(':')) {
            let chars: Vec<char> = line.trim().chars().collect();
            for w in chars.windows(12).step_by(3) {
                let frag: String = w.iter().collect();
                assert!(!msg.contains(&frag), "key material leaked ({frag}): {msg}");
            }
        }
    }

    #[test]
    fn keys_algorithm_parsing_and_serde() {
        for (s, a) in [
            ("ED25519", KeyAlgorithm::Ed25519),
            ("ed25519", KeyAlgorithm::Ed25519),
            ("Ecdsa", KeyAlgorithm::Ecdsa),
            (" rsa ", KeyAlgorithm::Rsa),
        ] {
            assert_eq!(s.parse::<KeyAlgorithm>().unwrap(), a);
        }
        assert!("DSA".parse::<KeyAlgorithm>().unwrap_err().contains("ED25519, ECDSA or RSA"));
        assert!("x".repeat(500).parse::<KeyAlgorithm>().unwrap_err().contains("(not shown)"));
        for (json, a) in
            [("\"ED25519\"", KeyAlgorithm::Ed25519), ("\"ECDSA\"", KeyAlgorithm::Ecdsa), ("\"RSA\"", KeyAlgorithm::Rsa)]
        {
            assert_eq!(serde_json::from_str::<KeyAlgorithm>(json).unwrap(), a);
            assert_eq!(serde_json::to_string(&a).unwrap(), json);
            assert_eq!(a.to_string(), json.trim_matches('"'));
        }
        assert!(serde_json::from_str::<KeyAlgorithm>("\"DSA\"").is_err());
        assert_eq!(KeyAlgorithm::default(), KeyAlgorithm::Ed25519);
        assert_eq!(file_stem(KeyAlgorithm::Ed25519), "id_ed25519");
        assert_eq!(file_stem(KeyAlgorithm::Ecdsa), "id_ecdsa");
        assert_eq!(file_stem(KeyAlgorithm::Rsa), "id_rsa");
    }

    #[test]
    fn keys_generate_options() {
        let d = GenerateOptions::default();
        assert_eq!((d.algorithm, d.bits, d.comment.as_deref()), (KeyAlgorithm::Ed25519, None, None));
        let opt = |algorithm, bits| GenerateOptions { algorithm, bits, comment: None };
        use KeyAlgorithm::*;
        for (a, b, want) in [
            (Ed25519, None, Ok(256)),
            (Ed25519, Some(256), Ok(256)),
            (Ed25519, Some(512), Err(())),
            (Ecdsa, None, Ok(256)),
            (Ecdsa, Some(384), Ok(384)),
            (Ecdsa, Some(521), Ok(521)),
            (Ecdsa, Some(512), Err(())),
            (Rsa, None, Ok(3072)),
            (Rsa, Some(2048), Ok(2048)),
            (Rsa, Some(4096), Ok(4096)),
            (Rsa, Some(1024), Err(())),
            (Rsa, Some(8192), Err(())),
            (Rsa, Some(0), Err(())),
        ] {
            match (validate_generate_options(&opt(a, b)), want) {
                (Ok(bits), Ok(w)) => assert_eq!(bits, w),
                (Err(e), Err(())) => {
                    assert_eq!(e.attribute, "size");
                    assert_eq!(e.errno, crate::error::EINVAL);
                }
                (got, want) => panic!("{a:?} {b:?}: got {got:?}, want {want:?}"),
            }
        }
        let e = validate_generate_options(&opt(Rsa, Some(1024))).unwrap_err();
        assert!(e.message.contains("2048, 3072 or 4096"), "{}", e.message);
        let e = validate_generate_options(&opt(Ecdsa, Some(1))).unwrap_err();
        assert!(e.message.contains("256, 384 or 521"), "{}", e.message);

        let com = |c: &str| GenerateOptions { comment: Some(c.to_string()), ..Default::default() };
        assert!(validate_generate_options(&com("backup@nas ünï 🔑")).is_ok());
        assert!(validate_generate_options(&com("")).is_ok());
        assert!(validate_generate_options(&com(&"é".repeat(1024))).is_ok());
        for bad in ["a\nb", "a\rb", "tab\there", "nul\0", &"x".repeat(1025)] {
            assert_eq!(validate_generate_options(&com(bad)).unwrap_err().attribute, "comment");
        }
        // generate() applies the same checks.
        assert_eq!(generate(&opt(Rsa, Some(1024))).unwrap_err().attribute, "size");
    }

    #[test]
    fn keys_generate_and_describe() {
        for (alg, bits, key_type) in [
            (KeyAlgorithm::Ed25519, None, "ssh-ed25519"),
            (KeyAlgorithm::Ecdsa, Some(256), "ecdsa-sha2-nistp256"),
            (KeyAlgorithm::Ecdsa, Some(384), "ecdsa-sha2-nistp384"),
            (KeyAlgorithm::Ecdsa, Some(521), "ecdsa-sha2-nistp521"),
        ] {
            for comment in [None, Some("team backup")] {
                let o = GenerateOptions { algorithm: alg, bits, comment: comment.map(Into::into) };
                let kp = generate(&o).unwrap();
                assert!(kp.private_key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
                assert!(kp.private_key.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
                let expect_end = match comment {
                    Some(c) => format!(" {c}\n"),
                    None => "=\n".to_string(),
                };
                assert!(kp.public_key.starts_with(&format!("{key_type} AAAA")));
                assert!(kp.public_key.ends_with(&expect_end) || comment.is_none());
                assert!(!kp.public_key.contains(" \n"));
                let info = public_key_info(&kp.public_key).unwrap();
                assert_eq!(info.key_type, key_type);
                assert_eq!(info.algorithm, alg);
                assert_eq!(info.bits, bits.unwrap_or(256));
                assert_eq!(info.comment, comment.unwrap_or(""));
                assert!(info.fingerprint.starts_with("SHA256:") && info.fingerprint.len() == 50);
                let v = validate_key_pair(Some(&kp.private_key), None, None).unwrap();
                assert_eq!(v.public_key, kp.public_key);
                assert_eq!(v.info, info);
            }
        }
    }

    #[test]
    fn keys_known_vectors() {
        for (line, fp, bits, alg) in [
            (ED25519_PUB, ED25519_FP, 256, KeyAlgorithm::Ed25519),
            (P256_PUB, P256_FP, 256, KeyAlgorithm::Ecdsa),
            (RSA3072_PUB, RSA3072_FP, 3072, KeyAlgorithm::Rsa),
        ] {
            let info = public_key_info(line).unwrap();
            assert_eq!((info.fingerprint.as_str(), info.bits, info.algorithm), (fp, bits, alg));
            assert_eq!(info.comment, "user@example.com");
            // Public only: stored normalised, one line.
            let v = validate_key_pair(None, Some(&format!("\r\n  {line}  \r\n")), None).unwrap();
            assert_eq!(v.public_key, format!("{line}\n"));
            assert!(v.private_key.is_none());
        }
        // Extra whitespace between fields, comment with spaces kept.
        let messy = format!("ssh-ed25519 \t {}   my  laptop key ", blob(ED25519_PUB));
        let v = validate_key_pair(None, Some(&messy), None).unwrap();
        assert_eq!(v.public_key, format!("ssh-ed25519 {} my  laptop key\n", blob(ED25519_PUB)));
        // No comment: no trailing space.
        let v = validate_key_pair(None, Some(&format!("ssh-ed25519 {}", blob(ED25519_PUB))), None).unwrap();
        assert_eq!(v.public_key, format!("ssh-ed25519 {}\n", blob(ED25519_PUB)));
        assert_eq!(v.info.comment, "");
    }

    #[test]
    fn keys_debug_redacts_private_keys() {
        let v = validate_key_pair(Some(ED25519_OPENSSH), None, None).unwrap();
        let dbg = format!("{v:?}");
        assert!(dbg.contains("<redacted>") && dbg.contains(ED25519_FP));
        assert_no_leak(&dbg.replace(blob(ED25519_PUB), ""), ED25519_OPENSSH, None);
        assert!(!dbg.contains("OPENSSH PRIVATE KEY"));
        let kp = generate(&GenerateOptions::default()).unwrap();
        let dbg = format!("{kp:?}");
        assert!(dbg.contains("<redacted>") && !dbg.contains("PRIVATE KEY"));
    }

    #[test]
    fn keys_openssh_private_vector() {
        let v = validate_key_pair(Some(ED25519_OPENSSH), None, None).unwrap();
        assert_eq!(v.public_key, format!("{ED25519_PUB}\n"));
        assert_eq!(v.info.fingerprint, ED25519_FP);
        assert_eq!(v.info.comment, "user@example.com");
        assert_eq!(v.private_key.as_deref().map(String::as_str), Some(ED25519_OPENSSH));
        // Indented / CRLF paste still works.
        let crlf: String = ED25519_OPENSSH.lines().map(|l| format!("  {l}\r\n")).collect();
        let v2 = validate_key_pair(Some(&crlf), None, Some("ignored")).unwrap();
        assert_eq!(v2.info.fingerprint, ED25519_FP);
        // With the matching public key (other comment): the given one is stored.
        let v3 =
            validate_key_pair(Some(ED25519_OPENSSH), Some(&format!("ssh-ed25519 {} other", blob(ED25519_PUB))), None)
                .unwrap();
        assert!(v3.public_key.ends_with(" other\n"));
        assert_eq!(v3.info.comment, "other");
        // Mismatch.
        let e = validate_key_pair(Some(ED25519_OPENSSH), Some(P256_PUB), None).unwrap_err();
        assert_eq!(e, KeyPairError { field: KeyPairField::PublicKey, message: MSG_MISMATCH.into() });
        assert_eq!(e.to_string(), "public_key: Private key and public key do not match");
        let fe: FieldError = e.clone().into();
        assert_eq!((fe.attribute.as_str(), fe.message.as_str()), ("public_key", MSG_MISMATCH));
    }

    #[test]
    fn keys_ppk_vectors() {
        let v = validate_key_pair(Some(ED25519_PPK), None, None).unwrap();
        assert_eq!(v.info.fingerprint, ED25519_FP);
        assert!(v.private_key.as_ref().unwrap().starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let e = validate_key_pair(Some(ED25519_PPK_ENC), None, None).unwrap_err();
        assert_eq!(e.field, KeyPairField::PrivateKey);
        assert!(e.message.starts_with("Encrypted private keys are not allowed"));
        let e = validate_key_pair(Some(ED25519_PPK_ENC), None, Some("wrong")).unwrap_err();
        assert_eq!(e.field, KeyPairField::Passphrase);
        let v = validate_key_pair(Some(ED25519_PPK_ENC), Some(ED25519_PUB), Some("123")).unwrap();
        assert_eq!(v.info.fingerprint, ED25519_FP);
        // Absurd Argon2 parameters are refused before any work is done.
        let greedy = ED25519_PPK_ENC.replace("Argon2-Memory: 8192", "Argon2-Memory: 4194304");
        let e = validate_key_pair(Some(&greedy), None, Some("123")).unwrap_err();
        assert_eq!(e.field, KeyPairField::PrivateKey);
        assert!(e.message.contains("more memory"), "{}", e.message);
        assert!(is_private_key_text(ED25519_PPK));
    }

    #[test]
    fn keys_encrypt_and_reimport() {
        let enc = encrypt_private_key(ED25519_OPENSSH, "s3cret pass").unwrap();
        assert!(enc.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n") && enc.ends_with("-----\n"));
        assert_ne!(enc.as_str(), ED25519_OPENSSH);
        let e = validate_key_pair(Some(&enc), None, None).unwrap_err();
        assert_eq!(e.field, KeyPairField::PrivateKey);
        assert!(e.message.starts_with(
            "Encrypted private keys are not allowed unless you give its passphrase in attributes.passphrase"
        ));
        let e = validate_key_pair(Some(&enc), None, Some("wrong")).unwrap_err();
        assert_eq!(e.field, KeyPairField::Passphrase);
        assert_eq!(e.message, MSG_WRONG_PASSPHRASE);
        let v = validate_key_pair(Some(&enc), None, Some("s3cret pass")).unwrap();
        assert_eq!(v.info.fingerprint, ED25519_FP);
        assert_eq!(v.info.comment, "user@example.com");

        assert!(encrypt_private_key(ED25519_OPENSSH, "").is_err());
        assert!(encrypt_private_key(&enc, "x").unwrap_err().contains("already encrypted"));
        let e = encrypt_private_key("garbage", "x").unwrap_err();
        assert!(e.contains("not an OpenSSH private key"));

        // An encrypted key asking for absurd bcrypt rounds is refused without running them.
        let greedy = patch_bcrypt_rounds(&enc, 1_000_000);
        let start = std::time::Instant::now();
        let e = validate_key_pair(Some(&greedy), None, Some("s3cret pass")).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(e.field, KeyPairField::PrivateKey);
        assert!(e.message.contains("1000000 KDF rounds"), "{}", e.message);
    }

    /// Rewrite the bcrypt rounds of an encrypted OpenSSH key (test helper).
    fn patch_bcrypt_rounds(pem: &str, rounds: u32) -> String {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut bin = STANDARD.decode(body).unwrap();
        let mut pos = b"openssh-key-v1\0".len();
        let read_len = |bin: &[u8], pos: usize| u32::from_be_bytes(bin[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 4 + read_len(&bin, pos); // cipher name
        pos += 4 + read_len(&bin, pos); // kdf name
        pos += 4; // kdf options length
        pos += 4 + read_len(&bin, pos); // salt
        bin[pos..pos + 4].copy_from_slice(&rounds.to_be_bytes());
        let b64 = STANDARD.encode(bin);
        let mut out = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
        for c in b64.as_bytes().chunks(70) {
            out.push_str(std::str::from_utf8(c).unwrap());
            out.push('\n');
        }
        out.push_str("-----END OPENSSH PRIVATE KEY-----\n");
        out
    }

    #[test]
    fn keys_public_private_confusion() {
        let e = validate_key_pair(Some(ED25519_PUB), None, None).unwrap_err();
        assert_eq!((e.field, e.message.as_str()), (KeyPairField::PrivateKey, MSG_LOOKS_PUBLIC));
        let e = validate_key_pair(None, Some(ED25519_OPENSSH), None).unwrap_err();
        assert_eq!((e.field, e.message.as_str()), (KeyPairField::PublicKey, MSG_IS_PRIVATE));
        assert_no_leak(&e.message, ED25519_OPENSSH, None);
        let e = validate_key_pair(None, Some(ED25519_PPK), None).unwrap_err();
        assert_eq!(e.field, KeyPairField::PublicKey);
        assert!(public_key_info(ED25519_OPENSSH).unwrap_err().contains("private key"));
        let e = validate_key_pair(
            Some("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----"),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(e.message, MSG_LOOKS_PUBLIC);
        let e = validate_key_pair(
            None,
            Some("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----"),
            None,
        )
        .unwrap_err();
        assert!(e.message.starts_with("Invalid public key: this is a PEM public key"));
    }

    #[test]
    fn keys_is_private_key_text() {
        for yes in [
            ED25519_OPENSSH,
            ED25519_PPK,
            "-----BEGIN RSA PRIVATE KEY-----",
            "junk\n  -----BEGIN EC PRIVATE KEY-----  \n",
            "-----BEGIN PRIVATE KEY-----",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----",
            "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----",
        ] {
            assert!(is_private_key_text(yes), "{yes}");
        }
        for no in ["", ED25519_PUB, "-----BEGIN PUBLIC KEY-----", "private key", "BEGIN PRIVATE KEY"] {
            assert!(!is_private_key_text(no), "{no}");
        }
    }

    #[test]
    fn keys_control_characters_are_refused_not_cleaned() {
        // Public key: a NUL or an escape in the comment used to be turned into a space.
        for (bad, code) in [
            (format!("{ED25519_PUB} co\u{0}mment"), "U+0000"),
            (format!("{ED25519_PUB} \u{1b}[31mred"), "U+001B"),
            (format!("{ED25519_PUB} a\u{7f}"), "U+007F"),
            (format!("{ED25519_PUB} a\u{2028}b"), "U+2028"),
            ("\u{0}\u{1}\u{2}".to_string(), "U+0000"),
        ] {
            let e = validate_key_pair(None, Some(&bad), None).unwrap_err();
            assert_eq!(e.field, KeyPairField::PublicKey, "{bad:?}");
            assert!(e.message.starts_with("Line 1: contains ") && e.message.contains(code), "{bad:?}: {}", e.message);
            assert!(public_key_info(&bad).unwrap_err().contains(code));
        }
        // The line number is that of the text as sent (leading blank lines count).
        let e = validate_key_pair(None, Some(&format!("\n\n{ED25519_PUB} x\u{1}")), None).unwrap_err();
        assert_eq!(e.message, "Line 3: contains a control character (U+0001); remove it");
        // Private key text: multi-line, CRLF allowed, anything else named with its line.
        let crlf = ED25519_OPENSSH.replace('\n', "\r\n");
        assert!(validate_key_pair(Some(&crlf), None, None).is_ok());
        let mut lines: Vec<String> = ED25519_OPENSSH.lines().map(str::to_string).collect();
        lines[2].push('\0');
        let e = validate_key_pair(Some(&lines.join("\n")), None, None).unwrap_err();
        assert_eq!(e.field, KeyPairField::PrivateKey);
        assert_eq!(e.message, "Line 3: contains a control character (U+0000); remove it");
        assert_no_leak(&e.message, ED25519_OPENSSH, None);
        // Pinned host keys of a connection.
        let (line, msg) = parse_host_key_lines(&format!("{ED25519_PUB}\n{P256_PUB}\u{0}")).unwrap_err();
        assert_eq!((line, msg.as_str()), (2, "contains a control character (U+0000); remove it"));
        // Generation comment.
        let e = validate_generate_options(&GenerateOptions { comment: Some("a\tb".into()), ..Default::default() })
            .unwrap_err();
        assert_eq!(e.attribute, "comment");
        assert_eq!(e.message, "The comment contains a control character (U+0009); remove it: it must be a single line");
    }

    #[test]
    fn keys_invalid_public_keys() {
        let b = blob(ED25519_PUB);
        for bad in [
            "garbage".to_string(),
            "ssh-ed25519".to_string(),
            "ssh-ed25519 !!!!".to_string(),
            "ssh-ed25519 AAAA".to_string(),
            format!("ssh-rsa {b}"),                       // type does not match the blob
            format!("ssh-ed25519 {}", &b[..b.len() - 8]), // truncated
            format!("ssh-ed25519 {b}AAAA"),               // trailing data
            format!("from=\"10.0.0.1\" ssh-ed25519 {b}"), // authorized_keys options
            "ключ ssh".to_string(),
        ] {
            let e = validate_key_pair(None, Some(&bad), None).unwrap_err();
            assert_eq!(e.field, KeyPairField::PublicKey, "{bad}");
            assert_eq!(e.message, MSG_INVALID_PUBLIC, "{bad}");
            assert!(public_key_info(&bad).is_err());
        }
        let two = format!("{ED25519_PUB}\n{P256_PUB}");
        let e = validate_key_pair(None, Some(&two), None).unwrap_err();
        assert!(e.message.starts_with("Invalid public key: give exactly one key"));
        for empty in [None, Some(""), Some("  \n ")] {
            let e = validate_key_pair(empty, empty, None).unwrap_err();
            assert_eq!((e.field, e.message.as_str()), (KeyPairField::PublicKey, MSG_NO_KEY));
        }
    }

    #[test]
    fn keys_adversarial_private_keys_do_not_panic() {
        let huge = "A".repeat(2 * 1024 * 1024);
        let huge_armoured = format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----",
            "A".repeat(60 * 1024)
        );
        let lines: Vec<&str> = ED25519_OPENSSH.lines().collect();
        let cases: Vec<String> = vec![
            "garbage".into(),
            "\u{0}\u{0}\u{0}".into(),
            "ключ 🔑 clé".into(),
            huge.clone(),
            huge_armoured,
            "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
            "-----BEGIN OPENSSH PRIVATE KEY-----\n-----END OPENSSH PRIVATE KEY-----".into(),
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----".into(),
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n-----END OPENSSH PRIVATE KEY-----".into(),
            "-----BEGIN OPENSSH PRIVATE KEY-----\nключ\n-----END OPENSSH PRIVATE KEY-----".into(),
            "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----".into(),
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----".into(),
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,ÿÿ\n\nAAAA\n-----END RSA PRIVATE KEY-----".into(),
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,000102030405060708090A0B0C0D0E0F\n\nAAAAAAAAAAAAAAAAAAAAAA==\n-----END RSA PRIVATE KEY-----".into(),
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: CAMELLIA-256-CBC,000102030405060708090A0B0C0D0E0F\n\nAAAA\n-----END RSA PRIVATE KEY-----".into(),
            "-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----".into(),
            "-----BEGIN PRIVATE KEY-----\nMIIBAAAA\n-----END PRIVATE KEY-----".into(),
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----".into(),
            "-----BEGIN DSA PRIVATE KEY-----\nMAA=\n-----END DSA PRIVATE KEY-----".into(),
            "-----BEGIN PRIVATE KEY-----\n-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----".into(),
            "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none".into(),
            "PuTTY-User-Key-File-9: x".into(),
            "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nAAAA\n---- END SSH2 ENCRYPTED PRIVATE KEY ----".into(),
            lines[..3].join("\n"),
            ED25519_OPENSSH.replace("b3BlbnNz", "b3BlbnNy"),
            ED25519_OPENSSH.replace('A', "B"),
            ED25519_OPENSSH[..ED25519_OPENSSH.len() - 40].to_string(),
        ];
        for c in &cases {
            for pass in [None, Some("pw")] {
                let e = validate_key_pair(Some(c), None, pass).unwrap_err();
                assert_ne!(e.field, KeyPairField::PublicKey, "{:.60}: {e}", c);
                assert_no_leak(&e.message, ED25519_OPENSSH, pass);
                assert!(e.message.len() < 600);
                assert!(!e.message.contains("AAAA"), "{e}");
            }
            let _ = validate_key_pair(None, Some(c), None);
            let _ = public_key_info(c);
            let _ = parse_host_key_lines(c);
            let _ = encrypt_private_key(c, "pw");
        }
    }

    /// Deterministic mutation fuzzing of valid inputs: nothing may panic.
    #[test]
    fn keys_mutations_do_not_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seeds = [ED25519_OPENSSH, ED25519_PPK, ED25519_PUB, P256_PUB, RSA3072_PUB];
        let alphabet = b"AZaz09+/=-\n :,\0\xff";
        for i in 0..3000 {
            let seed = seeds[i % seeds.len()].as_bytes();
            let mut bytes = seed.to_vec();
            for _ in 0..(1 + next() % 4) {
                let pos = (next() as usize) % bytes.len().max(1);
                match next() % 4 {
                    0 => bytes[pos] = alphabet[(next() as usize) % alphabet.len()],
                    1 => {
                        bytes.remove(pos);
                    }
                    2 => bytes.insert(pos, alphabet[(next() as usize) % alphabet.len()]),
                    _ => bytes.truncate(pos),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let s = String::from_utf8_lossy(&bytes);
            let _ = validate_key_pair(Some(&s), None, None);
            let _ = validate_key_pair(None, Some(&s), None);
            let _ = public_key_info(&s);
            let _ = parse_host_key_lines(&s);
        }
    }

    #[test]
    fn keys_host_key_lines() {
        let text = format!(
            "# ssh-keyscan output\n\n{ED25519_PUB}\n[127.0.0.1]:2222 {P256_PUB}\n  any-host {}  \n|1|abc=|def= {}\n",
            format_args!("ssh-rsa {}", blob(RSA3072_PUB)),
            format_args!("ssh-ed25519 {}", blob(ED25519_PUB)),
        );
        let keys = parse_host_key_lines(&text).unwrap();
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[0].key_type, "ssh-ed25519");
        assert_eq!(keys[0].base64, blob(ED25519_PUB));
        assert_eq!(keys[0].fingerprint, ED25519_FP);
        assert_eq!(keys[1].key_type, "ecdsa-sha2-nistp256");
        assert_eq!(keys[1].fingerprint, P256_FP);
        assert_eq!(keys[2].fingerprint, RSA3072_FP);
        assert_eq!(keys[2].to_line(), format!("ssh-rsa {}", blob(RSA3072_PUB)));
        assert_eq!(keys[3].fingerprint, ED25519_FP);
        assert_eq!(parse_host_key_lines("").unwrap(), vec![]);
        assert_eq!(parse_host_key_lines("# only a comment\n\n").unwrap(), vec![]);

        let b = blob(ED25519_PUB);
        for (bad, line) in [
            (format!("{ED25519_PUB}\nssh-rsa {b}"), 2),
            (format!("\n\nssh-ed25519 {}", &b[..20]), 3),
            ("host ssh-foo AAAA".to_string(), 1),
            ("host".to_string(), 1),
            ("ssh-ed25519".to_string(), 1),
            (format!("@cert-authority * ssh-ed25519 {b}"), 1),
            (format!("h ssh-ed25519-cert-v01@openssh.com {b}"), 1),
            ("ssh-ed25519 !!!".to_string(), 1),
        ] {
            let (n, msg) = parse_host_key_lines(&bad).unwrap_err();
            assert_eq!(n, line, "{bad}: {msg}");
            assert!(!msg.contains(&b[..12]), "{msg}");
        }
        let (_, msg) = parse_host_key_lines("host ssh-foo AAAA").unwrap_err();
        assert!(msg.contains("'ssh-foo'"), "{msg}");
        let (_, msg) = parse_host_key_lines(ED25519_OPENSSH).unwrap_err();
        assert!(msg.contains("private key"));
        assert_no_leak(&msg, ED25519_OPENSSH, None);
    }

    #[test]
    fn keys_helpers() {
        assert_eq!(mpint_bits(&[]), 0);
        assert_eq!(mpint_bits(&[0, 0, 1]), 1);
        assert_eq!(mpint_bits(&[0x80, 0]), 16);
        assert_eq!(mpint_bits(&[0, 0x7f, 0]), 15);
        assert!(der_is_complete_sequence(&[0x30, 0x00]));
        assert!(der_is_complete_sequence(&[0x30, 0x81, 0x01, 0x05]));
        assert!(!der_is_complete_sequence(&[0x30, 0x81, 0x02, 0x05]));
        assert!(!der_is_complete_sequence(&[0x30]));
        assert!(!der_is_complete_sequence(&[0x31, 0x00]));
        assert!(!der_is_complete_sequence(&[0x30, 0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(decode_hex("00fF10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        // EVP_BytesToKey(MD5, count 1): first block is MD5(pass || salt).
        let k = evp_bytes_to_key(b"x", b"12345678", 32);
        assert_eq!(&k[..16], &md5::compute(b"x12345678").0[..]);
        let mut second = b"".to_vec();
        second.extend_from_slice(&k[..16]);
        second.extend_from_slice(b"x12345678");
        assert_eq!(&k[16..], &md5::compute(&second).0[..]);
        assert_eq!(KeyPairField::Passphrase.as_str(), "passphrase");
        assert_eq!(KeyPairField::PrivateKey.as_str(), "private_key");
        assert_eq!(KeyPairField::PublicKey.as_str(), "public_key");
    }
}
