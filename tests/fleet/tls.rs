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

#[test]
fn a_ca_file_that_does_not_read_is_refused_by_check_config_and_named() {
    // check-config took any cluster.ca_file with a "-----BEGIN
    // CERTIFICATE-----" line in it: one cut short (an interrupted copy)
    // or whose block is no certificate passed, and the start then
    // stopped on it as "cluster.redis_url: Unable to parse root
    // certificate PEM: missing section end marker: [67, 69, …]".
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, _, _) = ca_and_cert();
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"ws://127.0.0.1:1/\"\n[tokens]\nsecret_env = \"CA_TEST_SECRET\"\n\
         [admin]\nmaster_key_env = \"CA_TEST_MASTER\"\nstate_dir = \"state\"\n\
         [cluster]\nredis_url = \"rediss://127.0.0.1:1/0\"\nnode_id = \"n1\"\nca_file = \"ca.pem\"\n\
         [[account]]\nid = \"a\"\nkey_env = \"CA_TEST_SECRET\"\n",
    )
    .unwrap();
    let clio = |cmd: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
            .args([cmd, "--config", file.to_str().unwrap()])
            .env("CA_TEST_SECRET", "s".repeat(40))
            .env("CA_TEST_MASTER", "ab".repeat(32))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A start that is not refused would run: bounded, then stopped.
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        )
    };
    let ca_path = dir.join("ca.pem");
    // Cut short: check-config and the start say so, naming the key.
    std::fs::write(&ca_path, &ca[..ca.len() / 2]).unwrap();
    let cut_short = format!(
        "cluster.ca_file: {}: a PEM block is cut short: no \"-----END CERTIFICATE-----\" line",
        ca_path.display()
    );
    for cmd in ["check-config", "run"] {
        let (code, said) = clio(cmd);
        assert_eq!(code, Some(3), "{cmd}: {said}");
        assert!(
            said.contains(&cut_short) && !said.contains("redis_url"),
            "{cmd}: {said}"
        );
    }
    // A block that is no certificate.
    std::fs::write(
        &ca_path,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (code, said) = clio("check-config");
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("cluster.ca_file: ") && said.contains("not a usable CA certificate"),
        "{said}"
    );
    // The whole CA: taken.
    std::fs::write(&ca_path, &ca).unwrap();
    let (code, said) = clio("check-config");
    assert_eq!(code, Some(0), "{said}");
    std::fs::remove_dir_all(&dir).ok();
}
