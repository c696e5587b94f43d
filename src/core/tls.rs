//! TLS on the client port (rustls + ring): the server config from PEM
//! files, with HTTP/1.1 as the only ALPN protocol. Re-read on SIGHUP; a
//! stream keeps the config it was accepted with.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::core::config::TlsConfig;

/// Builds the client port's TLS config from `[tls]`; the error names the file.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("tls.cert_file {}: {e}", cfg.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file {}: no certificate",
            cfg.cert_file.display()
        ));
    }
    // The error never quotes the file: it holds a private key.
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|_| {
        format!(
            "tls.key_file {}: no readable PEM private key",
            cfg.key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: the certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
