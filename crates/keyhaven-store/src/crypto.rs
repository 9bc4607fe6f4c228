//! The master key file and the sealing of secret columns.
//!
//! `master.key` holds 32 random bytes. It is created with mode 0600 at open
//! (`create_new`), never chmod-ed afterwards, so there is no window in which it is
//! readable by others. Each sealed value is `0x01 ‖ nonce(24) ‖ ciphertext+tag`
//! with associated data `keyhaven:v1:<table>:<row>:<column>`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Result, StoreError};

pub const MASTER_KEY_FILE: &str = "master.key";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// The 32-byte key that seals every secret column. Zeroed on drop.
pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(********)")
    }
}

impl MasterKey {
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        Self { bytes }
    }

    /// Write a new key file; fails if the file exists. Mode 0600 from the first byte.
    pub fn create_file(&self, path: &Path) -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        f.write_all(self.bytes.as_ref()).map_err(|e| StoreError::io(path, e))?;
        f.sync_all().map_err(|e| StoreError::io(path, e))?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(|e| StoreError::io(path, e))?;
        let mut buf = Zeroizing::new(Vec::with_capacity(33));
        f.read_to_end(&mut buf).map_err(|e| StoreError::io(path, e))?;
        if buf.len() != 32 {
            return Err(StoreError::BadMasterKey { path: path.to_path_buf() });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&buf);
        Ok(Self { bytes })
    }

    /// Whether `other` is the same key (compared without early exit).
    pub(crate) fn same_as(&self, other: &MasterKey) -> bool {
        self.bytes.iter().zip(other.bytes.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        let mut k = Key::default();
        k.copy_from_slice(self.bytes.as_ref());
        let c = XChaCha20Poly1305::new(&k);
        k.zeroize();
        c
    }

    fn aad(table: &str, row: i64, column: &str) -> Vec<u8> {
        format!("keyhaven:v1:{table}:{row}:{column}").into_bytes()
    }

    /// Seal `plaintext` for one cell.
    pub fn seal(&self, table: &str, row: i64, column: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = Self::aad(table, row, column);
        let ct = self
            .cipher()
            .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad: &aad })
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Open a sealed cell; `None` if it was sealed for another cell or another key.
    pub fn open(&self, table: &str, row: i64, column: &str, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != VERSION {
            return None;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        let aad = Self::aad(table, row, column);
        self.cipher()
            .decrypt(&XNonce::from(nonce), Payload { msg: &sealed[1 + NONCE_LEN..], aad: &aad })
            .ok()
            .map(Zeroizing::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let k = MasterKey::generate();
        let s = k.seal("keychain", 7, "private_key", b"secret");
        assert_eq!(k.open("keychain", 7, "private_key", &s).unwrap().as_slice(), b"secret");
        assert!(k.open("keychain", 8, "private_key", &s).is_none(), "row is bound");
        assert!(k.open("users", 7, "private_key", &s).is_none(), "table is bound");
        assert!(k.open("keychain", 7, "other", &s).is_none(), "column is bound");
        let other = MasterKey::generate();
        assert!(other.open("keychain", 7, "private_key", &s).is_none(), "key is bound");
        assert!(!s.windows(6).any(|w| w == b"secret"), "no plaintext in ciphertext");
    }

    #[test]
    fn key_file_is_0600_and_create_new() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MASTER_KEY_FILE);
        let k = MasterKey::generate();
        k.create_file(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(k.create_file(&p).is_err(), "never overwrites an existing key");
        let loaded = MasterKey::load(&p).unwrap();
        let s = k.seal("t", 1, "c", b"x");
        assert_eq!(loaded.open("t", 1, "c", &s).unwrap().as_slice(), b"x");
        std::fs::write(dir.path().join("short"), b"abc").unwrap();
        assert!(matches!(MasterKey::load(&dir.path().join("short")), Err(StoreError::BadMasterKey { .. })));
    }
}
