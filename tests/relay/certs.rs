//! The client port's certificate files as an operator meets them:
//! renewed, expired, out of order, unreadable, near their end, changed
//! under a reload; what check-config, the start and a reload say.

use std::time::Duration;

use tungstenite::Message;

use crate::tls::{localhost_cert, tls_relay, wss_connect};
use crate::util::*;

/// `clio-relay check-config` on a relay.toml written in `dir` whose
/// `[tls]` names `dir`'s cert.pem and key.pem: its exit status, and its
/// stderr then stdout.
fn check_tls_config(dir: &std::path::Path, upstream: &str) -> (Option<i32>, String) {
    check_config(
        dir,
        &format!("[upstream]\nurl = \"{upstream}\"\n[tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n"),
    )
}

/// `clio-relay check-config` on a relay.toml written in `dir`: a client
/// port, a token secret and one account, then `rest` (which has the
/// `[upstream]` section); its exit status, and its stderr then stdout.
fn check_config(dir: &std::path::Path, rest: &str) -> (Option<i32>, String) {
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[tokens]\nsecret_env = \"TLS_TEST_SECRET\"\n[[account]]\nid = \"a\"\nkey_env = \"TLS_TEST_SECRET\"\n{rest}"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args(["check-config", "--config", file.to_str().unwrap()])
        .env("TLS_TEST_SECRET", "s".repeat(40))
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    )
}

/// A certificate for "localhost" whose validity ended on 2025-02-01,
/// signed by a new CA: (ca, cert, key) as PEM.
fn expired_localhost_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2025, 2, 1);
    let leaf = params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

