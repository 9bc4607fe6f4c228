//! DER private keys into ssh-key key pairs: PKCS#8 (`PRIVATE KEY`, plain or after decryption),
//! SEC1 (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`).
//!
//! The structures are decoded by the RustCrypto crates (`pkcs8`, `sec1`, `rsa`, `p256`/`p384`/
//! `p521`, `ed25519-dalek`), which also check that each key is consistent (an embedded public
//! key matches its private half, RSA components agree). The one piece written here is SEC1 with
//! explicit curve parameters instead of a named curve, which `sec1` does not read.

use ::der::asn1::{AnyRef, ContextSpecific, UintRef};
use ::der::{Decode as _, Reader as _, SliceReader, Tag, TagNumber, Tagged as _};
use pkcs8::{AssociatedOid as _, DecodePrivateKey as _, ObjectIdentifier, PrivateKeyInfoRef};
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use ssh_key::private::{EcdsaKeypair, Ed25519Keypair};

use super::*;

/// Why DER key material could not be read.
#[derive(Debug)]
pub(super) enum DerKeyError {
    /// A well-formed key of an algorithm (or curve) keyhaven does not support.
    UnknownAlgorithm(ObjectIdentifier),
    /// Not a key, damaged, inconsistent, or (after decryption) a wrong passphrase.
    Invalid,
}

impl From<::der::Error> for DerKeyError {
    fn from(_: ::der::Error) -> Self {
        DerKeyError::Invalid
    }
}

/// A decrypted DER private key of either kind, whatever its PEM label said: SEC1 (named or
/// explicit curve) first, then PKCS#8.
pub(super) fn decode_private_key_der(der: &[u8]) -> Result<PrivateKey, DerKeyError> {
    if let Ok(sec1) = sec1::EcPrivateKey::from_der(der) {
        let Some(curve) = sec1.parameters.and_then(|p| p.named_curve()) else {
            return Err(DerKeyError::Invalid);
        };
        return ecdsa_from_sec1(curve, der).map(PrivateKey::from);
    }
    if let Ok(kp) = sec1_with_explicit_curve(der) {
        return Ok(PrivateKey::from(kp));
    }
    decode_pkcs8(der)
}

/// An encrypted PKCS#8 key (`ENCRYPTED PRIVATE KEY`), decrypted with `passphrase`.
/// A wrong passphrase is [`DerKeyError::Invalid`].
pub(super) fn decode_encrypted_pkcs8(der: &[u8], passphrase: &[u8]) -> Result<PrivateKey, DerKeyError> {
    let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(der).map_err(|_| DerKeyError::Invalid)?;
    let plain = info.decrypt(passphrase).map_err(|_| DerKeyError::Invalid)?;
    decode_private_key_der(plain.as_bytes())
}

/// A PKCS#1 RSA key (`RSA PRIVATE KEY`).
pub(super) fn decode_pkcs1_rsa(der: &[u8]) -> Result<PrivateKey, DerKeyError> {
    let key = rsa::RsaPrivateKey::from_pkcs1_der(der).map_err(|_| DerKeyError::Invalid)?;
    let kp = RsaKeypair::try_from(key).map_err(|_| DerKeyError::Invalid)?;
    Ok(PrivateKey::from(kp))
}

/// A PKCS#8 `PrivateKeyInfo`: RSA, Ed25519, or ECDSA on P-256/384/521.
fn decode_pkcs8(der: &[u8]) -> Result<PrivateKey, DerKeyError> {
    let info = PrivateKeyInfoRef::try_from(der).map_err(|_| DerKeyError::Invalid)?;
    let invalid = |_| DerKeyError::Invalid;
    match info.algorithm.oid {
        rsa::pkcs1::ALGORITHM_OID => {
            let key = rsa::RsaPrivateKey::from_pkcs8_der(der).map_err(invalid)?;
            Ok(PrivateKey::from(RsaKeypair::try_from(key).map_err(|_| DerKeyError::Invalid)?))
        }
        ed25519_dalek::pkcs8::ALGORITHM_OID => {
            let key = ed25519_dalek::SigningKey::from_pkcs8_der(der).map_err(invalid)?;
            Ok(PrivateKey::from(Ed25519Keypair::from(key)))
        }
        sec1::ALGORITHM_OID => {
            let curve = info.algorithm.parameters_oid().map_err(|_| DerKeyError::Invalid)?;
            let kp = match curve {
                p256::NistP256::OID => {
                    let sk = p256::SecretKey::from_pkcs8_der(der).map_err(invalid)?;
                    EcdsaKeypair::NistP256 { public: sk.public_key().into(), private: sk.into() }
                }
                p384::NistP384::OID => {
                    let sk = p384::SecretKey::from_pkcs8_der(der).map_err(invalid)?;
                    EcdsaKeypair::NistP384 { public: sk.public_key().into(), private: sk.into() }
                }
                p521::NistP521::OID => {
                    let sk = p521::SecretKey::from_pkcs8_der(der).map_err(invalid)?;
                    EcdsaKeypair::NistP521 { public: sk.public_key().into(), private: sk.into() }
                }
                other => return Err(DerKeyError::UnknownAlgorithm(other)),
            };
            Ok(PrivateKey::from(kp))
        }
        other => Err(DerKeyError::UnknownAlgorithm(other)),
    }
}

