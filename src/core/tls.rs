//! TLS on the client port (rustls + ring): the server config from PEM
//! files, with HTTP/1.1 as the only ALPN protocol. Re-read on SIGHUP; a
//! stream keeps the config it was accepted with. An expired certificate
//! is refused (its dates are read in `tls/validity.rs`), the server's own
//! or a CA certificate above it that clients check (`tls/chain.rs`): every
//! client would refuse the chain. One not valid yet is warned about,
//! the server's own or a CA certificate above it, named.

mod chain;
mod validity;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::core::config::TlsConfig;

/// Why the client port's TLS config cannot be built from `[tls]`. Names
/// the file, never quotes the private key.
#[derive(Debug)]
pub enum TlsError {
    /// `tls.cert_file` could not be read as PEM certificates.
    CertFile {
        /// The file named by `tls.cert_file`.
        path: PathBuf,
        /// What reading it found.
        source: rustls::pki_types::pem::Error,
    },
    /// `tls.cert_file` holds no certificate.
    NoCertificate(PathBuf),
    /// `tls.key_file` holds no readable PEM private key. Only an I/O
    /// error is kept (a parse error may quote the key).
    KeyFile {
        /// The file named by `tls.key_file`.
        path: PathBuf,
        /// Why it could not be read at all, if that is what failed.
        io: Option<std::io::Error>,
    },
    /// `tls.key_file` holds a key encrypted with a passphrase, which
    /// the relay cannot read.
    EncryptedKey(PathBuf),
    /// rustls refused to build the server config.
    Tls(rustls::Error),
    /// rustls refused the private key (a kind it cannot sign with).
    Key {
        /// The file named by `tls.key_file`.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The private key is not the key of the file's first certificate,
    /// the one the server presents.
    NotAPair {
        /// The file named by `tls.cert_file`.
        cert: PathBuf,
        /// The file named by `tls.key_file`.
        key: PathBuf,
        /// The key's certificate, when another one of the file (1-based):
        /// a chain in the wrong order.
        key_of: Option<usize>,
    },
    /// A certificate clients check has expired: the server's (the
    /// file's first), or a CA certificate above it in the file up to
    /// one clients hold (an intermediate).
    Expired {
        /// The file named by `tls.cert_file`.
        path: PathBuf,
        /// Its place in the file (1: the server's own).
        position: usize,
        /// Its subject (RFC 4514 text).
        subject: String,
        /// Its `notAfter`.
        not_after: std::time::SystemTime,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::CertFile { path, source } => {
                let hint = match source {
                    rustls::pki_types::pem::Error::Io(e) => {
                        crate::core::config::unreadable_hint(path, "cert_file", true, true, e)
                    }
                    _ => String::new(),
                };
                write!(
                    f,
                    "tls.cert_file {}: {}{hint}",
                    path.display(),
                    PemProblem(source)
                )
            }
            TlsError::NoCertificate(path) => {
                write!(f, "tls.cert_file {}: no certificate", path.display())
            }
            TlsError::KeyFile { path, io: Some(e) } => {
                let hint = crate::core::config::unreadable_hint(path, "key_file", true, false, e);
                write!(f, "tls.key_file {}: {e}{hint}", path.display())
            }
            TlsError::KeyFile { path, io: None } => write!(
                f,
                "tls.key_file {}: no readable PEM private key",
                path.display()
            ),
            TlsError::EncryptedKey(path) => write!(
                f,
                "tls.key_file {}: the key is encrypted (it has a passphrase), which the relay \
                 cannot read; write it out unencrypted (`openssl pkey -in FILE -out NEW`, \
                 then `chmod 600 NEW`)",
                path.display()
            ),
            TlsError::Tls(e) => e.fmt(f),
            // What ring cannot sign with (RSA under 2048 or over 4096
            // bits, P-521, secp256k1, Ed448) rustls says as "unexpected error: failed
            // to parse private key as RSA, ECDSA, or EdDSA", which reads as
            // a damaged file.
            TlsError::Key {
                path,
                source: rustls::Error::General(_),
            } => write!(
                f,
                "tls.key_file {}: a kind of key the relay cannot sign with; it takes RSA keys of \
                 2048 to 4096 bits, ECDSA keys on P-256 or P-384, and Ed25519 keys",
                path.display()
            ),
            TlsError::Key { path, source } => {
                write!(f, "tls.key_file {}: {source}", path.display())
            }
            TlsError::NotAPair {
                cert,
                key,
                key_of: None,
            } => write!(
                f,
                "tls.key_file {} is not the key of the first certificate in tls.cert_file {}",
                key.display(),
                cert.display()
            ),
            TlsError::NotAPair {
                cert,
                key_of: Some(n),
                ..
            } => write!(
                f,
                "tls.cert_file {}: the key is certificate {n}'s, not the first's: the chain is in \
                 the wrong order (the server's own certificate goes first, then the CA \
                 certificates that signed it)",
                cert.display()
            ),
            TlsError::Expired {
                path,
                position: 1,
                subject,
                not_after,
            } => write!(
                f,
                "tls.cert_file {}: the certificate ({subject}) expired on {}; every client would \
                 refuse it",
                path.display(),
                httpdate::fmt_http_date(*not_after)
            ),
            TlsError::Expired {
                path,
                position,
                subject,
                not_after,
            } => write!(
                f,
                "tls.cert_file {}: certificate {position} of the chain ({subject}), a CA \
                 certificate clients check the server's by, expired on {}; every client would \
                 refuse the chain; give the certificate followed by its CA's current chain \
                 (certbot's fullchain.pem as renewed)",
                path.display(),
                httpdate::fmt_http_date(*not_after)
            ),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::CertFile { source, .. } => Some(source),
            TlsError::KeyFile { io: Some(e), .. } => Some(e),
            TlsError::Tls(e) | TlsError::Key { source: e, .. } => Some(e),
            TlsError::NoCertificate(_)
            | TlsError::KeyFile { io: None, .. }
            | TlsError::EncryptedKey(_)
            | TlsError::NotAPair { .. }
            | TlsError::Expired { .. } => None,
        }
    }
}