#[test]
fn an_expired_certificate_is_refused_and_the_old_one_kept() {
    // rustls serves any certificate it is given: an expired one was taken
    // by check-config, the start and a reload, and then every client
    // refused the relay.
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let token = relay.token("d");
    let mut live = wss_connect(relay.addr(), &ca, &token).unwrap();
    live.send(Message::text(config_message(None))).unwrap();
    let (_, cert, key) = expired_localhost_cert();
    std::fs::write(&tls.cert_file, &cert).unwrap();
    std::fs::write(&tls.key_file, &key).unwrap();
    // check-config: one line naming the file and the date, exit 3.
    let dir = tls.cert_file.parent().unwrap();
    let (code, said) = check_tls_config(dir, &fake.url());
    assert_eq!(code, Some(3), "{said}");
    let lines: Vec<_> = said.lines().filter(|l| l.contains("cert.pem")).collect();
    assert_eq!(lines.len(), 1, "{said}");
    assert!(
        lines[0].contains("expired on Sat, 01 Feb 2025 00:00:00 GMT"),
        "{said}"
    );
    // A reload keeps the certificate it has: new clients still get it,
    // and the live stream goes on.
    let log = relay.handle.reload(&relay.cfg).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("not reloaded") && l.contains("expired")),
        "{log:?}"
    );
    let mut fresh = wss_connect(relay.addr(), &ca, &token).unwrap();
    fresh.send(Message::text(config_message(None))).unwrap();
    fresh.send(Message::binary(Vec::<u8>::new())).unwrap();
    for f in audio_frames(3, 1) {
        live.send(Message::binary(f)).unwrap();
    }
    live.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut finished = false;
    while let Ok(m) = live.read() {
        if let Message::Text(t) = m {
            finished |= t.contains("\"finished\":true");
        }
    }
    assert!(finished, "the live stream finished");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_key_file_that_cannot_be_read_is_said_why() {
    // certbot's live/privkey.pem is a link into archive/: a link left
    // dangling was reported as "no readable PEM private key", as if the
    // file held no key, while a secret file said the reason.
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.key_file.parent().unwrap().to_path_buf();
    std::fs::remove_file(&tls.key_file).unwrap();
    std::os::unix::fs::symlink(dir.join("archive/privkey2.pem"), &tls.key_file).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("tls.key_file") && said.contains("key.pem: No such file or directory"),
        "{said}"
    );
    // A reload says the same and keeps the certificate it has.
    let log = relay.handle.reload(&relay.cfg).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("not reloaded") && l.contains("No such file or directory")),
        "{log:?}"
    );
    wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    // A directory in its place: the same, with the reason.
    std::fs::remove_file(&tls.key_file).unwrap();
    std::fs::create_dir(&tls.key_file).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(3), "{said}");
    assert!(said.contains("key.pem: Is a directory"), "{said}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_chain_in_the_wrong_order_or_a_key_of_another_cert_is_named() {
    // Both were "tls: tls: the certificate and key do not go together:
    // keys may not be consistent: KeyMismatch", which names no file and
    // does not say that the certificates are only out of order.
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.cert_file.parent().unwrap().to_path_buf();
    let (new_ca, leaf, key) = localhost_cert();
    // The CA first, then the server's certificate.
    std::fs::write(&tls.cert_file, format!("{new_ca}{leaf}")).unwrap();
    std::fs::write(&tls.key_file, &key).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("cert.pem: the key is certificate 2's, not the first's")
            && said.contains("wrong order")
            && !said.contains("tls: tls:"),
        "{said}"
    );
    let log = relay.handle.reload(&relay.cfg).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("not reloaded") && l.contains("wrong order")),
        "{log:?}"
    );
    wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    // The renewed certificate beside another one's key.
    let (_, _, other_key) = localhost_cert();
    std::fs::write(&tls.cert_file, format!("{leaf}{new_ca}")).unwrap();
    std::fs::write(&tls.key_file, &other_key).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("key.pem is not the key of the first certificate in tls.cert_file")
            && said.contains("cert.pem"),
        "{said}"
    );
    // Put in order, with its key, it is taken, and the summary shows it
    // with its end date.
    std::fs::write(&tls.key_file, &key).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.lines().any(|l| l.starts_with("tls: cert_file ")
            && l.contains("cert.pem (valid until ")
            && l.contains(", key_file ")),
        "{said}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_certificate_near_its_end_or_not_yet_valid_is_warned_about() {
    // A renewal that keeps failing showed nowhere until the certificate
    // expired; one not valid yet (a wrong clock) was served silently.
    let fake = fake(&["k1"], |_| {});
    let (relay, _ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.cert_file.parent().unwrap().to_path_buf();
    let day = Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    // rcgen's date for the UTC day of `at`, from "Tue, 08 Dec 2026 23:00:00 GMT".
    let rcgen_day = |at: std::time::SystemTime| {
        let text = httpdate::fmt_http_date(at);
        let parts: Vec<&str> = text.split_whitespace().collect();
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = months.iter().position(|m| *m == parts[2]).unwrap();
        rcgen::date_time_ymd(
            parts[3].parse().unwrap(),
            u8::try_from(month + 1).unwrap(),
            parts[1].parse().unwrap(),
        )
    };
    let write = |from: std::time::SystemTime, to: std::time::SystemTime| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen_day(from);
        params.not_after = rcgen_day(to);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(&tls.cert_file, cert.pem()).unwrap();
        std::fs::write(&tls.key_file, key.serialize_pem()).unwrap();
    };
    write(now - 60 * day, now + 5 * day);
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.lines()
            .any(|l| l.starts_with("warning: tls.cert_file ")
                && l.contains("the certificate expires on")
                && l.contains("renew it")),
        "{said}"
    );
    write(now + 3 * day, now + 90 * day);
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.lines()
            .any(|l| l.starts_with("warning: tls.cert_file ") && l.contains("valid only from")),
        "{said}"
    );
    // Months left: nothing to say.
    write(now - day, now + 90 * day);
    let (_, said) = check_tls_config(&dir, &fake.url());
    assert!(!said.contains("warning: tls.cert_file"), "{said}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_reload_whose_certificate_no_longer_loads_applies_nothing() {
    // The files can change between the check of a reloaded config and
    // its use (a renewal under way). The accounts were then applied and
    // the limits, token keys and admin settings not, logged as
    // "SIGHUP: reloaded".
    let fake = fake(&["k1", "k2"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let key = std::fs::read(&tls.key_file).unwrap();
    let mut cfg = relay.cfg.clone();
    cfg.accounts
        .push(clio_relay::core::config::AccountConfig::new(
            "b",
            clio_relay::core::secret::Secret::new("k2"),
        ));
    std::fs::remove_file(&tls.key_file).unwrap();
    let log = relay.handle.reload(&cfg).unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(
        log[0].starts_with("refused: TLS certificate not reloaded: tls.key_file"),
        "{log:?}"
    );
    let ids = || -> Vec<String> {
        relay
            .handle
            .process
            .accounts()
            .iter()
            .map(|a| a.id.clone())
            .collect()
    };
    assert_eq!(ids(), vec!["a".to_string()], "nothing was applied");
    wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    // With the key back, the same reload applies.
    std::fs::write(&tls.key_file, key).unwrap();
    let log = relay.handle.reload(&cfg).unwrap();
    assert!(!log.iter().any(|l| l.starts_with("refused: ")), "{log:?}");
    assert!(
        wait_until(Duration::from_secs(5), || ids().len() == 2),
        "{:?}",
        ids()
    );
    std::fs::remove_dir_all(tls.key_file.parent().unwrap()).ok();
}

#[test]
fn a_truncated_certificate_file_is_said_in_words() {
    // A copy cut short (a full disk, an interrupted deploy) leaves a PEM
    // block without its END line. check-config, the start and a reload
    // said "missing section end marker: [67, 69, 82, 84, 73, 70, 73, 67,
    // 65, 84, 69]": the block's label as a list of byte values.
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.cert_file.parent().unwrap().to_path_buf();
    let whole = std::fs::read_to_string(&tls.cert_file).unwrap();
    std::fs::write(&tls.cert_file, &whole[..whole.len() / 2]).unwrap();
    let cut_short = "a PEM block is cut short: no \"-----END CERTIFICATE-----\" line";
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains(&format!(
            "tls.cert_file {}: {cut_short}",
            tls.cert_file.display()
        )) && !said.contains("[67, 69"),
        "{said}"
    );
    // A reload says the same and keeps the certificate it has.
    let log = relay.handle.reload(&relay.cfg).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("not reloaded") && l.contains(cut_short)),
        "{log:?}"
    );
    wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    // upstream.ca_file, the same.
    std::fs::write(dir.join("ca.pem"), &ca[..ca.len() / 2]).unwrap();
    let (code, said) = check_config(
        &dir,
        "[upstream]\nurl = \"wss://localhost:1/\"\nca_file = \"ca.pem\"\n",
    );
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains(&format!(
            "upstream.ca_file {}: {cut_short}",
            dir.join("ca.pem").display()
        )) && !said.contains("[67, 69"),
        "{said}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_encrypted_key_is_said_to_be_encrypted() {
    // A key with a passphrase (`openssl pkcs8 -topk8`, or an older
    // `openssl ec -aes128` with its Proc-Type header) was "no readable
    // PEM private key", as if the file held none.
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.key_file.parent().unwrap().to_path_buf();
    let plain = std::fs::read_to_string(&tls.key_file).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .args([
                "-in",
                tls.key_file.to_str().unwrap(),
                "-passout",
                "pass:pw-1234",
            ])
            .output()
            .expect("openssl is installed");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let pkcs8 = openssl(&["pkcs8", "-topk8", "-v2", "aes-128-cbc"]);
    let sec1 = openssl(&["ec", "-aes128"]);
    assert!(pkcs8.contains("ENCRYPTED PRIVATE KEY") && sec1.contains("Proc-Type: 4,ENCRYPTED"));
    for key in [&pkcs8, &sec1] {
        std::fs::write(&tls.key_file, key).unwrap();
        let (code, said) = check_tls_config(&dir, &fake.url());
        assert_eq!(code, Some(3), "{said}");
        assert!(
            said.contains(&format!(
                "tls.key_file {}: the key is encrypted",
                tls.key_file.display()
            )) && !said.contains("no readable PEM private key"),
            "{said}"
        );
        // The key's own lines are never quoted.
        let body = key.lines().find(|l| l.len() == 64).unwrap();
        assert!(!said.contains(body), "{said}");
        let log = relay.handle.reload(&relay.cfg).unwrap();
        assert!(
            log.iter()
                .any(|l| l.contains("not reloaded") && l.contains("the key is encrypted")),
            "{log:?}"
        );
        wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    }
    // Unencrypted again, it is taken.
    std::fs::write(&tls.key_file, plain).unwrap();
    assert_eq!(check_tls_config(&dir, &fake.url()).0, Some(0));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_served_certificates_end_is_a_metric() {
    // The warning of a certificate near its end is logged at the start
    // and at each reload only. A relay that runs through its last weeks
    // (a renewal failing, so no reload) said nothing, and went on
    // serving it after its end, refused by every client, with /readyz
    // 200: nothing to alert on. The metric holds the end of the one
    // served now.
    let fake = fake(&["k1"], |_| {});
    let (relay, _) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let metric = || {
        let (_, m) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
        m.lines()
            .find_map(|l| l.strip_prefix("clio_relay_tls_certificate_expiry_timestamp_seconds "))
            .map(str::to_owned)
    };
    // rcgen's default end, 4096-01-01.
    assert_eq!(metric().as_deref(), Some("67090118400"));
    // A renewal ending 2030-01-01, taken by a reload.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2030, 1, 1);
    std::fs::write(&tls.cert_file, params.self_signed(&key).unwrap().pem()).unwrap();
    std::fs::write(&tls.key_file, key.serialize_pem()).unwrap();
    relay.handle.reload(&relay.cfg).unwrap();
    assert_eq!(metric().as_deref(), Some("1893456000"));
    // One the reload refuses (not its key's) leaves the served one's.
    let (_, _, other_key) = localhost_cert();
    std::fs::write(&tls.key_file, other_key).unwrap();
    relay.handle.reload(&relay.cfg).unwrap();
    assert_eq!(metric().as_deref(), Some("1893456000"));
    // Without [tls], no such metric.
    let plain = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (_, m) = http(plain.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(!m.contains("clio_relay_tls_certificate"), "{m}");
    std::fs::remove_dir_all(tls.cert_file.parent().unwrap()).ok();
}

/// A reload may take `[tls]` away (or add it): the client port then
/// serves new connections plain ws://. The certificate's end stayed in
/// the metric, so `ClioRelayTlsCertificateExpiring` went on to fire for
/// a certificate no longer served, and the reload's log said nothing of
/// the port's change.
#[test]
fn a_reload_that_takes_tls_away_says_so_and_drops_its_metric() {
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let metric = || {
        let (_, m) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
        m.lines()
            .find_map(|l| l.strip_prefix("clio_relay_tls_certificate_expiry_timestamp_seconds "))
            .map(str::to_owned)
    };
    assert_eq!(metric().as_deref(), Some("67090118400"));
    let mut plain = relay.cfg.clone();
    plain.tls = None;
    let log = relay.handle.reload(&plain).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("client-port TLS off") && l.contains("plain ws://")),
        "{log:?}"
    );
    assert_eq!(metric(), None);
    let token = relay.token("d");
    assert!(wss_connect(relay.addr(), &ca, &token).is_err());
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    ws.close(None).unwrap();
    // And back: the metric with it.
    let log = relay.handle.reload(&relay.cfg).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("TLS certificate read from tls.cert_file")),
        "{log:?}"
    );
    assert_eq!(metric().as_deref(), Some("67090118400"));
    assert!(wss_connect(relay.addr(), &ca, &token).is_ok());
    std::fs::remove_dir_all(relay.cfg.tls.as_ref().unwrap().cert_file.parent().unwrap()).ok();
}

