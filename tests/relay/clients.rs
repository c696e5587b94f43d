//! The session-token specification (`clients/README.md`) and its reference
//! minters (`clients/python/mint.py`, `clients/node/mint.js`): the relay
//! mints the test vectors exactly and accepts them; each minter reproduces
//! them byte for byte; a token each mints opens a stream on a real relay,
//! and the same token with one character changed is refused with 401.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use serde_json::Value;

use crate::util::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vectors() -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join("clients/test-vectors.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["vectors"].as_array().unwrap().clone()
}

/// The two minters: (name, program, script).
const MINTERS: [(&str, &str, &str); 2] = [
    ("python", "python3", "clients/python/mint.py"),
    ("node", "node", "clients/node/mint.js"),
];

/// Runs a minter with the secret in an environment variable; its token.
fn run_minter(program: &str, script: &str, secret: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .arg(repo().join(script))
        .args(args)
        .env("CLIO_TEST_MINT_SECRET", secret)
        .args(["--secret-env", "CLIO_TEST_MINT_SECRET"])
        .output()
        .unwrap_or_else(|e| panic!("{program} does not run ({e}); the minter tests need it"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {script} failed: {stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!token.contains(secret));
    token
}

#[test]
fn the_relay_mints_and_accepts_the_test_vectors() {
    let doc = std::fs::read_to_string(repo().join("clients/README.md")).unwrap();
    let vectors = vectors();
    assert!(vectors.len() >= 4);
    for v in &vectors {
        let secret = Secret::new(v["secret"].as_str().unwrap());
        let keys = TokenKeys::new(&secret, None, Duration::from_secs(30));
        let (issued, expires) = (
            v["issued_at"].as_u64().unwrap(),
            v["expires_at"].as_u64().unwrap(),
        );
        let token = v["token"].as_str().unwrap();
        let pools: Vec<String> = v["pools"]
            .as_array()
            .map(|a| a.iter().map(|p| p.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        assert_eq!(
            keys.mint_exact_in(
                v["device_id"].as_str().unwrap(),
                v["tier"].as_str(),
                &pools,
                issued,
                expires,
                v["token_id"].as_str().unwrap(),
            )
            .unwrap(),
            token,
            "{}",
            v["name"]
        );
        assert_eq!(keys.current_kid(), v["key_id"].as_str().unwrap());
        let c = keys
            .verify(token, UNIX_EPOCH + Duration::from_secs(issued))
            .unwrap();
        assert_eq!(c.device_id, v["device_id"].as_str().unwrap());
        assert_eq!((c.issued_at, c.expires_at), (issued, expires));
        assert_eq!(c.token_id, v["token_id"].as_str().unwrap());
        assert_eq!(c.tier.as_deref(), v["tier"].as_str());
        if pools.is_empty() {
            assert_eq!(c.pools, ["default"]);
        } else {
            assert_eq!(c.pools, pools);
        }
        // The documented pieces are the token's own.
        assert!(token.starts_with(&format!("{}.", v["signed_input"].as_str().unwrap())));
        // The specification shows every vector as it is in the JSON file.
        for field in ["secret", "key_id", "payload_json", "signed_input", "token"] {
            assert!(
                doc.contains(v[field].as_str().unwrap()),
                "clients/README.md lacks {field} of vector {}",
                v["name"]
            );
        }
    }
}

#[test]
fn each_minter_reproduces_the_test_vectors() {
    for (name, program, script) in MINTERS {
        for v in vectors() {
            let ttl = v["expires_at"].as_u64().unwrap() - v["issued_at"].as_u64().unwrap();
            let (ttl, issued) = (ttl.to_string(), v["issued_at"].to_string());
            let mut args = vec![
                "--device",
                v["device_id"].as_str().unwrap(),
                "--ttl",
                &ttl,
                "--issued-at",
                &issued,
                "--token-id",
                v["token_id"].as_str().unwrap(),
            ];
            if let Some(t) = v["tier"].as_str() {
                args.extend(["--tier", t]);
            }
            for p in v["pools"].as_array().into_iter().flatten() {
                args.extend(["--pool", p.as_str().unwrap()]);
            }
            let token = run_minter(program, script, v["secret"].as_str().unwrap(), &args);
            assert_eq!(token, v["token"].as_str().unwrap(), "{name}: {}", v["name"]);
        }
    }
}

/// `token` with the character at byte `at` replaced by another base64url one.
fn tampered(token: &str, at: usize) -> String {
    let mut b = token.as_bytes().to_vec();
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[test]
fn tokens_the_minters_make_open_streams_and_tampered_ones_are_refused() {
    let fake = fake(&["key-m"], |c| c.forbidden = vec![]);
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-m", "key-m")]));
    let secret = relay.cfg.tokens.secret.expose().to_string();
    for (name, program, script) in MINTERS {
        let device = format!("{name}-device-1");
        let token = run_minter(
            program,
            script,
            &secret,
            &["--device", &device, "--ttl", "5m"],
        );
        let claims = TokenKeys::from_config(&relay.cfg.tokens)
            .verify(&token, std::time::SystemTime::now())
            .unwrap();
        assert_eq!(claims.device_id, device);
        assert_eq!(claims.expires_at - claims.issued_at, 300);
        assert_eq!(claims.token_id.len(), 16, "{name}");

        let (mut ws, _) = connect(relay.addr(), &token, Via::Header)
            .unwrap_or_else(|e| panic!("{name}: a minted token was refused: {e}"));
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(5, 3));
        assert!(got.finished(), "{name}: {got:?}");
        assert_eq!(got.close_code(), Some(1000), "{name}");

        // One character changed in the payload, then in the signature.
        let parts: Vec<&str> = token.split('.').collect();
        let payload_at = parts[0].len() + 1 + parts[1].len() + 1 + 3;
        let sig_at = token.len() - 5;
        for bad in [tampered(&token, payload_at), tampered(&token, sig_at)] {
            assert_ne!(bad, token);
            let (status, body) = refused_upgrade(connect(relay.addr(), &bad, Via::Header));
            assert_eq!(status, 401, "{name}: {body}");
            assert_http_error_body(&body, 401);
        }
        // Minted with another secret: refused too.
        let other = run_minter(
            program,
            script,
            "another secret of at least thirty-two bytes",
            &["--device", &device],
        );
        let (status, _) = refused_upgrade(connect(relay.addr(), &other, Via::Header));
        assert_eq!(status, 401, "{name}");
    }
}