/// Why a PEM file of certificates could not be read, in words: rustls's
/// own text prints a cut-short block's label as a list of byte values
/// (`missing section end marker: [67, 69, …]`) and an I/O error with an
/// `I/O error:` prefix the key files' errors do not have. For files of
/// certificates only (`tls.cert_file`, `upstream.ca_file`,
/// `cluster.ca_file`): a block's first line is quoted, never its body.
#[derive(Debug)]
pub struct PemProblem<'a>(pub &'a rustls::pki_types::pem::Error);

impl fmt::Display for PemProblem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use rustls::pki_types::pem::Error;
        match self.0 {
            Error::MissingSectionEnd { end_marker } => write!(
                f,
                "a PEM block is cut short: no \"-----END {}-----\" line (is the file truncated?)",
                String::from_utf8_lossy(end_marker)
            ),
            Error::IllegalSectionStart { line } => {
                let line = String::from_utf8_lossy(line);
                let line: String = line.chars().take(80).collect();
                write!(f, "a malformed PEM line: {:?}", line.trim_end())
            }
            Error::Base64Decode(e) => write!(f, "a PEM block is not valid base64 ({e})"),
            Error::Io(e) => e.fmt(f),
            Error::NoItemsFound => f.write_str("no PEM certificate"),
            other => other.fmt(f),
        }
    }
}

/// The client port's TLS config, and the end of its chain's validity,
/// for the reload's log.
#[derive(Debug)]
pub struct ServerTls {
    /// What the shards serve.
    pub config: Arc<rustls::ServerConfig>,
    /// When the chain stops working: the earliest `notAfter` of the
    /// certificates clients check, the server's own and the CA
    /// certificates above it in the file (`tls/chain.rs`); `None`: not
    /// read.
    pub not_after: Option<SystemTime>,
    /// The certificate that ends at `not_after` when it is not the
    /// server's own: its place in the file and its subject.
    pub ends_first: Option<(usize, String)>,
    /// The server certificate's `notBefore`.
    pub not_before: Option<SystemTime>,
    /// A CA certificate above the server's that clients check whose
    /// `notBefore` is still to come (the latest, when several): its place
    /// in the file, its subject and its start. Clients refuse the chain
    /// until then, as they refuse a server certificate not valid yet.
    pub starts_later: Option<(usize, String, SystemTime)>,
    /// Certificates the file serves that clients holding the roots do
    /// not check (a root, an intermediate cross-signed by an older root)
    /// and whose end has passed: place, subject, end.
    pub expired_unchecked: Vec<(usize, String, SystemTime)>,
    /// The file holds the server certificate alone, and it names an
    /// intermediate that clients need sent with it
    /// (an AIA `caIssuers` URL, `tls/chain.rs`).
    pub intermediate_missing: bool,
}

/// How long before its end a certificate is warned about: a renewal
/// (certbot's runs 30 days ahead) that has not happened by then is failing.
pub const RENEW_WARNING: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);