#[test]
fn a_key_the_relay_cannot_sign_with_is_said_so() {
    // A 1024-bit RSA key or one on a curve ring does not sign with
    // (P-521, secp256k1) was "unexpected error: failed to parse private
    // key as RSA, ECDSA, or EdDSA", which reads as a damaged file. An RSA
    // key over 4096 bits (ring's most) was refused with a message that
    // said the relay takes up to 8192 bits, as the README did.
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.key_file.parent().unwrap().to_path_buf();
    for kind in [
        &["-newkey", "rsa:1024"][..],
        &["-newkey", "rsa:4608"],
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
    ] {
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=localhost",
            ])
            .args(kind)
            .args(["-keyout", tls.key_file.to_str().unwrap()])
            .args(["-out", tls.cert_file.to_str().unwrap()])
            .output()
            .expect("openssl is installed");
        assert!(out.status.success(), "{out:?}");
        let (code, said) = check_tls_config(&dir, &fake.url());
        assert_eq!(code, Some(3), "{said}");
        assert!(
            said.contains(&format!(
                "tls.key_file {}: a kind of key the relay cannot sign with; it takes RSA keys of \
                 2048 to 4096 bits",
                tls.key_file.display()
            )) && !said.contains("unexpected error"),
            "{kind:?}: {said}"
        );
        let log = relay.handle.reload(&relay.cfg).unwrap();
        assert!(
            log.iter()
                .any(|l| l.contains("not reloaded") && l.contains("cannot sign with")),
            "{log:?}"
        );
        wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    }
    // The largest RSA key it does take.
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-newkey", "rsa:4096"])
        .args(["-keyout", tls.key_file.to_str().unwrap()])
        .args(["-out", tls.cert_file.to_str().unwrap()])
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "{out:?}");
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(0), "{said}");
    std::fs::remove_dir_all(&dir).ok();
}

