//! Legacy OpenSSL PEM encryption (`Proc-Type: 4,ENCRYPTED` / `DEK-Info`): decryption only, on its own
//! because it is old, weak crypto kept for imports.

use super::*;

#[derive(Clone, Copy)]
pub(super) enum LegacyCipher {
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

pub(super) fn decode_hex(s: &str) -> Option<Vec<u8>> {
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
pub(super) fn evp_bytes_to_key(pass: &[u8], salt: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
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
pub(super) fn legacy_pem_decrypt(dek_info: &str, data: &[u8], pass: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyPairError> {
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