/// The time a certificate has left, in words, in days and hours as the
/// `ClioRelayTlsCertificateExpiring` alert says it (`humanizeDuration`):
/// "4 days 23 hours", "23 hours", "59 minutes". Cut down to the unit it
/// ends with, never rounded up: it never says more time than is left,
/// and says less by under an hour (a minute, with under an hour left).
/// The warning gives the exact end beside it.
#[derive(Debug, Clone, Copy)]
struct TimeLeft(std::time::Duration);

impl fmt::Display for TimeLeft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        let (days, hours, minutes) = (secs / 86_400, secs % 86_400 / 3_600, secs % 3_600 / 60);
        match (days, hours) {
            (0, 0) if minutes == 0 => f.write_str("under a minute"),
            (0, 0) => write!(f, "{minutes} minute{}", plural(minutes)),
            (0, h) => write!(f, "{h} hour{}", plural(h)),
            (d, 0) => write!(f, "{d} day{}", plural(d)),
            (d, h) => write!(f, "{d} day{} {h} hour{}", plural(d), plural(h)),
        }
    }
}

impl ServerTls {
    /// What is worth a warning about the certificate's dates: not valid
    /// yet (this host's clock, or a certificate issued ahead), an
    /// intermediate not valid yet (named), or its end less than
    /// [`RENEW_WARNING`] away.
    pub fn date_warning(&self, cfg: &TlsConfig, now: SystemTime) -> Option<String> {
        let path = cfg.cert_file.display();
        if let Some(start) = self.not_before.filter(|t| *t > now) {
            return Some(format!(
                "tls.cert_file {path}: the certificate is valid only from {}; clients refuse it \
                 until then (is this host's clock right?)",
                httpdate::fmt_http_date(start)
            ));
        }
        if let Some((position, subject, start)) = self.starts_later.as_ref().filter(|s| s.2 > now) {
            return Some(format!(
                "tls.cert_file {path}: certificate {position} of the chain ({subject}), a CA \
                 certificate clients check the server's by, is valid only from {}; every client \
                 refuses the chain until then (is this host's clock right? if it is, give the \
                 certificate followed by its CA's current chain, then reload)",
                httpdate::fmt_http_date(*start)
            ));
        }
        let end = self.not_after?;
        let left = end.duration_since(now).ok()?;
        (left < RENEW_WARNING).then(|| match &self.ends_first {
            None => format!(
                "tls.cert_file {path}: the certificate expires on {}, in {}; renew it \
                 (then reload)",
                httpdate::fmt_http_date(end),
                TimeLeft(left)
            ),
            Some((position, subject)) => format!(
                "tls.cert_file {path}: certificate {position} of the chain ({subject}), a CA \
                 certificate clients check the server's by, expires on {}, in {}, and \
                 every client will refuse the chain then; give the certificate followed by its \
                 CA's current chain (then reload)",
                httpdate::fmt_http_date(end),
                TimeLeft(left)
            ),
        })
    }

    /// The warning for expired certificates the file serves that clients
    /// holding the roots do not check: harmless to those, refused by a
    /// client that needs them (one that has only the older root).
    pub fn unchecked_warning(&self, cfg: &TlsConfig) -> Option<String> {
        let gone: Vec<String> = self
            .expired_unchecked
            .iter()
            .map(|(position, subject, end)| {
                format!(
                    "certificate {position} ({subject}) expired on {}",
                    httpdate::fmt_http_date(*end)
                )
            })
            .collect();
        (!gone.is_empty()).then(|| {
            format!(
                "tls.cert_file {}: {}; clients that hold the root above the chain do not check \
                 it (it is a root, or an intermediate cross-signed by an older root), others \
                 refuse it; leave it out of the file",
                cfg.cert_file.display(),
                gone.join(", ")
            )
        })
    }

    /// The warning for a file that holds the server certificate without
    /// the intermediate that signed it.
    pub fn chain_warning(&self, cfg: &TlsConfig) -> Option<String> {
        self.intermediate_missing.then(|| {
            format!(
                "tls.cert_file {}: it holds the server certificate alone, without the \
                 intermediate CA certificate that signed it (which the certificate names for \
                 fetching, and clients are not given): apps, and browsers that have not met that \
                 intermediate, will refuse it; give the certificate followed by its chain \
                 (certbot's fullchain.pem, not cert.pem)",
                cfg.cert_file.display()
            )
        })
    }