/// certbot's `cert.pem` (the certificate alone) where its `fullchain.pem`
/// belongs: the intermediate that signed it is not sent, and every client
/// that does not have it refuses the certificate. A certificate that
/// names its issuer for fetching (AIA `caIssuers`, as public CAs' do) and
/// comes alone is warned about; with its chain, or from a private CA
/// that names nothing to fetch, it is not.
#[test]
fn a_certificate_without_its_intermediate_is_warned_about() {
    use x509_cert::der::asn1::Ia5String;
    use x509_cert::der::Encode as _;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::{AccessDescription, AuthorityInfoAccessSyntax};
    let ca = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        (params.self_signed(&key).unwrap(), key)
    };
    let intermediate = ca("Test Intermediate");
    let aia = AuthorityInfoAccessSyntax(vec![AccessDescription {
        access_method: x509_cert::der::oid::db::rfc5280::ID_AD_CA_ISSUERS,
        access_location: GeneralName::UniformResourceIdentifier(
            Ia5String::new("http://ca.test/intermediate.der").unwrap(),
        ),
    }])
    .to_der()
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = |names_issuer: bool| {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        if names_issuer {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 5, 5, 7, 1, 1],
                    aia.clone(),
                ));
        }
        params
            .signed_by(&key, &intermediate.0, &intermediate.1)
            .unwrap()
            .pem()
    };
    let dir = std::env::temp_dir().join(format!("clio-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let warned = |cert: String| {
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        let (code, said) = check_tls_config(&dir, "ws://127.0.0.1:9/transcribe-websocket");
        assert_eq!(code, Some(0), "{said}");
        said.lines().any(|l| {
            l.starts_with("warning: tls.cert_file ")
                && l.contains("without the intermediate CA certificate")
                && l.contains("fullchain.pem")
        })
    };
    assert!(warned(leaf(true)), "the certificate alone");
    assert!(
        !warned(leaf(true) + &intermediate.0.pem()),
        "with its chain"
    );
    assert!(!warned(leaf(false)), "a private CA's, naming nothing");
    std::fs::remove_dir_all(&dir).ok();
}

