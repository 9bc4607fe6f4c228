//! Hashing and randomness for credentials: Argon2id password hashes
//! (verified in reused working memory), SHA-256 for stored API keys and
//! tokens, constant-time comparison, random strings. A leaf module.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::PasswordHasher;
use argon2::Argon2;
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How long Argon2's working memory is kept after the last check.
pub const HASH_MEMORY_IDLE: Duration = Duration::from_secs(1);

/// Argon2id hash (PHC string) of a password. Slow by design: call from a blocking thread.
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .expect("argon2 with default params and a 16-byte salt")
        .to_string()
}

/// Argon2 working memory (~19 MiB per check) kept between checks: a burst
/// of logins reuses it instead of faulting in fresh pages each time, and a
/// few seconds after the last check it is released (see
/// [`release_idle_hash_memory`]). At most one buffer per concurrent check.
static HASH_MEMORY: Mutex<(Vec<Vec<argon2::Block>>, Option<Instant>)> = Mutex::new((Vec::new(), None));

/// Drop the kept Argon2 buffers once no check used them for `idle`: the
/// allocator returns such large blocks to the system at once.
pub fn release_idle_hash_memory(idle: Duration) {
    let mut m = HASH_MEMORY.lock().unwrap_or_else(|p| p.into_inner());
    if m.1.is_some_and(|t| t.elapsed() >= idle) {
        m.0.clear();
        m.0.shrink_to_fit();
        m.1 = None;
    }
}

/// Verify `password` against a PHC Argon2 hash, computing in reused memory.
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::{Algorithm, Params, PasswordHash, Version};
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else { return false };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else { return false };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else { return false };
    let argon = Argon2::new(algorithm, version, params.clone());
    let mut blocks = HASH_MEMORY.lock().unwrap_or_else(|p| p.into_inner()).0.pop().unwrap_or_default();
    blocks.resize(params.block_count(), argon2::Block::default());
    let mut out = vec![0u8; expected.len()];
    let ok =
        argon.hash_password_into_with_memory(password.as_bytes(), salt.as_ref(), &mut out, &mut blocks[..]).is_ok()
            && bool::from(out.as_slice().ct_eq(expected.as_bytes()));
    let mut m = HASH_MEMORY.lock().unwrap_or_else(|p| p.into_inner());
    m.0.push(blocks);
    m.1 = Some(Instant::now());
    ok
}

/// A hash nobody can match, verified against when the account does not exist
/// so that timing does not reveal which usernames exist.
pub fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("keyhaven-dummy-password-never-matches"))
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A random string of `n` characters from [A-Za-z0-9].
pub fn random_alnum(n: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..n).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

/// keyhaven's TOTP parameters (RFC 6238: SHA-1, 6 digits, 30 s steps, one
/// step of skew), declared once: authenticators are provisioned with the
/// same ones codes are checked with.
pub fn totp_builder(secret: totp_rs::Secret) -> totp_rs::Builder {
    totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(30)
        .with_secret(secret)
}