/// A SEC1 `ECPrivateKey` on the named curve `curve`.
fn ecdsa_from_sec1(curve: ObjectIdentifier, der: &[u8]) -> Result<EcdsaKeypair, DerKeyError> {
    let invalid = |_| DerKeyError::Invalid;
    Ok(match curve {
        p256::NistP256::OID => {
            let sk = p256::SecretKey::from_sec1_der(der).map_err(invalid)?;
            EcdsaKeypair::NistP256 { public: sk.public_key().into(), private: sk.into() }
        }
        p384::NistP384::OID => {
            let sk = p384::SecretKey::from_sec1_der(der).map_err(invalid)?;
            EcdsaKeypair::NistP384 { public: sk.public_key().into(), private: sk.into() }
        }
        p521::NistP521::OID => {
            let sk = p521::SecretKey::from_sec1_der(der).map_err(invalid)?;
            EcdsaKeypair::NistP521 { public: sk.public_key().into(), private: sk.into() }
        }
        other => return Err(DerKeyError::UnknownAlgorithm(other)),
    })
}

/// SEC1 with the curve given by explicit domain parameters (`openssl ec -param_enc explicit`)
/// rather than an OID: the curve is told by the size of its prime (P-256, P-384 or P-521).
fn sec1_with_explicit_curve(der: &[u8]) -> Result<EcdsaKeypair, DerKeyError> {
    let mut reader = SliceReader::new(der)?;
    let kp = reader.sequence(|seq| {
        let version: u8 = seq.decode()?;
        if version != 1 {
            return Err(DerKeyError::Invalid);
        }
        let private_key: AnyRef<'_> = seq.decode()?;
        private_key.tag().assert_eq(Tag::OctetString)?;
        let params = ContextSpecific::<AnyRef<'_>>::decode_explicit(seq, TagNumber(0))?.ok_or(DerKeyError::Invalid)?;
        let curve = explicit_curve_oid(params.value)?;
        // The optional [1] public key is checked by deriving it again below.
        seq.drain(seq.remaining_len())?;
        let d = private_key.value();
        Ok(match curve {
            p256::NistP256::OID => {
                let sk = p256::SecretKey::from_slice(d).map_err(|_| DerKeyError::Invalid)?;
                EcdsaKeypair::NistP256 { public: sk.public_key().into(), private: sk.into() }
            }
            p384::NistP384::OID => {
                let sk = p384::SecretKey::from_slice(d).map_err(|_| DerKeyError::Invalid)?;
                EcdsaKeypair::NistP384 { public: sk.public_key().into(), private: sk.into() }
            }
            p521::NistP521::OID => {
                let sk = p521::SecretKey::from_slice(d).map_err(|_| DerKeyError::Invalid)?;
                EcdsaKeypair::NistP521 { public: sk.public_key().into(), private: sk.into() }
            }
            _ => return Err(DerKeyError::Invalid),
        })
    })?;
    Ok(kp)
}

/// `ECParameters ::= SEQUENCE { [version INTEGER,] fieldID SEQUENCE { fieldType OID, prime
/// INTEGER }, ... }`: the named curve whose prime has this many bytes.
fn explicit_curve_oid(params: AnyRef<'_>) -> Result<ObjectIdentifier, DerKeyError> {
    params.tag().assert_eq(Tag::Sequence)?;
    let mut seq = SliceReader::new(params.value())?;
    if Tag::peek(&seq)? == Tag::Integer {
        seq.decode::<u8>()?;
    }
    seq.sequence(|field_id| {
        let _field_type: ObjectIdentifier = field_id.decode()?;
        let prime: UintRef<'_> = field_id.decode()?;
        Ok(match prime.as_bytes().len() {
            32 => p256::NistP256::OID,
            48 => p384::NistP384::OID,
            66 => p521::NistP521::OID,
            _ => return Err(DerKeyError::Invalid),
        })
    })
}