/// A CA certificate named `dn`, with `key`, signed by `by` (self-signed
/// without), valid between `dates` (Unix seconds; rcgen's far defaults
/// without).
fn ca_cert(
    dn: rcgen::DistinguishedName,
    key: rcgen::KeyPair,
    by: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
    dates: Option<(u64, u64)>,
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name = dn;
    if let Some((from, until)) = dates {
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + Duration::from_secs(from);
        params.not_after = epoch + Duration::from_secs(until);
    }
    let cert = match by {
        Some((c, k)) => params.signed_by(&key, c, k).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert, key)
}

fn common_name(name: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, name);
    dn
}

/// A "localhost" certificate signed by `by`: (cert, key) as PEM.
fn localhost_signed_by(by: &(rcgen::Certificate, rcgen::KeyPair)) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &by.0, &by.1)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Now, in Unix seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The relay's `clio_relay_tls_certificate_expiry_timestamp_seconds`.
fn expiry_metric(relay: &Relay) -> Option<String> {
    let (_, m) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    m.lines()
        .find_map(|l| l.strip_prefix("clio_relay_tls_certificate_expiry_timestamp_seconds "))
        .map(str::to_owned)
}

/// The server's certificate in date, followed by the intermediate that
/// signed it, which ran out on 2025-02-01 (a chain file left from before
/// the CA's intermediate changed): every client refuses the chain
/// (`certificate expired`, checked below with a rustls client against a
/// server of the test's), yet check-config, the start and a reload took
/// it, looking at the first certificate's dates only. Now each says which
/// certificate ran out (its place and subject) and when, check-config
/// and the start exit, and a reload keeps the chain it serves.
#[test]
fn an_expired_intermediate_is_refused_and_named() {
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.cert_file.parent().unwrap().to_path_buf();
    let root = ca_cert(
        common_name("Test Root"),
        rcgen::KeyPair::generate().unwrap(),
        None,
        None,
    );
    let intermediate = ca_cert(
        common_name("Test Intermediate"),
        rcgen::KeyPair::generate().unwrap(),
        Some(&root),
        // 2020-01-01 to 2025-02-01.
        Some((1_577_836_800, 1_738_368_000)),
    );
    let (cert, key) = localhost_signed_by(&intermediate);
    let chain = cert + &intermediate.0.pem();
    // What a client makes of it: refused as expired.
    let refused = client_verdict(&chain, &key, &root.0.pem());
    assert!(refused.contains("expired"), "{refused}");
    std::fs::write(&tls.cert_file, &chain).unwrap();
    std::fs::write(&tls.key_file, &key).unwrap();
    let named = |text: &str| {
        text.contains("certificate 2 of the chain (CN=Test Intermediate)")
            && text.contains("expired on Sat, 01 Feb 2025 00:00:00 GMT")
            && !text.contains("PRIVATE")
    };
    // check-config: one line naming it, exit 3.
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(3), "{said}");
    let lines: Vec<_> = said.lines().filter(|l| l.contains("cert.pem")).collect();
    assert_eq!(lines.len(), 1, "{said}");
    assert!(named(lines[0]), "{said}");
    // A reload keeps the chain it serves.
    let log = relay.handle.reload(&relay.cfg).unwrap();
    assert!(
        log.iter().any(|l| l.contains("not reloaded") && named(l)),
        "{log:?}"
    );
    wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    // The start refuses it.
    let Err(err) = clio_relay::cli::server::start(&relay.cfg) else {
        panic!("the start refuses it");
    };
    let err = err.to_string();
    assert!(named(&err), "{err}");
    // The root in the file too: the same (clients hold their own).
    std::fs::write(&tls.cert_file, chain.clone() + &root.0.pem()).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(3), "{said}");
    assert!(named(&said), "{said}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The server's certificate in date, followed by an intermediate whose
/// `notBefore` is still 3 days away (a CA's new intermediate given out
/// ahead, or this host's clock behind): every client refuses the chain
/// (`certificate not valid yet`, checked with a rustls client), yet
/// check-config, the start and a reload took it without a word, looking
/// at the first certificate's start only. Now each warns of it as of a
/// server certificate not valid yet, naming its place, subject and
/// start; it is served (it may be the host's clock that is wrong).
#[test]
fn an_intermediate_not_valid_yet_is_warned_about_and_named() {
    let fake = fake(&["k1"], |_| {});
    let (relay, _) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.cert_file.parent().unwrap().to_path_buf();
    let root = ca_cert(
        common_name("Test Root"),
        rcgen::KeyPair::generate().unwrap(),
        None,
        None,
    );
    // From midnight UTC 3 days on (a whole second, as a certificate says
    // it), for a year.
    let start = (unix_now() / 86_400 + 3) * 86_400;
    let intermediate = ca_cert(
        common_name("Test Intermediate"),
        rcgen::KeyPair::generate().unwrap(),
        Some(&root),
        Some((start, start + 365 * 86_400)),
    );
    let (cert, key) = localhost_signed_by(&intermediate);
    let chain = cert + &intermediate.0.pem();
    // What a client makes of it: refused as not valid yet.
    let refused = client_verdict(&chain, &key, &root.0.pem());
    assert!(refused.contains("not valid yet"), "{refused}");
    std::fs::write(&tls.cert_file, &chain).unwrap();
    std::fs::write(&tls.key_file, &key).unwrap();
    let shown =
        httpdate::fmt_http_date(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(start));
    let named = |text: &str| {
        text.contains("certificate 2 of the chain (CN=Test Intermediate)")
            && text.contains(&format!("is valid only from {shown}"))
            && text.contains("every client refuses the chain until then")
            && !text.contains("PRIVATE")
    };
    // check-config: valid, one warning naming it.
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(0), "{said}");
    let lines: Vec<_> = said
        .lines()
        .filter(|l| l.starts_with("warning: tls.cert_file "))
        .collect();
    assert_eq!(lines.len(), 1, "{said}");
    assert!(named(lines[0]), "{said}");
    // A reload takes it (and warns, as SIGHUP logs these): it is served.
    let log = relay.handle.reload(&relay.cfg).unwrap();
    assert!(!log.iter().any(|l| l.contains("not reloaded")), "{log:?}");
    let warnings = relay.cfg.warnings_besides_accounts();
    assert!(warnings.iter().any(|w| named(w)), "{warnings:?}");
    let Err(refused) = wss_connect(relay.addr(), &root.0.pem(), &relay.token("d")) else {
        panic!("a client refuses the chain it serves");
    };
    assert!(refused.contains("not valid yet"), "{refused}");
    // The root in the file too: the same (clients hold their own).
    std::fs::write(&tls.cert_file, chain.clone() + &root.0.pem()).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(0), "{said}");
    assert!(said.lines().any(named), "{said}");
    std::fs::remove_dir_all(&dir).ok();
}

