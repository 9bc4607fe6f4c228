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
//! One submodule per concern: `generate`, `public` (public keys, fingerprints),
//! `validate` (import rules), `import` (private key formats), `der_keys` (PKCS#8, SEC1
//! and PKCS#1 structures, through the RustCrypto crates), `legacy_pem` (old
//! OpenSSL encryption, decrypt only), `protect` (download encryption) and
//! `host_keys`. Limits and user-facing messages live here, shared by all.
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
use serde::{Deserialize, Serialize};
use ssh_key::encoding::Encode as _;
use ssh_key::private::{KeypairData, RsaKeypair};
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, EcdsaCurve, HashAlg, LineEnding, PrivateKey, PublicKey};
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

mod der_keys;
mod generate;
mod host_keys;
mod import;
mod legacy_pem;
mod protect;
mod public;
mod validate;

/// The OS RNG (getrandom) as the `rand_core` generator ssh-key takes. Panics if the OS
/// cannot provide randomness.
fn os_rng() -> getrandom::rand_core::UnwrapErr<getrandom::SysRng> {
    getrandom::rand_core::UnwrapErr(getrandom::SysRng)
}

pub use generate::*;
pub use host_keys::*;
use import::*;
use legacy_pem::*;
pub use protect::*;
pub use public::*;
pub use validate::*;

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
        assert_eq!(encrypt_private_key(&enc, "x").unwrap_err(), ProtectError::AlreadyEncrypted);
        let e = encrypt_private_key("garbage", "x").unwrap_err();
        assert_eq!(e, ProtectError::NotOpenSsh);

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
        assert_eq!(public_key_info(ED25519_OPENSSH).unwrap_err(), KeyError::IsPrivate);
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
            assert!(public_key_info(&bad).unwrap_err().to_string().contains(code));
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
