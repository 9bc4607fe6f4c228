//! `authorized_keys` text: line-by-line validation and normalisation.
//!
//! keyhaven writes each account's public keys to the file named by the rendered
//! `AuthorizedKeysFile`, so everything it writes must be something sshd accepts.
//! [`parse_authorized_keys`] checks every line the way sshd(8) reads it
//! ("AUTHORIZED_KEYS FILE FORMAT"):
//!
//! ```text
//! [options] keytype base64-key [comment]
//! ```
//!
//! * Blank lines and `#` comment lines are allowed (and kept by [`normalize`]),
//!   but are not returned as keys.
//! * `keytype` must be one of [`SUPPORTED_KEY_TYPES`], and the base64 blob must
//!   decode to a key of that type. RSA keys must have at least [`MIN_RSA_BITS`]
//!   bits (and at most [`MAX_RSA_BITS`], sshd's own ceiling).
//! * OpenSSH certificates (`*-cert-v01@openssh.com`) are refused: sshd never
//!   matches a certificate listed in `authorized_keys` (it compares the
//!   certificate's *signing* key with `cert-authority` lines), so such a line
//!   could only ever be dead weight. DSA keys are refused too (disabled in
//!   OpenSSH and insecure).
//! * Options follow OpenSSH's `auth-options.c`: comma-separated, names matched
//!   case-insensitively, value options take a double-quoted value (`\"` escapes
//!   a quote inside it), flag options take none. The tokenizer is our own and
//!   quote-aware (ssh-key's `authorized_keys::Entry` splits at the first space,
//!   even inside quotes — see rust-stack.md gotcha 13).
//! * A pasted private key (PEM/OpenSSH armour or a PuTTY `.ppk`) is refused with
//!   a message asking for the `.pub` file instead.
//! * Control characters are refused anywhere in the text, `#` lines included
//!   (the rule is [`crate::text::check_multi_line`]: tab, LF and CRLF only).
//!
//! Messages name the 1-based line but never echo key material (base64, comments
//! or option values); option names and key types are echoed only after being
//! sanitised and shortened. Nothing here panics, whatever the input.

use std::fmt;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, Engine, GeneralPurpose, GeneralPurposeConfig};
use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PublicKey};

use crate::error::FieldError;

/// Largest `authorized_keys` text keyhaven accepts for one account (256 KiB).
pub const MAX_AUTHORIZED_KEYS_BYTES: usize = 256 * 1024;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: u32 = 2048;

/// Largest RSA modulus accepted, in bits (OpenSSH's `SSH_RSA_MAXIMUM_MODULUS_SIZE`).
pub const MAX_RSA_BITS: u32 = 16384;

/// Key types accepted in an `authorized_keys` line.
pub const SUPPORTED_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Options that take no value; each of these may also be written `no-<name>`.
const NEGATABLE_FLAGS: &[&str] =
    &["agent-forwarding", "port-forwarding", "pty", "touch-required", "user-rc", "verify-required", "x11-forwarding"];

/// Options that take no value and cannot be negated.
const PLAIN_FLAGS: &[&str] = &["cert-authority", "restrict"];

/// Options that require a double-quoted value.
const VALUE_OPTIONS: &[&str] =
    &["command", "environment", "expiry-time", "from", "permitlisten", "permitopen", "principals", "tunnel"];

/// Value options that sshd refuses to see twice on one line.
const SINGLE_VALUE_OPTIONS: &[&str] = &["command", "from", "principals"];

/// One key line of an `authorized_keys` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKeyLine {
    /// 1-based line number in the text that was parsed.
    pub line_no: usize,
    /// The options exactly as written, one per entry (e.g. `command="rsync --server"`, `no-pty`).
    pub options: Vec<String>,
    /// The key type token, e.g. `ssh-ed25519`.
    pub key_type: String,
    /// The base64 key blob as written.
    pub base64: String,
    /// The comment (rest of the line, trimmed; may be empty or contain spaces).
    pub comment: String,
    /// OpenSSH SHA-256 fingerprint, `SHA256:<unpadded base64>`.
    pub fingerprint: String,
}

impl AuthorizedKeyLine {
    /// The line in canonical form: `[options ]type base64[ comment]`.
    pub fn to_line(&self) -> String {
        let mut out = String::new();
        if !self.options.is_empty() {
            out.push_str(&self.options.join(","));
            out.push(' ');
        }
        out.push_str(&self.key_type);
        out.push(' ');
        out.push_str(&self.base64);
        if !self.comment.is_empty() {
            out.push(' ');
            out.push_str(&self.comment);
        }
        out
    }
}

/// Why an `authorized_keys` text was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKeysError {
    /// 1-based line the problem is on; `None` for whole-text problems (size).
    pub line_no: Option<usize>,
    pub message: String,
}

impl AuthorizedKeysError {
    fn line(line_no: usize, message: impl fmt::Display) -> Self {
        Self { line_no: Some(line_no), message: message.to_string() }
    }

    /// This error as a [`FieldError`] on `attribute` (message = the `Display` text).
    pub fn to_field_error(&self, attribute: impl Into<String>) -> FieldError {
        FieldError::new(attribute, self.to_string())
    }
}