/// What a rustls client that trusts `root_pem` says of a server (on a
/// socket of the test's) serving `chain_pem` with `key_pem`: "accepted",
/// or its error.
fn client_verdict(chain_pem: &str, key_pem: &str, root_pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut conn = rustls::ServerConnection::new(std::sync::Arc::new(server)).unwrap();
        while conn.is_handshaking() {
            if conn.complete_io(&mut tcp).is_err() {
                break;
            }
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(client), "localhost".try_into().unwrap())
            .unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut verdict = "accepted".to_string();
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            verdict = e.to_string();
            break;
        }
    }
    drop(tcp);
    serving.join().unwrap();
    verdict
}

/// An intermediate that ends before the server's certificate (here in 5
/// days, the certificate in years): the chain stops working at its end.
/// The metric held the server certificate's end, so an alert on it saw
/// nothing coming, nor did the start's and reloads' warning. Now the
/// metric is the chain's earliest end, and the warning and the reload's
/// line name the certificate that ends first.
#[test]
fn the_chains_earliest_end_is_the_metric_and_warned_about() {
    let fake = fake(&["k1"], |_| {});
    let (relay, _) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.cert_file.parent().unwrap().to_path_buf();
    let root = ca_cert(
        common_name("Test Root"),
        rcgen::KeyPair::generate().unwrap(),
        None,
        None,
    );
    let end = unix_now() + 5 * 86_400;
    let intermediate = ca_cert(
        common_name("Test Intermediate"),
        rcgen::KeyPair::generate().unwrap(),
        Some(&root),
        Some((unix_now() - 86_400, end)),
    );
    let (cert, key) = localhost_signed_by(&intermediate);
    std::fs::write(&tls.cert_file, cert + &intermediate.0.pem()).unwrap();
    std::fs::write(&tls.key_file, &key).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.lines()
            .any(|l| l.starts_with("warning: tls.cert_file ")
                && l.contains("certificate 2 of the chain (CN=Test Intermediate)")
                && l.contains("expires on")
                && l.contains("in 4 days 23 hours,")),
        "{said}"
    );
    let log = relay.handle.reload(&relay.cfg).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("certificate 2's end (CN=Test Intermediate)")),
        "{log:?}"
    );
    assert_eq!(expiry_metric(&relay), Some(end.to_string()));
    // It is still served: a client that trusts the root connects.
    wss_connect(relay.addr(), &root.0.pem(), &relay.token("d")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// The warning of a certificate near its end says the time left to the
/// hour, as the expiry alert does (days and hours), and never more than
/// is left. It said whole days cut down: a certificate ending in 4.99
/// days was "in 4 days", one ending in 36 hours "in 1 days", one ending
/// in half an hour "in 0 days".
#[test]
fn the_time_left_is_said_to_the_hour_never_more() {
    let fake = fake(&["k1"], |_| {});
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (left, said_left) in [
        (5 * 86_400, "in 4 days 23 hours;"),
        (36 * 3_600, "in 1 day 11 hours;"),
        (2 * 86_400 + 1_800, "in 2 days;"),
        (3_600 + 60, "in 1 hour;"),
        (1_800, "in 29 minutes;"),
        (30, "in under a minute;"),
    ] {
        // Ends `left` seconds from now (the check runs a moment later).
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + Duration::from_secs(unix_now() - 86_400);
        params.not_after = epoch + Duration::from_secs(unix_now() + left);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let (code, said) = check_tls_config(&dir, &fake.url());
        assert_eq!(code, Some(0), "{said}");
        assert!(
            said.lines()
                .any(|l| l.starts_with("warning: tls.cert_file ")
                    && l.contains("the certificate expires on")
                    && l.contains(said_left)),
            "{said_left}: {said}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A chain that ends with an intermediate cross-signed by an older root
/// which ran out (as Let's Encrypt's "ISRG Root X1" cross-signed by "DST
/// Root CA X3" did): clients that hold the newer root, one of the public
/// roots, stop before it and accept the chain; only a client that holds
/// the old root alone needs it. That one is not refused: it is warned
/// about, and the metric and the warnings of the end leave it out.
#[test]
fn an_expired_cross_sign_above_a_public_root_is_warned_about() {
    let fake = fake(&["k1"], |_| {});
    let (relay, _) = tls_relay(&fake.url(), |_| {});
    let tls = relay.cfg.tls.clone().unwrap();
    let dir = tls.cert_file.parent().unwrap().to_path_buf();
    // Named as ISRG Root X1 is among the public roots.
    let mut isrg = rcgen::DistinguishedName::new();
    for (ty, v) in [
        (rcgen::DnType::CountryName, "US"),
        (
            rcgen::DnType::OrganizationName,
            "Internet Security Research Group",
        ),
        (rcgen::DnType::CommonName, "ISRG Root X1"),
    ] {
        isrg.push(ty, rcgen::DnValue::PrintableString(v.try_into().unwrap()));
    }
    let old = ca_cert(
        common_name("Old Root"),
        rcgen::KeyPair::generate().unwrap(),
        None,
        None,
    );
    let new_root = ca_cert(
        isrg.clone(),
        rcgen::KeyPair::generate().unwrap(),
        None,
        None,
    );
    let cross = ca_cert(
        isrg,
        rcgen::KeyPair::from_pem(&new_root.1.serialize_pem()).unwrap(),
        Some(&old),
        // 2021-01-20 to 2024-09-30.
        Some((1_611_100_800, 1_727_654_400)),
    );
    let intermediate = ca_cert(
        common_name("Test Intermediate"),
        rcgen::KeyPair::generate().unwrap(),
        Some(&new_root),
        None,
    );
    let (cert, key) = localhost_signed_by(&intermediate);
    let chain = cert + &intermediate.0.pem() + &cross.0.pem();
    assert_eq!(client_verdict(&chain, &key, &new_root.0.pem()), "accepted");
    assert!(client_verdict(&chain, &key, &old.0.pem()).contains("expired"));
    std::fs::write(&tls.cert_file, &chain).unwrap();
    std::fs::write(&tls.key_file, &key).unwrap();
    let (code, said) = check_tls_config(&dir, &fake.url());
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.lines()
            .any(|l| l.starts_with("warning: tls.cert_file ")
                && l.contains(
                    "certificate 3 (CN=ISRG Root X1,O=Internet Security Research Group,C=US) \
                 expired on Mon, 30 Sep 2024 00:00:00 GMT"
                )
                && l.contains("leave it out")),
        "{said}"
    );
    relay.handle.reload(&relay.cfg).unwrap();
    // rcgen's default end, 4096-01-01: the cross-sign's is not the chain's.
    assert_eq!(expiry_metric(&relay).as_deref(), Some("67090118400"));
    wss_connect(relay.addr(), &new_root.0.pem(), &relay.token("d")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