    /// The reload's log line: which file, and until when it is valid.
    pub fn describe(&self, cfg: &TlsConfig) -> String {
        let until = match (self.not_after, &self.ends_first) {
            (None, _) => "end date not read".to_string(),
            (Some(t), None) => format!("valid until {}", httpdate::fmt_http_date(t)),
            (Some(t), Some((position, subject))) => format!(
                "valid until {}, certificate {position}'s end ({subject})",
                httpdate::fmt_http_date(t)
            ),
        };
        format!(
            "client-port TLS certificate read from tls.cert_file {} ({until})",
            cfg.cert_file.display()
        )
    }
}

/// Builds the client port's TLS config from `[tls]`; the error names the file.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    load(cfg).map(|t| t.config)
}

/// [`server_config`], with the certificate's end date.
pub fn load(cfg: &TlsConfig) -> Result<ServerTls, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|source| TlsError::CertFile {
            path: cfg.cert_file.clone(),
            source,
        })?;
    let Some(leaf) = certs.first() else {
        return Err(TlsError::NoCertificate(cfg.cert_file.clone()));
    };
    let not_before = validity::validity(leaf).map(|(start, _)| start);
    // Each certificate a client checks must be within its dates: the
    // first that is not is named.
    let chain = chain::chain(&certs);
    let now = SystemTime::now();
    if let Some(gone) = chain.checked.iter().find(|l| l.not_after < now) {
        return Err(TlsError::Expired {
            path: cfg.cert_file.clone(),
            position: gone.position,
            subject: gone.subject.clone(),
            not_after: gone.not_after,
        });
    }
    let first = chain.ends_first();
    // The error never quotes the file: it holds a private key. Why it
    // could not be opened or read (permissions, a dangling link) quotes
    // nothing, so it is said.
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(e) => TlsError::KeyFile {
            path: cfg.key_file.clone(),
            io: Some(e),
        },
        // rustls reads no encrypted key, and says only that it found
        // none. The file is looked at for the markers alone.
        _ if encrypted(&cfg.key_file) => TlsError::EncryptedKey(cfg.key_file.clone()),
        _ => TlsError::KeyFile {
            path: cfg.key_file.clone(),
            io: None,
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Tls)?
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| not_a_pair(cfg, &certs, key, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        not_after: first.map(|l| l.not_after),
        ends_first: first
            .filter(|l| l.position != 1)
            .map(|l| (l.position, l.subject.clone())),
        not_before,
        starts_later: chain
            .checked
            .iter()
            .skip(1)
            .filter(|l| l.not_before > now)
            .max_by_key(|l| l.not_before)
            .map(|l| (l.position, l.subject.clone(), l.not_before)),
        expired_unchecked: chain
            .others
            .iter()
            .filter(|l| l.not_after < now)
            .map(|l| (l.position, l.subject.clone(), l.not_after))
            .collect(),
        intermediate_missing: certs.len() == 1 && chain::wants_its_intermediate(leaf),
    })
}

/// Whether the key file holds an encrypted private key (PKCS#8's
/// `ENCRYPTED PRIVATE KEY`, or OpenSSL's older `Proc-Type: 4,ENCRYPTED`
/// header in an RSA or EC key).
fn encrypted(path: &std::path::Path) -> bool {
    let Ok(file) = std::fs::read(path) else {
        return false;
    };
    [
        &b"-----BEGIN ENCRYPTED PRIVATE KEY-----"[..],
        b"Proc-Type: 4,ENCRYPTED",
    ]
    .iter()
    .any(|marker| file.windows(marker.len()).any(|w| w == *marker))
}

/// Why rustls refused the chain and key: not a pair (and the key's own
/// certificate when the chain is out of order), or a key it cannot use.
fn not_a_pair(
    cfg: &TlsConfig,
    certs: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
    e: rustls::Error,
) -> TlsError {
    if !matches!(e, rustls::Error::InconsistentKeys(_)) {
        return TlsError::Key {
            path: cfg.key_file.clone(),
            source: e,
        };
    }
    let provider = rustls::crypto::ring::default_provider();
    let key_of = provider
        .key_provider
        .load_private_key(key)
        .ok()
        .and_then(|signer| {
            certs.iter().skip(1).position(|c| {
                rustls::sign::CertifiedKey::new(vec![c.clone()], signer.clone())
                    .keys_match()
                    .is_ok()
            })
        })
        .map(|i| i + 2);
    TlsError::NotAPair {
        cert: cfg.cert_file.clone(),
        key: cfg.key_file.clone(),
        key_of,
    }
}