impl fmt::Display for AuthorizedKeysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_no {
            Some(n) => write!(f, "Line {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for AuthorizedKeysError {}

/// Normalise an `authorized_keys` text for storage: trailing whitespace is
/// trimmed from every line (this also drops `\r` of CRLF endings) and from the
/// end of the text; blank and `#` lines are kept; a non-empty result ends with
/// exactly one `\n`.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 1);
    for line in text.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let keep = out.trim_end().len();
    out.truncate(keep);
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// Parse and validate a whole `authorized_keys` text.
///
/// Returns the key lines in order (blank and comment lines are skipped), or the
/// first problem found. A pasted private key is reported before anything else.
pub fn parse_authorized_keys(text: &str) -> Result<Vec<AuthorizedKeyLine>, AuthorizedKeysError> {
    if text.len() > MAX_AUTHORIZED_KEYS_BYTES {
        return Err(AuthorizedKeysError {
            line_no: None,
            message: format!(
                "The authorized keys text is {} bytes; the limit is {} bytes (256 KiB)",
                text.len(),
                MAX_AUTHORIZED_KEYS_BYTES
            ),
        });
    }

    // A private key anywhere in the text is the most important thing to say.
    for (idx, raw) in text.lines().enumerate() {
        if looks_like_private_key(raw.trim()) {
            return Err(AuthorizedKeysError::line(idx + 1, PRIVATE_KEY_MESSAGE));
        }
    }

    // Control characters anywhere, `#` lines included: sshd would stop reading
    // a line at a NUL, and the stored text must be what the caller sees.
    if let Err(e) = crate::text::check_multi_line(text) {
        return Err(AuthorizedKeysError::line(e.line.unwrap_or(1), e.reason()));
    }

    let mut keys = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim_matches(|c| c == ' ' || c == '\t' || c == '\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line_no = idx + 1;
        let key = parse_line(line, line_no).map_err(|m| AuthorizedKeysError::line(line_no, m))?;
        keys.push(key);
    }
    Ok(keys)
}

const PRIVATE_KEY_MESSAGE: &str = "This is a private key. Never share it: paste the public key \
     instead (the contents of the matching .pub file, e.g. ~/.ssh/id_ed25519.pub, one line \
     starting with the key type such as ssh-ed25519)";

/// base64 of `openssh-key-v1\0`, the start of an OpenSSH private key body.
const OPENSSH_PRIVATE_BODY_PREFIX: &str = "b3BlbnNzaC1rZXktdjE";

fn looks_like_private_key(line: &str) -> bool {
    let upper = line.to_ascii_uppercase();
    let armour = upper.starts_with("-----BEGIN")
        || upper.starts_with("-----END")
        || upper.starts_with("---- BEGIN")
        || upper.starts_with("---- END");
    (armour && upper.contains("PRIVATE KEY"))
        || line.starts_with("PuTTY-User-Key-File")
        || line.split_whitespace().any(|t| t.starts_with(OPENSSH_PRIVATE_BODY_PREFIX))
}

/// What is wrong with one `authorized_keys` line (shown after `Line N: `).
/// Each message says how to write the line instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error(
        "this is an RFC 4716 (SSH2) public key; convert it to the one-line OpenSSH form with \
         `ssh-keygen -i -f <file>` and paste that"
    )]
    Ssh2Block,
    #[error(
        "this is PEM-armoured data, not an OpenSSH public key; paste the one-line public key (e.g. the \
         contents of ~/.ssh/id_ed25519.pub); a PEM public key can be converted with \
         `ssh-keygen -i -m PKCS8 -f <file>`"
    )]
    PemBlock,
    #[error("the key type is missing: a line looks like `ssh-ed25519 AAAA… comment`")]
    MissingKeyType,
    #[error("the key type and key are missing after the options")]
    MissingKeyAfterOptions,
    #[error("the key data is missing after {0}")]
    MissingKeyData(String),
    #[error("unterminated quote in the key options (a value option looks like command=\"…\")")]
    UnterminatedOptions,
    #[error("misplaced quote in the key options (a value option looks like from=\"…\")")]
    MisplacedQuote,
    #[error("empty key option (stray comma?)")]
    EmptyOption,
    #[error("misplaced quote after key option '{0}' (a value option looks like from=\"…\")")]
    MisplacedQuoteAfter(String),
    #[error("key option '{0}' does not take a value")]
    FlagWithValue(String),
    #[error("unknown key option '{0}'")]
    UnknownOption(String),
    #[error("key option '{0}' needs a double-quoted value, e.g. {0}=\"…\"")]
    ValueNotQuoted(String),
    #[error("unterminated quote in key option '{0}'")]
    UnterminatedValue(String),
    #[error("key option '{0}' is given more than once")]
    RepeatedOption(&'static str),
    #[error("the key options end with a stray comma")]
    TrailingComma,
    #[error("unexpected text after key option '{0}' (separate options with commas)")]
    TextAfterOption(String),
    /// An option's value is malformed; `problem` says what it must look like.
    #[error("key option '{option}' {problem}")]
    BadOptionValue { option: &'static str, problem: &'static str },
    #[error(
        "OpenSSH certificates cannot be used in authorized_keys (sshd never matches them there); add the \
         public key itself, or the CA's public key with the cert-authority option to trust certificates it signs"
    )]
    Certificate,
    #[error(
        "DSA keys (ssh-dss) are not supported: they are insecure and disabled in OpenSSH; use an Ed25519 key \
         (ssh-keygen -t ed25519)"
    )]
    Dsa,
    #[error("unsupported key type '{0}' (supported: {supported})", supported = SUPPORTED_KEY_TYPES.join(", "))]
    UnsupportedType(String),
    #[error("the key data is not a valid {0} public key (is the base64 complete and unbroken?)")]
    InvalidKeyData(String),
    /// The line's type and the type inside the key data differ; `found` describes the latter.
    #[error("the line says {stated} but the key data is {found}")]
    TypeMismatch { stated: String, found: String },
    #[error("RSA key is {0} bits; at least {min} bits are required (prefer ssh-keygen -t ed25519)", min = MIN_RSA_BITS)]
    RsaTooSmall(u32),
    #[error("RSA key is {0} bits; sshd accepts at most {max}", max = MAX_RSA_BITS)]
    RsaTooLarge(u32),
}

