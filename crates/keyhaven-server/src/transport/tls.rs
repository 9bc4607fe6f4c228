//! TLS for non-loopback listeners: a configured certificate, or a self-signed
//! one generated into `<data>/tls/` on first need (key file created 0600).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("the certificate and key in {cert} / {key} are not usable: {message}")]
    Config { cert: PathBuf, key: PathBuf, message: String },
}

/// Paths of the certificate and key to serve, generating a self-signed pair if needed.
pub fn ensure_cert(
    data_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
    names: &[String],
) -> Result<(PathBuf, PathBuf), TlsError> {
    if let (Some(c), Some(k)) = (cert, key) {
        return Ok((c.to_path_buf(), k.to_path_buf()));
    }
    let dir = data_dir.join("tls");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let file_err = |path: &Path, e: std::io::Error| TlsError::File { path: path.to_path_buf(), message: e.to_string() };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| file_err(&dir, e))?;
    let mut all_names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    all_names.extend(names.iter().cloned());
    all_names.dedup();
    let ck = rcgen::generate_simple_self_signed(all_names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let _ = std::fs::remove_file(&key_path);
    let mut kf = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| file_err(&key_path, e))?;
    kf.write_all(ck.signing_key.serialize_pem().as_bytes()).map_err(|e| file_err(&key_path, e))?;
    kf.sync_all().map_err(|e| file_err(&key_path, e))?;
    std::fs::write(&cert_path, ck.cert.pem()).map_err(|e| file_err(&cert_path, e))?;
    tracing::info!("generated a self-signed TLS certificate in {}", dir.display());
    Ok((cert_path, key_path))
}

/// SHA-256 fingerprint (openssl's `AB:CD:…` form) of the first certificate in a PEM file.
pub fn leaf_fingerprint(cert: &Path) -> Option<String> {
    let first = CertificateDer::pem_file_iter(cert).ok()?.next()?.ok()?;
    Some(crate::remote::cert_fingerprint(&first))
}

/// Validity (not before, not after; Unix seconds) of the first certificate in a PEM file.
pub fn leaf_validity(cert: &Path) -> Option<(i64, i64)> {
    let first = CertificateDer::pem_file_iter(cert).ok()?.next()?.ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&first).ok()?;
    let v = parsed.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The acceptor every new connection takes, replaced when a reload re-reads
/// the certificate (connections already open keep theirs).
pub type SharedAcceptor = Arc<std::sync::RwLock<TlsAcceptor>>;

pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let bad = |m: String| TlsError::Config { cert: cert.into(), key: key.into(), message: m };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate found in the PEM file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
