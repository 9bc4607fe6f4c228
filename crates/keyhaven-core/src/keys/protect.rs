//! Passphrase protection for downloads (OpenSSH format: bcrypt-pbkdf + aes256-ctr).

use super::*;

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
    let mut rng = os_rng();
    let encrypted =
        key.encrypt(&mut rng, passphrase).map_err(|_| "The private key could not be encrypted".to_string())?;
    openssh_text(&encrypted)
}