/// Parse one non-blank, non-comment line (already trimmed). Errors are
/// shown after the line prefix.
/// The text has passed [`crate::text::check_multi_line`], so the only control
/// character left in a line is a tab (a separator, like a space).
fn parse_line(line: &str, line_no: usize) -> Result<AuthorizedKeyLine, LineError> {
    if line.starts_with("---- BEGIN SSH2 PUBLIC KEY") {
        return Err(LineError::Ssh2Block);
    }
    if line.starts_with("-----BEGIN") || line.starts_with("-----END") {
        return Err(LineError::PemBlock);
    }

    let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
    let first = words.next().unwrap_or("");
    let second = words.next();

    // No options when the first word is a key type, or when it is followed by
    // a base64 blob and cannot be an option (then it is an unknown key type).
    let bare_type =
        second.is_some_and(|s| s.starts_with("AAAA")) && !first.contains([',', '=', '"']) && !is_option_name(first);
    let has_options = !looks_like_key_type(first) && !bare_type;

    let (options, rest) = if has_options {
        if first.starts_with("AAAA") {
            return Err(LineError::MissingKeyType);
        }
        let (opts_text, rest) = split_options(line)?;
        (parse_options(opts_text)?, rest)
    } else {
        (Vec::new(), line)
    };

    let rest = rest.trim_start_matches([' ', '\t']);
    let (key_type, rest) = split_word(rest);
    if key_type.is_empty() {
        return Err(LineError::MissingKeyAfterOptions);
    }
    check_key_type(key_type)?;

    let (b64, rest) = split_word(rest.trim_start_matches([' ', '\t']));
    if b64.is_empty() {
        return Err(LineError::MissingKeyData(key_type.to_string()));
    }
    let comment = rest.trim_matches([' ', '\t']);

    let fingerprint = decode_key(key_type, b64)?;
    Ok(AuthorizedKeyLine {
        line_no,
        options,
        key_type: key_type.to_string(),
        base64: b64.to_string(),
        comment: comment.to_string(),
        fingerprint,
    })
}

fn split_word(s: &str) -> (&str, &str) {
    match s.find([' ', '\t']) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

fn looks_like_key_type(tok: &str) -> bool {
    if tok.contains([',', '=', '"']) {
        return false;
    }
    SUPPORTED_KEY_TYPES.contains(&tok)
        || ["ssh-", "ecdsa-", "sk-", "rsa-", "x509v3-", "webauthn-"].iter().any(|p| tok.starts_with(p))
}

fn is_option_name(tok: &str) -> bool {
    let lower = tok.to_ascii_lowercase();
    let base = lower.strip_prefix("no-").unwrap_or(&lower);
    NEGATABLE_FLAGS.contains(&base) || PLAIN_FLAGS.contains(&lower.as_str()) || VALUE_OPTIONS.contains(&lower.as_str())
}

/// Split the quote-aware options field off the start of `line`: it ends at the
/// first space or tab outside double quotes (`\"` inside quotes is escaped).
fn split_options(line: &str) -> Result<(&str, &str), LineError> {
    let bytes = line.as_bytes();
    let mut in_quote = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_quote && bytes.get(i + 1) == Some(&b'"') => i += 1,
            b'"' => in_quote = !in_quote,
            b' ' | b'\t' if !in_quote => return Ok((&line[..i], &line[i..])),
            _ => {}
        }
        i += 1;
    }
    if in_quote {
        Err(LineError::UnterminatedOptions)
    } else {
        Ok((line, ""))
    }
}

