//! Upstream over TLS with a CA made at test time.

use std::sync::Arc;
use std::time::Duration;

use clio_relay::fake_soniox::{FakeConfig, FakeKey, FakeSoniox};

use crate::util::*;

/// A fake Soniox serving `wss` for "localhost", and the PEM of its CA.
fn tls_fake() -> (FakeSoniox, String) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new("key-a", 50)],
        tls: Some(Arc::new(server)),
        record_audio: true,
        ..FakeConfig::default()
    })
    .unwrap();
    (fake, ca.pem())
}

/// A temp file holding `pem`, removed on drop.
struct TempPem(std::path::PathBuf);

impl TempPem {
    fn new(pem: &str) -> TempPem {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "clio-relay-test-ca-{}-{nanos}.pem",
            std::process::id()
        ));
        std::fs::write(&path, pem).unwrap();
        TempPem(path)
    }
}

impl Drop for TempPem {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn upstream_over_tls_with_a_local_ca() {
    let (fake, pem) = tls_fake();
    assert!(fake.url().starts_with("wss://localhost:"));
    let ca = TempPem::new(&pem);
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.upstream.ca_file = Some(ca.0.clone());
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(20, 8);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert!(!got.text().is_empty());
    assert_eq!(got.close_code(), Some(1000));
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio, frames.concat());
}

#[test]
fn upstream_tls_without_the_ca_fails_with_502() {
    let (fake, _pem) = tls_fake();
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 8));
    assert_error_frame(&got, 502, 1011);
    assert!(
        fake.sessions().iter().all(|s| s.config.is_none()),
        "{:?}",
        fake.sessions()
    );
}
