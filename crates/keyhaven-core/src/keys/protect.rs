//! Passphrase protection for downloads (OpenSSH format: bcrypt-pbkdf + aes256-ctr).

use super::*;

/// Why a private key could not be protected with a passphrase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtectError {
    #[error("The passphrase must not be empty")]
    EmptyPassphrase,
    #[error("The passphrase must be at most {max} bytes", max = MAX_PASSPHRASE_LEN)]
    PassphraseTooLong,
    #[error("The private key is too large")]
    KeyTooLarge,
    #[error("The private key is not an OpenSSH private key")]
    NotOpenSsh,
    #[error("The private key is already encrypted")]
    AlreadyEncrypted,
    #[error("The private key could not be encrypted")]
    Encrypt,
    #[error(transparent)]
    Encode(#[from] KeyError),
}

/// Encrypt an unencrypted OpenSSH private key with `passphrase` (bcrypt-pbkdf,
/// aes256-ctr, as `ssh-keygen -p` does); readable by `ssh-keygen -y -P <pass>`.
pub fn encrypt_private_key(openssh_private: &str, passphrase: &str) -> Result<Zeroizing<String>, ProtectError> {
    if passphrase.is_empty() {
        return Err(ProtectError::EmptyPassphrase);
    }
    if passphrase.len() > MAX_PASSPHRASE_LEN {
        return Err(ProtectError::PassphraseTooLong);
    }
    if openssh_private.len() > MAX_PRIVATE_KEY_LEN {
        return Err(ProtectError::KeyTooLarge);
    }
    let key = PrivateKey::from_openssh(openssh_private.trim()).map_err(|_| ProtectError::NotOpenSsh)?;
    if key.is_encrypted() {
        return Err(ProtectError::AlreadyEncrypted);
    }
    let mut rng = os_rng();
    let encrypted = key.encrypt(&mut rng, passphrase).map_err(|_| ProtectError::Encrypt)?;
    Ok(openssh_text(&encrypted)?)
}