/// Show a user-supplied name in a message: printable ASCII only, at most 40 chars.
fn shown(name: &str) -> String {
    let mut out: String = name.chars().take(40).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect();
    if name.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// Parse the options field (OpenSSH `sshauthopt_parse` rules). Returns each
/// option as written.
fn parse_options(text: &str) -> Result<Vec<String>, LineError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut seen_single: Vec<&str> = Vec::new();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && !matches!(bytes[i], b',' | b'=' | b'"') {
            i += 1;
        }
        let name = &text[start..i];
        let lower = name.to_ascii_lowercase();
        if name.is_empty() {
            return Err(if i < bytes.len() && bytes[i] == b'"' {
                LineError::MisplacedQuote
            } else {
                LineError::EmptyOption
            });
        }
        if i < bytes.len() && bytes[i] == b'"' {
            return Err(LineError::MisplacedQuoteAfter(shown(name)));
        }
        let is_flag = PLAIN_FLAGS.contains(&lower.as_str())
            || NEGATABLE_FLAGS.contains(&lower.strip_prefix("no-").unwrap_or(&lower));
        let value_option: Option<&'static str> = VALUE_OPTIONS.iter().copied().find(|o| *o == lower);

        if i < bytes.len() && bytes[i] == b'=' {
            if is_flag {
                return Err(LineError::FlagWithValue(shown(name)));
            }
            let Some(canonical) = value_option else {
                return Err(LineError::UnknownOption(shown(name)));
            };
            i += 1;
            if bytes.get(i) != Some(&b'"') {
                return Err(LineError::ValueNotQuoted(lower));
            }
            i += 1;
            let mut value = String::new();
            let mut closed = false;
            let mut seg = i;
            while i < bytes.len() {
                if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'"') {
                    value.push_str(&text[seg..i]);
                    value.push('"');
                    i += 2;
                    seg = i;
                    continue;
                }
                if bytes[i] == b'"' {
                    value.push_str(&text[seg..i]);
                    closed = true;
                    i += 1;
                    break;
                }
                i += 1;
            }
            if !closed {
                return Err(LineError::UnterminatedValue(lower));
            }
            if SINGLE_VALUE_OPTIONS.contains(&canonical) {
                if seen_single.contains(&canonical) {
                    return Err(LineError::RepeatedOption(canonical));
                }
                seen_single.push(canonical);
            }
            check_option_value(canonical, &value)?;
        } else if value_option.is_some() {
            return Err(LineError::ValueNotQuoted(lower));
        } else if !is_flag {
            return Err(LineError::UnknownOption(shown(name)));
        }

        out.push(text[start..i].to_string());
        match bytes.get(i) {
            None => return Ok(out),
            Some(b',') => {
                i += 1;
                if i >= bytes.len() {
                    return Err(LineError::TrailingComma);
                }
            }
            Some(_) => return Err(LineError::TextAfterOption(lower)),
        }
    }
}

fn check_option_value(name: &'static str, value: &str) -> Result<(), LineError> {
    let problem = match name {
        "environment" if !valid_environment(value) => {
            "must look like environment=\"NAME=value\" (NAME of letters, digits and _)"
        }
        "expiry-time" if !valid_expiry_time(value) => {
            "must be YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS (optionally ending in Z for UTC)"
        }
        "permitopen" if !valid_permit(value, false) => "must look like permitopen=\"host:port\" (port 1-65535 or *)",
        "permitlisten" if !valid_permit(value, true) => {
            "must look like permitlisten=\"[host:]port\" (port 1-65535 or *)"
        }
        "tunnel" if !valid_tunnel(value) => "must be a tunnel device number or \"any\"",
        "from" | "principals" if value.trim().is_empty() => "must not be empty",
        _ => return Ok(()),
    };
    Err(LineError::BadOptionValue { option: name, problem })
}

fn valid_environment(value: &str) -> bool {
    value
        .split_once('=')
        .is_some_and(|(var, _)| !var.is_empty() && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

fn valid_tunnel(value: &str) -> bool {
    value.eq_ignore_ascii_case("any")
        || (!value.is_empty()
            && value.len() <= 10
            && value.bytes().all(|b| b.is_ascii_digit())
            && value.parse::<u64>().is_ok_and(|n| n <= 0x7fff_fffd))
}

fn valid_expiry_time(value: &str) -> bool {
    let digits = value
        .strip_suffix(['Z', 'z'])
        .or_else(|| {
            value
                .len()
                .checked_sub(3)
                .and_then(|n| value.get(n..).filter(|s| s.eq_ignore_ascii_case("UTC")).map(|_| &value[..n]))
        })
        .unwrap_or(value);
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let num = |r: std::ops::Range<usize>| digits[r].parse::<u32>().unwrap_or(u32::MAX);
    let (month, day) = (num(4..6), num(6..8));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    if digits.len() >= 12 && (num(8..10) > 23 || num(10..12) > 59) {
        return false;
    }
    digits.len() < 14 || num(12..14) <= 60
}

fn valid_permit(value: &str, listen: bool) -> bool {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => match p.strip_prefix(':') {
                Some(port) => (h, port),
                None => return false,
            },
            None => return false,
        }
    } else {
        match value.split_once(':') {
            Some(hp) => hp,
            None if listen => ("*", value),
            None => return false,
        }
    };
    let port_ok = port == "*"
        || (!port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p)));
    !host.is_empty() && host.len() < 1025 && !host.contains([' ', '\t']) && port_ok
}

fn check_key_type(key_type: &str) -> Result<(), LineError> {
    if SUPPORTED_KEY_TYPES.contains(&key_type) {
        return Ok(());
    }
    if key_type.ends_with("-cert-v01@openssh.com") {
        return Err(LineError::Certificate);
    }
    if key_type == "ssh-dss" {
        return Err(LineError::Dsa);
    }
    Err(LineError::UnsupportedType(shown(key_type)))
}

