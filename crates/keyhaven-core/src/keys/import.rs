//! Reading private key text in every supported format: OpenSSH, PEM (PKCS#1, SEC1, PKCS#8, plain and
//! encrypted) and PuTTY.

use super::*;

/// A PEM-style block found in the pasted text.
pub(super) struct Armour<'a> {
    /// One of the fixed labels below (never user text).
    label: &'static str,
    /// `(Proc-Type | DEK-Info | other, value)`.
    headers: Vec<(&'static str, &'a str)>,
    /// Decoded body (secret).
    der: Zeroizing<Vec<u8>>,
}

/// Lenient base64 for pasted key bodies (padding optional, trailing bits allowed).
pub(super) const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub(super) fn is_armour_begin(line: &str) -> Option<&str> {
    line.strip_prefix("-----BEGIN ")?.strip_suffix("-----").map(str::trim)
}

/// Find the first `-----BEGIN <...> PRIVATE KEY-----` block (skipping e.g. `EC PARAMETERS`).
pub(super) fn find_private_armour<'a>(lines: &[&'a str]) -> Result<Armour<'a>, KeyPairError> {
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
pub(super) fn header_name(k: &str) -> &'static str {
    if k.eq_ignore_ascii_case("Proc-Type") {
        "Proc-Type"
    } else if k.eq_ignore_ascii_case("DEK-Info") {
        "DEK-Info"
    } else {
        "other"
    }
}

pub(super) fn safe_label(label: &str) -> Option<&str> {
    (label.len() <= 40 && label.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' '))
        .then_some(label)
}

/// Parse a pasted private key into a decrypted [`PrivateKey`].
pub(super) fn parse_private_key(text: &str, passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
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
            der_keys::decode_private_key_der(&armour.der).map_err(map_plain_decode_error)
        }
        "ENCRYPTED PRIVATE KEY" => parse_encrypted_pkcs8(&armour.der, passphrase),
        "SSH2 ENCRYPTED PRIVATE KEY" => Err(KeyPairError::private(
            "SSH2 (ssh.com / Tectia) private keys are not supported. Convert the key to OpenSSH \
             format first (ssh-keygen -i -f <file>)",
        )),
        _ => Err(KeyPairError::private(MSG_UNREADABLE)),
    }
}

pub(super) fn parse_openssh(der: &[u8], passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
    if !der.starts_with(b"openssh-key-v1\0") {
        return Err(KeyPairError::private(MSG_DAMAGED));
    }
    // ssh-key refuses a P-256 scalar that OpenSSH encoded in fewer than 32
    // bytes (one key in 256 has a leading zero byte); pad it and retry.
    let repaired = PrivateKey::from_bytes(der).is_err().then(|| pad_short_ecdsa_scalar(der)).flatten();
    let der = repaired.as_deref().map(|v| v.as_slice()).unwrap_or(der);
    let key = PrivateKey::from_bytes(der).map_err(|e| match e {
        ssh_key::Error::AlgorithmUnknown | ssh_key::Error::AlgorithmUnsupported { .. } => {
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
    if let ssh_key::Kdf::Bcrypt { rounds, .. } = key.kdf() {
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
        ssh_key::Error::Crypto => KeyPairError::passphrase(MSG_WRONG_PASSPHRASE),
        ssh_key::Error::AlgorithmUnsupported { .. } | ssh_key::Error::AlgorithmUnknown => KeyPairError::private(
            "This private key is encrypted with a cipher keyhaven cannot read. Re-encrypt it \
             with a current ssh-keygen (ssh-keygen -p -f <file>) or remove the passphrase",
        ),
        // A wrong passphrase usually fails the checkint comparison, which ssh-key may
        // report as an encoding error rather than `Crypto`.
        _ => KeyPairError::passphrase(MSG_WRONG_PASSPHRASE),
    })
}

/// Decrypt an encrypted OpenSSH key blob `der` (already parsed as `key`) and,
/// when it is an `ecdsa-sha2-nistp256` key with a short scalar, return it
/// repaired. `None` for anything else, a wrong passphrase included.
pub(super) fn decrypt_padding_short_ecdsa_scalar(key: &PrivateKey, der: &[u8], pass: &str) -> Option<PrivateKey> {
    use ssh_key::cipher::Tag;
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

pub(super) const OPENSSH_MAGIC: &[u8] = b"openssh-key-v1\0";

/// Reads SSH wire-format fields (RFC 4251 `uint32` and `string`).
pub(super) struct SshReader<'a>(&'a [u8]);

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

pub(super) fn put_ssh_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Re-encode an unencrypted OpenSSH `ecdsa-sha2-nistp256` key whose private
/// scalar is shorter than 32 bytes with the scalar left-padded to 32 bytes.
/// `None` when the blob is anything else.
pub(super) fn pad_short_ecdsa_scalar(der: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
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
pub(super) fn parse_traditional_pem(armour: &Armour<'_>, passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
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
                der_keys::DerKeyError::UnknownAlgorithm(_) => map_plain_decode_error(e),
                der_keys::DerKeyError::Invalid => KeyPairError::passphrase(MSG_WRONG_PASSPHRASE),
            }
        } else {
            map_plain_decode_error(e)
        }
    };
    if armour.label == "EC PRIVATE KEY" {
        der_keys::decode_private_key_der(&plain).map_err(map_err)
    } else {
        der_keys::decode_pkcs1_rsa(&plain).map_err(map_err)
    }
}

/// Errors of an unencrypted PEM/PKCS#8 decode.
pub(super) fn map_plain_decode_error(e: der_keys::DerKeyError) -> KeyPairError {
    match e {
        der_keys::DerKeyError::UnknownAlgorithm(oid) => {
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
        der_keys::DerKeyError::Invalid => KeyPairError::private(MSG_UNREADABLE),
    }
}

pub(super) fn parse_encrypted_pkcs8(der: &[u8], passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
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
    der_keys::decode_encrypted_pkcs8(der, pass.as_bytes()).map_err(|e| match e {
        der_keys::DerKeyError::UnknownAlgorithm(_) => map_plain_decode_error(e),
        der_keys::DerKeyError::Invalid => KeyPairError::passphrase(MSG_WRONG_PASSPHRASE),
    })
}

/// PuTTY `.ppk` (v2/v3).
pub(super) fn parse_ppk(lines: &[&str], passphrase: Option<&str>) -> Result<PrivateKey, KeyPairError> {
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
pub(super) fn der_is_complete_sequence(der: &[u8]) -> bool {
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
