//! The listener's certificate: read from PEM files at start, read again on
//! SIGHUP, handed to each new TLS handshake.
//!
//! rustls asks [`Certificates`] (a `ResolvesServerCert`) for the key at
//! every handshake; a reload swaps the `Arc` it hands out, so connections
//! already open keep the certificate they were made with and every new one
//! gets the new one. A reload that fails (a missing file, a key that does
//! not match the certificate) keeps the certificate in use.
//!
//! The crypto provider is *ring*, chosen explicitly: it builds with a C
//! compiler alone, and naming it keeps the choice from depending on which
//! features other crates turn on in rustls.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why the certificate files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The certificate file holds no PEM certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    /// The key file holds no PEM private key, or it is malformed.
    #[error("{0} holds no usable PEM private key: {1}")]
    Key(PathBuf, String),
    /// The certificate or the key is malformed, or they do not match.
    #[error("certificate {0} and its key: {1}")]
    Mismatch(PathBuf, rustls::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The certificate and key in use, and the files they come from.
#[derive(Debug)]
pub struct Certificates {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificates {
    /// Reads the certificate chain and key from `cert_path` and `key_path`.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Certificates, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let current = read(cert_path, key_path, &provider)?;
        Ok(Certificates {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            current: RwLock::new(Arc::new(current)),
        })
    }

    /// Reads the files again and, if they hold a matching certificate and
    /// key, makes them the ones new handshakes use. Blocks on file reads.
    pub fn reload(&self) -> Result<(), TlsError> {
        let next = Arc::new(read(&self.cert_path, &self.key_path, &self.provider)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    /// The DER of the leaf certificate in use.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current().cert[0].clone()
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A rustls server configuration whose handshakes take their
    /// certificate from `certificates`: TLS 1.3 and 1.2, ALPN `http/1.1`
    /// (a WebSocket upgrade is an HTTP/1.1 request).
    pub fn server_config(
        certificates: Arc<Certificates>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(certificates.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(certificates);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_pem =
        std::fs::read(cert_path).map_err(|e| TlsError::Read(cert_path.to_path_buf(), e))?;
    let key_pem = std::fs::read(key_path).map_err(|e| TlsError::Read(key_path.to_path_buf(), e))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::NoCertificate(cert_path.to_path_buf()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_path_buf()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::Key(key_path.to_path_buf(), e.to_string()))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| TlsError::Mismatch(cert_path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        (cert, key, made.cert.der().to_vec())
    }

    #[test]
    fn loads_reloads_and_keeps_the_old_pair_when_the_new_one_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = write_pair(dir.path(), "a");
        let certificates = Certificates::load(&cert, &key).unwrap();
        assert_eq!(certificates.leaf().as_ref(), &first[..]);

        let (cert_b, key_b, second) = write_pair(dir.path(), "b");
        std::fs::copy(&cert_b, &cert).unwrap();
        std::fs::copy(&key_b, &key).unwrap();
        certificates.reload().unwrap();
        assert_eq!(certificates.leaf().as_ref(), &second[..]);

        // A certificate with another pair's key: refused, the second stays.
        let (cert_c, _, _) = write_pair(dir.path(), "c");
        std::fs::copy(&cert_c, &cert).unwrap();
        let err = certificates.reload().unwrap_err();
        assert!(matches!(err, TlsError::Mismatch(..)), "{err}");
        std::fs::write(&cert, b"not pem").unwrap();
        assert!(matches!(
            certificates.reload(),
            Err(TlsError::NoCertificate(_))
        ));
        std::fs::remove_file(&key).unwrap();
        assert!(matches!(certificates.reload(), Err(TlsError::Read(..))));
        assert_eq!(certificates.leaf().as_ref(), &second[..]);
    }
}