/// Lenient decoder used only to read the key type embedded in the blob.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Check the blob is a valid key of `key_type`; returns its SHA-256 fingerprint.
fn decode_key(key_type: &str, b64: &str) -> Result<String, LineError> {
    let invalid = || LineError::InvalidKeyData(key_type.to_string());
    let blob = LENIENT_B64.decode(b64).map_err(|_| invalid())?;
    let embedded = blob
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|n| blob.get(4..4usize.checked_add(n)?))
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or_else(invalid)?;
    if embedded != key_type {
        let what = if SUPPORTED_KEY_TYPES.contains(&embedded) || embedded.ends_with("-cert-v01@openssh.com") {
            format!("an {embedded} key")
        } else {
            "something else".to_string()
        };
        return Err(LineError::TypeMismatch { stated: key_type.to_string(), found: what });
    }
    let key = PublicKey::from_openssh(&format!("{key_type} {b64}")).map_err(|_| invalid())?;
    if let KeyData::Rsa(rsa) = key.key_data() {
        let bits = rsa.key_size();
        if bits < MIN_RSA_BITS {
            return Err(LineError::RsaTooSmall(bits));
        }
        if bits > MAX_RSA_BITS {
            return Err(LineError::RsaTooLarge(bits));
        }
    }
    Ok(key.fingerprint(HashAlg::Sha256).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Public halves of throwaway keys made with ssh-keygen; fingerprints from `ssh-keygen -lf`.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK9NKyrphVtBRFeWkXgnZ3hhUazR6Xdy3l1nQw8wIq7n";
    const ED25519_FP: &str = "SHA256:+Atcx1SryFebOabAbPA3jJbQHtjv20k0yoairMr9dXY";
    const ECDSA256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCgubu/2PLus7x9ZBFMPeiYOzXrgjlKEMgdEQ+nl1cVmT8Mbjr3EminyHP/+fgyQ+1HaBCMTaVsO4ePJKq2FKgw=";
    const ECDSA256_FP: &str = "SHA256:pAUbrrcDi3uVwitKU0QSEB4LQZKbCxMaSpl1TL8hiaE";
    const ECDSA384: &str = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBPp8k9/29aDAEKTFH4yJ6J6Hzl9wy59N7JqVKHr5/0To9cwy1f19YasFcz0VVHTNNHLy/U+na7eDTy9krY6VkOQL78YlHPOM3kXP9cdDtjAby7OkImiVeM1Zp7ATHbmVIw==";
    const ECDSA384_FP: &str = "SHA256:ArAvhPef/rovqvscIiDUY5eD0/PlRSj8Ei2ZKJ3NI74";
    const ECDSA521: &str = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAAfLfL72U2eqpF+YdHRvvvVNBD3s32+hs60kDTLLb96NU25/uDfo/jOfSTGRVyxgCSS9vVFafCk0DPnG5U1QwP8OQAFgRN21pQlUKM0UZfP444RDrY6R7YG+4Z14s4scSGKYlXpffaEIiS1veri7QxFzGfo/wLqQc68kF9z2Jnxsibv5A==";
    const ECDSA521_FP: &str = "SHA256:luZBIrvkJDTeqH8ZjO0WKbGwWTo3K/f3zMtTxi7AqGc";
    const RSA2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDorSpMJLfWljJIyTtLba7UdS/SZUGbaSYTdkxFJPqvE6mdiT6zlgs+Xp9h6hnDSsJ49JkiTNcsuTbd4HsRM3bJ530llLwa2ZiEiIMvyNRMIRfOy/+mQuDKIFEsjj9GmTwxFaegR5ZelK5oWayXpB1gw8QN3jSoGu3pNX+w1tNiGjdgDmiYFevov3/7+BN3HY/ff42+cZaGT+0HKq6VJyMP/5Gm5o6w+0sMz35f05PrS0Z4KaNEgtpf4n1g0IwHZVifpaAwSLMdUt9SL4SOkwowq8ugqierfsG1mVoiS3fhp0k7GhnkFLEt2AJZWhT7lmPn7gZy59shb7sG14BzMILL";
    const RSA2048_FP: &str = "SHA256:V/pdGf5coWh/f+Di0CTcJI6ZTggZgr3qzotZNpwYacA";
    const RSA1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDFzYjmwt9S4aR6/MGIGTEIvJsZXIgTIIowdMB/XZrHcmxb9igincXNQabSbTfIc1rWGIAO49PpcNitrqeNF+HndnpO98P02v3C5rIvKAMjznEEgmd8bIQ9v3/kSMoK0PTf/mE72ynSg/BR0IV2WkjB2fZV0zs2+skWEJv6xQA8tQ==";
    const SK_ED25519: &str = "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIK9NKyrphVtBRFeWkXgnZ3hhUazR6Xdy3l1nQw8wIq7nAAAABHNzaDo=";
    const SK_ED25519_FP: &str = "SHA256:sJ0kccEMI2TZ1Zz3Vx+AvU1DUbondyKqjZMBJ7OmNm4";
    const SK_ECDSA: &str = "sk-ecdsa-sha2-nistp256@openssh.com AAAAInNrLWVjZHNhLXNoYTItbmlzdHAyNTZAb3BlbnNzaC5jb20AAAAIbmlzdHAyNTYAAABBBCgubu/2PLus7x9ZBFMPeiYOzXrgjlKEMgdEQ+nl1cVmT8Mbjr3EminyHP/+fgyQ+1HaBCMTaVsO4ePJKq2FKgwAAAAEc3NoOg==";
    const SK_ECDSA_FP: &str = "SHA256:bNNZr0qJJuSpniie+CSZIjxpaabn97ulnBFcs2Bfjdo";
    const CERT: &str = "ecdsa-sha2-nistp256-cert-v01@openssh.com AAAAKGVjZHNhLXNoYTItbmlzdHAyNTYtY2VydC12MDFAb3BlbnNzaC5jb20AAAAgIalRomXuZcOziefl/g9RNJfcEpSHMZQLdiW1NCBmQX4AAAAIbmlzdHAyNTYAAABBBCgubu/2PLus7x9ZBFMPeiYOzXrgjlKEMgdEQ+nl1cVmT8Mbjr3EminyHP/+fgyQ+1HaBCMTaVsO4ePJKq2FKgwAAAAAAAAAAAAAAAEAAAAEdGVzdAAAAAAAAAAAAAAAAP//////////AAAAAAAAAIIAAAAVcGVybWl0LVgxMS1mb3J3YXJkaW5nAAAAAAAAABdwZXJtaXQtYWdlbnQtZm9yd2FyZGluZwAAAAAAAAAWcGVybWl0LXBvcnQtZm9yd2FyZGluZwAAAAAAAAAKcGVybWl0LXB0eQAAAAAAAAAOcGVybWl0LXVzZXItcmMAAAAAAAAAAAAAADMAAAALc3NoLWVkMjU1MTkAAAAgr00rKumFW0FEV5aReCdneGFRrNHpd3LeXWdDDzAirucAAABTAAAAC3NzaC1lZDI1NTE5AAAAQJ0cmdZzfml0aKJqdKONq97TGQH4jGsZZJfzLEHpHSO890T68UZ2G8IkfGZWIJDB+wjYxgqh6g8aj+wJbrYmQgw=";

    fn err(text: &str) -> AuthorizedKeysError {
        parse_authorized_keys(text).expect_err(text)
    }

    fn one(text: &str) -> AuthorizedKeyLine {
        let mut keys = parse_authorized_keys(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(keys.len(), 1, "{text}");
        keys.remove(0)
    }

    #[test]
    fn every_supported_type_parses_with_the_right_fingerprint() {
        for (line, fp) in [
            (ED25519, ED25519_FP),
            (ECDSA256, ECDSA256_FP),
            (ECDSA384, ECDSA384_FP),
            (ECDSA521, ECDSA521_FP),
            (RSA2048, RSA2048_FP),
            (SK_ED25519, SK_ED25519_FP),
            (SK_ECDSA, SK_ECDSA_FP),
        ] {
            let k = one(line);
            assert_eq!(k.fingerprint, fp, "{line}");
            assert_eq!(k.line_no, 1);
            assert!(k.options.is_empty());
            assert_eq!(k.comment, "");
            assert_eq!(k.to_line(), line);
        }
    }

    #[test]
    fn blank_and_comment_lines_are_skipped_and_line_numbers_kept() {
        let text = format!("# backup keys\n\n   \n{ED25519} alice@laptop\n  # indented comment\n{RSA2048}\r\n");
        let keys = parse_authorized_keys(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].line_no, 4);
        assert_eq!(keys[0].comment, "alice@laptop");
        assert_eq!(keys[1].line_no, 6);
        assert_eq!(keys[1].key_type, "ssh-rsa");
        assert!(parse_authorized_keys("").unwrap().is_empty());
        assert!(parse_authorized_keys("\n# only a comment\n").unwrap().is_empty());
    }

    #[test]
    fn comment_may_contain_spaces_and_quotes() {
        let k = one(&format!("{ED25519}   backup key for \"nas\" it's fine  "));
        assert_eq!(k.comment, "backup key for \"nas\" it's fine");
    }

    #[test]
    fn quoted_options_with_spaces_and_commas_parse() {
        let line = format!(
            "command=\"rsync --server -vlogDtpre.iLsfxC . /mnt/tank\",restrict,from=\"10.0.0.0/8,192.168.1.*\",environment=\"A=b c\",NO-PTY,no-X11-forwarding {ED25519} backup@nas"
        );
        let k = one(&line);
        assert_eq!(
            k.options,
            vec![
                "command=\"rsync --server -vlogDtpre.iLsfxC . /mnt/tank\"",
                "restrict",
                "from=\"10.0.0.0/8,192.168.1.*\"",
                "environment=\"A=b c\"",
                "NO-PTY",
                "no-X11-forwarding",
            ]
        );
        assert_eq!(k.key_type, "ssh-ed25519");
        assert_eq!(k.comment, "backup@nas");
        assert_eq!(k.fingerprint, ED25519_FP);
        assert_eq!(k.to_line(), line);
    }

    #[test]
    fn escaped_quote_inside_value_and_tab_separator() {
        let k = one(&format!("command=\"echo \\\"hi there\\\"\"\t{ED25519}"));
        assert_eq!(k.options, vec!["command=\"echo \\\"hi there\\\"\""]);
    }

    #[test]
    fn every_openssh_option_is_accepted() {
        let opts = [
            "agent-forwarding",
            "cert-authority",
            "command=\"true\"",
            "environment=\"PATH=/bin\"",
            "expiry-time=\"20300101\"",
            "expiry-time=\"203001011230\"",
            "expiry-time=\"20300101123059Z\"",
            "from=\"*.example.com,!bad.example.com\"",
            "no-agent-forwarding",
            "no-port-forwarding",
            "no-pty",
            "no-user-rc",
            "no-X11-forwarding",
            "permitlisten=\"8080\"",
            "permitlisten=\"localhost:8080\"",
            "permitopen=\"192.0.2.1:80\"",
            "permitopen=\"[2001:db8::1]:*\"",
            "port-forwarding",
            "principals=\"alice,bob\"",
            "pty",
            "no-touch-required",
            "touch-required",
            "verify-required",
            "restrict",
            "tunnel=\"0\"",
            "tunnel=\"any\"",
            "user-rc",
            "X11-forwarding",
        ];
        for o in opts {
            let k = one(&format!("{o} {SK_ED25519}"));
            assert_eq!(k.options, vec![o.to_string()]);
        }
    }

    #[test]
    fn bad_options_are_refused_with_the_line_number() {
        let cases = [
            ("no-such-option", "unknown key option 'no-such-option'"),
            ("bogus=\"x\"", "unknown key option 'bogus'"),
            ("no-pty=\"x\"", "does not take a value"),
            ("restrict=\"x\"", "does not take a value"),
            ("no-restrict", "unknown key option 'no-restrict'"),
            ("command", "needs a double-quoted value"),
            ("command=true", "needs a double-quoted value"),
            ("command=\"a\"x", "unexpected text after key option"),
            ("no-pty,", "stray comma"),
            ("no-pty,,restrict", "empty key option"),
            ("command=\"a\",command=\"b\"", "more than once"),
            ("FROM=\"a\",from=\"b\"", "more than once"),
            ("environment=\"noequals\"", "environment"),
            ("environment=\"BAD-NAME=1\"", "environment"),
            ("expiry-time=\"2030\"", "expiry-time"),
            ("expiry-time=\"20301301\"", "expiry-time"),
            ("permitopen=\"host\"", "permitopen"),
            ("permitopen=\"host:0\"", "permitopen"),
            ("permitopen=\"host:99999\"", "permitopen"),
            ("tunnel=\"eth0\"", "tunnel"),
            ("from=\"\"", "must not be empty"),
        ];
        for (opts, want) in cases {
            let text = format!("# c\n{ED25519}\n{opts} {ED25519}\n");
            let e = err(&text);
            assert_eq!(e.line_no, Some(3), "{opts}: {e}");
            assert!(e.message.contains(want), "{opts}: {e}");
            assert!(e.to_string().starts_with("Line 3: "), "{e}");
        }
    }

    #[test]
    fn unterminated_quote_is_an_error() {
        for line in [
            format!("command=\"rsync --server {ED25519}"),
            "command=\"".to_string(),
            "\"".to_string(),
            format!("from=\"a\\\" {ED25519}"),
        ] {
            let e = err(&line);
            assert_eq!(e.line_no, Some(1));
            assert!(e.message.contains("quote"), "{line}: {e}");
        }
    }

    #[test]
    fn private_keys_are_refused_without_echoing_them() {
        let body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW";
        let cases = [
            format!("{ED25519}\n-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----\n"),
            format!("{ED25519}\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"),
            format!("{ED25519}\n-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n-----END ENCRYPTED PRIVATE KEY-----"),
            format!("{ED25519}\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n"),
            format!("{ED25519}\nPuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: x\nPublic-Lines: 2\n"),
            format!("{ED25519}\n{body}\n"),
            format!("{ED25519}\n---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\n"),
        ];
        for text in cases {
            let e = err(&text);
            assert_eq!(e.line_no, Some(2), "{text}");
            assert!(e.message.contains("private key"), "{e}");
            assert!(e.message.contains(".pub"), "{e}");
            assert!(!e.message.contains("b3BlbnNz") && !e.message.contains("MII"), "{e}");
        }
        // Reported even when an earlier line is broken.
        let e = err("garbage line\n-----BEGIN OPENSSH PRIVATE KEY-----\n");
        assert_eq!(e.line_no, Some(2));
        assert!(e.message.contains("private key"));
    }

    #[test]
    fn other_armour_gets_a_conversion_hint() {
        let e = err("---- BEGIN SSH2 PUBLIC KEY ----\nAAAAB3Nza\n---- END SSH2 PUBLIC KEY ----\n");
        assert!(e.message.contains("ssh-keygen -i"), "{e}");
        let e = err("-----BEGIN PUBLIC KEY-----\nMIIBIjAN\n-----END PUBLIC KEY-----\n");
        assert!(e.message.contains("PEM"), "{e}");
    }

    #[test]
    fn small_rsa_keys_are_refused() {
        let e = err(&format!("{ED25519}\n{RSA1024} old"));
        assert_eq!(e.line_no, Some(2));
        assert!(e.message.contains("1024 bits") && e.message.contains("2048"), "{e}");
    }

    #[test]
    fn certificates_dsa_and_unknown_types_are_refused_clearly() {
        let e = err(CERT);
        assert!(e.message.contains("certificates") && e.message.contains("cert-authority"), "{e}");
        let e = err("ssh-dss AAAAB3NzaC1kc3MAAACBAP1 old");
        assert!(e.message.contains("DSA"), "{e}");
        let e = err("ssh-foo AAAAC3NzaC1lZDI1NTE5 x");
        assert!(e.message.contains("unsupported key type 'ssh-foo'"), "{e}");
        let e = err("SSH-ED25519 AAAAC3NzaC1lZDI1NTE5AAAAIK9NKyrphVtBRFeWkXgnZ3hhUazR6Xdy3l1nQw8wIq7n");
        assert!(e.message.contains("unsupported key type"), "{e}");
        let e = err("AAAAC3NzaC1lZDI1NTE5AAAAIK9NKyrphVtBRFeWkXgnZ3hhUazR6Xdy3l1nQw8wIq7n me@host");
        assert!(e.message.contains("key type is missing"), "{e}");
        assert!(!e.message.contains("AAAAC3"), "{e}");
    }

    #[test]
    fn type_and_blob_must_agree_and_blob_must_be_valid() {
        let ed_blob = ED25519.split(' ').nth(1).unwrap();
        let e = err(&format!("ssh-rsa {ed_blob} x"));
        assert!(e.message.contains("says ssh-rsa but the key data is an ssh-ed25519 key"), "{e}");
        let e = err("ssh-ed25519");
        assert!(e.message.contains("key data is missing"), "{e}");
        let e = err("no-pty ssh-ed25519");
        assert!(e.message.contains("key data is missing"), "{e}");
        let e = err("no-pty");
        assert!(e.message.contains("key type and key are missing"), "{e}");
        let truncated = &ED25519[..ED25519.len() - 8];
        let e = err(truncated);
        assert!(e.message.contains("not a valid ssh-ed25519 public key"), "{e}");
        assert!(!e.message.contains("AAAA"), "{e}");
        let e = err("ssh-ed25519 !!!notbase64!!!");
        assert!(e.message.contains("not a valid"), "{e}");
        let e = err(&format!("{ED25519}AAAA"));
        assert!(e.message.contains("not a valid"), "{e}");
    }

    #[test]
    fn control_characters_are_refused() {
        let e = err(&format!("{ED25519} a\u{0}b"));
        assert!(e.message.contains("control character"), "{e}");
        let e = err(&format!("{ED25519} a\rb"));
        assert!(e.message.contains("control character"), "{e}");
        // Anywhere, with the line and the character named: comment lines,
        // DEL, C1 and escape sequences too; CRLF endings and tabs are fine.
        for (text, line, code) in [
            (format!("{ED25519}\n# note\u{0}\n"), 2, "U+0000"),
            (format!("\n\n{ED25519} x\u{7f}y"), 3, "U+007F"),
            (format!("{ED25519} \u{1b}[2Jhidden"), 1, "U+001B"),
            (format!("{ED25519}\r\n{ED25519} a\u{85}"), 2, "U+0085"),
        ] {
            let e = err(&text);
            assert_eq!(e.line_no, Some(line), "{text:?}");
            assert_eq!(e.to_string(), format!("Line {line}: contains a control character ({code}); remove it"));
        }
        assert_eq!(parse_authorized_keys(&format!("{ED25519}\tcomment\r\n# x\r\n")).unwrap().len(), 1);
    }

    #[test]
    fn size_cap_names_the_limit() {
        let text = format!("{ED25519}\n").repeat(MAX_AUTHORIZED_KEYS_BYTES / 60 + 10);
        assert!(text.len() > MAX_AUTHORIZED_KEYS_BYTES);
        let e = err(&text);
        assert_eq!(e.line_no, None);
        assert!(e.message.contains("262144") && e.message.contains("256 KiB"), "{e}");
        assert!(!e.to_string().starts_with("Line"));
        let ok = format!("{ED25519}\n").repeat(MAX_AUTHORIZED_KEYS_BYTES / 100);
        assert_eq!(parse_authorized_keys(&ok).unwrap().len(), MAX_AUTHORIZED_KEYS_BYTES / 100);
    }

    #[test]
    fn messages_never_echo_long_names() {
        let long = "x".repeat(500);
        let e = err(&format!("{long} {ED25519}"));
        assert!(e.message.len() < 200, "{e}");
    }

    #[test]
    fn error_converts_to_field_error() {
        let fe = err("junk").to_field_error("user_update.sshpubkey");
        assert_eq!(fe.attribute, "user_update.sshpubkey");
        assert!(fe.message.starts_with("Line 1: "));
    }

    #[test]
    fn never_panics_on_garbage() {
        let valid = format!("command=\"a b\",from=\"x\" {ED25519} c");
        let mut inputs: Vec<String> = vec![
            "\"".into(),
            "\"\"".into(),
            "\\".into(),
            "=\"".into(),
            ",".into(),
            "=".into(),
            "no-pty=".into(),
            "command=\"\\".into(),
            "command=\"\\\"".into(),
            "ssh-ed25519 ====".into(),
            "ssh-ed25519 AAAA".into(),
            "ssh-rsa AAAAB3NzaC1yc2EAAAAAAAAAAA==".into(),
            "ssh-rsa AAAAB3NzaC1yc2E=".into(),
            "ssh-ed25519 /////////////w==".into(),
            "\u{feff}ssh-ed25519 AAAA".into(),
            "ключ ssh-ed25519 AAAA ключ".into(),
            "€=\"€\" ssh-ed25519 AAAA".into(),
            "\u{fffd}\u{fffd}\u{fffd}".into(),
            "A".repeat(200_000),
            format!("command=\"{}", "a".repeat(200_000)),
            "ssh-ed25519 ".to_string() + &"A".repeat(200_000),
        ];
        // Every prefix of a valid line with options.
        for (i, _) in valid.char_indices() {
            inputs.push(valid[..i].to_string());
        }
        // Deterministic pseudo-random mixes of the interesting characters.
        let alphabet: Vec<char> = "\"\\,= \tAa-#ssh-ed25519€\u{0}\r/+".chars().collect();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let len = (seed % 40) as usize;
            let mut s = String::new();
            for _ in 0..len {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                s.push(alphabet[(seed >> 33) as usize % alphabet.len()]);
            }
            inputs.push(s);
        }
        for input in &inputs {
            let _ = parse_authorized_keys(input);
            let _ = normalize(input);
        }
    }

    #[test]
    fn normalize_trims_and_terminates() {
        assert_eq!(normalize(""), "");
        assert_eq!(normalize(" \n\t\n"), "");
        assert_eq!(normalize("a"), "a\n");
        assert_eq!(normalize("a  \r\n\n# c \t\n\nb\n\n\n  "), "a\n\n# c\n\nb\n");
        assert_eq!(normalize("\n  a"), "\n  a\n");
        let once = normalize("x \n y\t\n");
        assert_eq!(normalize(&once), once);
    }
}
