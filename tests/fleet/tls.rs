//! `rediss://` to a Redis whose certificate a private CA signed (made by
//! the test): trusted with `cluster.ca_file`, refused without it or with
//! another CA.

use std::time::Duration;

use clio_relay::core::secret::Secret;

use crate::redis::RedisServer;
use crate::util::*;

/// A CA, and a certificate for 127.0.0.1 it signed: (ca, cert, key) PEM.
fn ca_and_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn rediss_trusts_the_ca_file_and_only_it() {
    let (ca, cert, key) = ca_and_cert();
    let (other_ca, _, _) = ca_and_cert();
    let redis = RedisServer::start_tls(&cert, &key);
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    let relay = |name: &str, pem: Option<&str>| {
        let mut c = crate::node(&cfg, &redis, name);
        c.cluster.as_mut().unwrap().ca = pem.map(|p| p.as_bytes().to_vec());
        Relay::start(c)
    };
    let trusted = relay("node-a", Some(&ca));
    assert!(
        wait_until(Duration::from_secs(10), || crate::up(&trusted)),
        "the store is reached over TLS with the CA given"
    );
    assert!(crate::try_stream(&trusted, "phone").finished());
    let (_, metrics) = http(trusted.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_cluster_stream_opens_total{decided_by=\"store\"} 1"),
        "{metrics}"
    );
    // Another CA, or none (the built-in public roots): never reached.
    let wrong = relay("node-b", Some(&other_ca));
    let public = relay("node-c", None);
    std::thread::sleep(Duration::from_secs(3));
    for r in [&wrong, &public] {
        assert!(!crate::up(r), "a certificate it cannot verify is refused");
        let (_, m) = http(r.handle.admin_addr, "GET", "/metrics", None, None);
        assert!(m.contains("clio_relay_cluster_store_up 0"), "{m}");
    }
}
