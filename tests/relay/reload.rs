//! Live reload: SIGHUP re-reads the config file and applies it without
//! dropping anything in flight; an invalid file is refused and the running
//! configuration kept.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use tungstenite::Message;

use crate::util::*;

const ADMIN: &str = "reload-admin-token-0123456789";

fn write_config(path: &std::path::Path, upstream: &str, accounts: &str, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 1\n[upstream]\nurl = \"{upstream}\"\n[tokens]\nsecret_env = \"RELOAD_TEST_SECRET\"\n[admin]\ntoken_env = \"RELOAD_TEST_ADMIN\"\n{extra}\n{accounts}"
        ),
    )
    .unwrap();
}

/// A relay process killed when the test ends, failed or not (a failed
/// test would otherwise leave it running, holding the test's output).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `clio-relay` binary serving the file at `cfg`, with the token
/// secret `secret`, the admin token and its log at INFO.
struct RelayProcess {
    child: Reaped,
    client: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    /// The lines logged before it listened, the listening line last.
    start: Vec<String>,
    /// The lines logged since.
    log: std::sync::mpsc::Receiver<String>,
}

impl RelayProcess {
    fn spawn(cfg: &std::path::Path, secret: &Secret) -> RelayProcess {
        let mut child = Reaped(
            Command::new(env!("CARGO_BIN_EXE_clio-relay"))
                .args(["run", "--config", cfg.to_str().unwrap()])
                .env("RELOAD_TEST_SECRET", secret.expose())
                .env("RELOAD_TEST_ADMIN", ADMIN)
                .env("RUST_LOG", "info")
                .env_remove(UNSET)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
        let mut start = Vec::new();
        for l in lines.by_ref().map_while(Result::ok) {
            let listening = l.contains("listening");
            start.push(l);
            if listening {
                break;
            }
        }
        let listening = start.last().filter(|l| l.contains("listening"));
        let listening = listening.expect("relay starts").clone();
        let field = |name: &str| listening_addr(&listening, name);
        let (log_tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let _ = log_tx.send(l);
            }
        });
        RelayProcess {
            client: field("client"),
            admin: field("admin"),
            child,
            start,
            log,
        }
    }

    fn sighup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// The first log line holding `needle` within 10 s.
    fn logged(&self, needle: &str) -> Option<String> {
        (0..50).find_map(|_| {
            self.log
                .recv_timeout(Duration::from_millis(200))
                .ok()
                .filter(|l| l.contains(needle))
        })
    }
}

/// An environment variable the relay processes here never have.
const UNSET: &str = "RELOAD_TEST_UNSET_KEY";

#[test]
fn sighup_applies_the_new_file_and_refuses_a_broken_one() {
    let fake = fake(&["k1", "k2"], |_| {});
    let dir = std::env::temp_dir().join(format!("clio-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("k1"), "k1\n").unwrap();
    std::fs::write(dir.join("k2"), "k2\n").unwrap();
    let cfg = dir.join("relay.toml");
    let one = "[[account]]\nid = \"a\"\nkey_file = \"k1\"\n";
    write_config(&cfg, &fake.url(), one, "");
    let secret = secret();
    let mut relay = RelayProcess::spawn(&cfg, &secret);
    let (client, admin) = (relay.client, relay.admin);
    let ids = || -> Vec<String> {
        let (_, body) = http(admin, "GET", "/admin/accounts", Some(ADMIN), None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                format!(
                    "{}:{}",
                    a["id"].as_str().unwrap(),
                    a["max_concurrent_streams"]
                )
            })
            .collect()
    };
    assert_eq!(ids(), vec!["a:10"]);

    // A stream open across the reload.
    let token = TokenKeys::new(&secret, None, Duration::from_secs(30))
        .mint(
            "dev",
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap();
    let (mut ws, _) = connect(client, &token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let frames = audio_frames(10, 2);
    for f in &frames[..5] {
        ws.send(Message::binary(f.clone())).unwrap();
    }

    let two = "[[account]]\nid = \"a\"\nkey_file = \"k1\"\nmax_concurrent_streams = 3\n[[account]]\nid = \"b\"\nkey_file = \"k2\"\n";
    write_config(&cfg, &fake.url(), two, "");
    relay.sighup();
    assert!(
        wait_until(Duration::from_secs(5), || ids() == vec!["a:3", "b:10"]),
        "{:?}",
        ids()
    );

    // A broken file is refused, the running configuration kept.
    write_config(&cfg, &fake.url(), two, "[limits]\nbogus_key = 1\n");
    relay.sighup();
    let refused = relay
        .logged("reload refused")
        .expect("the refusal is logged");
    assert!(refused.contains("bogus_key"), "{refused}");
    assert_eq!(ids(), vec!["a:3", "b:10"]);

    // A setting that needs a restart is kept, with a WARN saying so.
    write_config(&cfg, &fake.url(), two, "state_dir = \"elsewhere\"\n");
    relay.sighup();
    let kept = relay
        .logged("admin.state_dir")
        .expect("the kept state_dir is logged");
    assert!(
        kept.contains("WARN") && kept.contains("needs a restart"),
        "{kept}"
    );
    assert!(!dir.join("elsewhere").exists());
    // So is the REST base health checks and reconciliation were set up
    // with (it was silently not applied).
    write_config(
        &cfg,
        &fake.url(),
        two,
        "rest_url = \"https://api.elsewhere.example\"\n",
    );
    relay.sighup();
    let kept = relay
        .logged("admin.rest_url")
        .expect("the kept rest_url is logged");
    assert!(
        kept.contains("WARN") && kept.contains("needs a restart"),
        "{kept}"
    );

    // The stream opened before both reloads finishes with every frame.
    for f in &frames[5..] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert!(read_all(&mut ws).finished());
    // (The health check's keyless probe of the WebSocket endpoint is a
    // session of its own at the fake; the stream is the one on key k1.)
    let stream = fake
        .sessions()
        .into_iter()
        .find(|s| s.key.as_deref() == Some("k1"));
    assert_eq!(stream.expect("the stream's session").audio, frames.concat());

    let pid = nix::unistd::Pid::from_raw(relay.child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(relay.child.0.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).ok();
}

/// A running process's environment never changes: an account's `key_env`
/// variable set after the start is not seen by a reload. The log said
/// nothing of it: a disabled account whose variable is unset was left out
/// without a word, at the start and at a reload, and a reload refused for
/// an unset variable did not say why setting it had not helped.
#[test]
fn the_log_says_a_key_env_set_after_the_start_takes_a_restart() {
    let fake = fake(&["k1"], |_| {});
    let dir = std::env::temp_dir().join(format!("clio-reload-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("k1"), "k1\n").unwrap();
    let cfg = dir.join("relay.toml");
    let a = "[[account]]\nid = \"a\"\nkey_file = \"k1\"\n";
    let b = format!("[[account]]\nid = \"b\"\nkey_env = \"{UNSET}\"\n");
    let disabled_b = format!("{a}{b}enabled = false\n");
    write_config(&cfg, &fake.url(), &disabled_b, "");
    let relay = RelayProcess::spawn(&cfg, &secret());
    let left_out =
        |l: &String| l.contains("WARN") && l.contains("account \"b\"") && l.contains("restart");
    assert!(relay.start.iter().any(left_out), "{:?}", relay.start);

    // Enabled, it needs its key: the reload is refused, and the log says a
    // variable set since the start cannot be seen.
    write_config(&cfg, &fake.url(), &format!("{a}{b}"), "");
    relay.sighup();
    let refused = relay
        .logged("reload refused")
        .expect("the refusal is logged");
    assert!(
        refused.contains(&format!("{UNSET} is not set")),
        "{refused}"
    );
    let why = relay.logged("environment").expect("the reason is logged");
    assert!(
        why.contains("WARN") && why.contains("only when it starts"),
        "{why}"
    );

    // Disabled again, a reload applies the file and warns it is left out.
    write_config(
        &cfg,
        &fake.url(),
        &format!("{disabled_b}max_concurrent_streams = 3\n"),
        "",
    );
    relay.sighup();
    let warned = relay
        .logged("account \"b\"")
        .expect("the warning is logged");
    assert!(left_out(&warned), "{warned}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reload_rotates_token_secrets_and_limits() {
    let fake = fake(&["k1"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let old_token = relay.token("dev");
    let mut cfg = relay.cfg.clone();
    let old_secret = cfg.tokens.secret.clone();
    cfg.tokens.previous_secret = Some(old_secret.clone());
    cfg.tokens.secret = Secret::new("n".repeat(40));
    let log = relay.handle.reload(&cfg).unwrap();
    assert!(log.iter().any(|l| l.contains("token keys")), "{log:?}");
    // Tokens of both secrets verify; a token of a third does not.
    let new_token = TokenKeys::from_config(&cfg.tokens)
        .mint("dev", Duration::from_secs(60), std::time::SystemTime::now())
        .unwrap();
    for t in [&old_token, &new_token] {
        let (mut ws, _) = connect(relay.addr(), t, Via::Header).unwrap();
        assert!(stream_session(&mut ws, &config_message(None), &audio_frames(2, 1)).finished());
    }
    let stranger = TokenKeys::new(&Secret::new("s".repeat(40)), None, Duration::ZERO)
        .mint("dev", Duration::from_secs(60), std::time::SystemTime::now())
        .unwrap();
    assert!(connect(relay.addr(), &stranger, Via::Header).is_err());
    // A new frame limit applies to new streams: 3,200-byte frames are now too big.
    cfg.limits.max_frame_bytes = 1000;
    relay.handle.reload(&cfg).unwrap();
    let (mut ws, _) = connect(relay.addr(), &new_token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert_eq!(got.close_code(), Some(1009), "{got:?}");
    // Removing the previous secret retires the old tokens.
    cfg.tokens.previous_secret = None;
    relay.handle.reload(&cfg).unwrap();
    assert!(connect(relay.addr(), &old_token, Via::Header).is_err());
}

/// README: "Accounts changed through the admin API keep those changes:
/// runtime wins." A reload of an unchanged file kept none of them: a
/// disabled account (the compromised-key runbook's first step) came back
/// enabled, a limit went back to the file's, a removed account returned.
/// What the file itself changes still applies.
#[test]
fn a_reload_keeps_what_the_admin_api_changed_on_file_accounts() {
    let fake = fake(&["k1", "k2", "k3"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2"), ("c", "k3")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    for (method, path, body) in [
        ("POST", "/admin/accounts/a/disable", None),
        (
            "POST",
            "/admin/accounts/b/limit",
            Some(r#"{"max_concurrent_streams":3}"#),
        ),
        ("DELETE", "/admin/accounts/c", None),
    ] {
        let (status, answer) = http(admin, method, path, Some(ADMIN), body);
        assert_eq!(status, 200, "{method} {path}: {answer}");
    }
    let accounts = || -> serde_json::Value {
        let (_, body) = http(admin, "GET", "/admin/accounts", Some(ADMIN), None);
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["id"].as_str().unwrap().to_string(),
                    serde_json::json!([a["enabled"], a["max_concurrent_streams"]]),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let before = accounts();
    assert_eq!(before["a"][0], false, "{before}");
    let mut file = relay.cfg.clone();
    let log = relay.handle.reload(&file).unwrap();
    assert_eq!(accounts(), before, "{log:?}");
    // The file's own change to `a`'s limit applies; its runtime flag stays.
    file.accounts[0].max_concurrent_streams = 7;
    relay.handle.reload(&file).unwrap();
    let after = accounts();
    assert_eq!(after["a"], serde_json::json!([false, 7]), "{after}");
    assert_eq!(after["b"][1], 3, "{after}");
    assert!(after.get("c").is_none(), "{after}");
    // A move to a pool the running relay does not have waits for a
    // restart: the account stays where it is, not removed.
    file.accounts[1].pool = "eu".into();
    let log = relay.handle.reload(&file).unwrap();
    assert!(log.iter().any(|l| l.contains("not moved b")), "{log:?}");
    assert_eq!(accounts(), after, "{log:?}");
}

/// A reload's log says what it did to each file account: disabled or
/// enabled it, changed its limit or region, and, when a change of the file
/// is kept out because the admin API set that flag or limit at runtime,
/// that it was kept. Before, a reload said only "limits and token keys
/// applied": an operator who raised a limit in the file, or disabled an
/// account there, could not tell it had been applied, or silently
/// overridden by an earlier `keys limit`.
#[test]
fn a_reload_says_what_it_changed_on_each_account_and_what_it_kept() {
    let fake = fake(&["k1", "k2"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "k1"), ("acct-b", "k2")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let (status, answer) = http(
        relay.handle.admin_addr,
        "POST",
        "/admin/accounts/acct-b/limit",
        Some(ADMIN),
        Some(r#"{"max_concurrent_streams":3}"#),
    );
    assert_eq!(status, 200, "{answer}");
    let mut file = relay.cfg.clone();
    file.accounts[0].enabled = false;
    file.accounts[0].max_concurrent_streams = 7;
    file.accounts[0].region = "eu-west".into();
    file.accounts[1].max_concurrent_streams = 9;
    let log = relay.handle.reload(&file).unwrap();
    for line in [
        "disabled acct-a",
        "acct-a max_concurrent_streams 10 -> 7",
        "acct-a region \"\" -> \"eu-west\"",
        "kept acct-b max_concurrent_streams 3 (set at runtime; the file now says 9)",
    ] {
        assert!(log.iter().any(|l| l == line), "{line:?} not in {log:?}");
    }
    // A reload of the same file changes nothing, and says nothing of the accounts.
    let log = relay.handle.reload(&file).unwrap();
    assert!(!log.iter().any(|l| l.contains("acct-")), "{log:?}");
}

#[test]
fn a_reload_names_the_settings_it_changed_and_no_value() {
    // Before, a reload that changed `server.allow`, a limit, the device
    // limits or the admin token logged only "limits and token keys
    // applied": an operator could not tell from the log what it changed.
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let mut file = relay.cfg.clone();
    file.server.allow = vec!["127.0.0.0/8".parse().unwrap()];
    file.limits.idle_timeout += Duration::from_secs(1);
    file.failover.max_resumes += 1;
    file.devices.default.max_concurrent_streams = 7;
    let new_admin = "reload-admin-token-changed-000000";
    file.admin.token = Some(Secret::new(new_admin));
    let log = relay.handle.reload(&file).unwrap();
    let line = "changed: server.allow, limits.idle_timeout, failover.max_resumes, \
                [devices], admin.token";
    assert!(log.iter().any(|l| l == line), "{line:?} not in {log:?}");
    assert!(
        !log.iter()
            .any(|l| l.contains(new_admin) || l.contains(ADMIN)),
        "{log:?}"
    );
    // The same file again: nothing changed, and nothing is said to have.
    let log = relay.handle.reload(&file).unwrap();
    assert!(!log.iter().any(|l| l.starts_with("changed")), "{log:?}");
    // `[alerts]` is named as the file's section, not as `[usage]` (it
    // was: an operator who changed the webhook or a threshold found
    // `[usage]` in the log, and no `[alerts]`).
    file.usage.alerts.error_rate = 0.2;
    let log = relay.handle.reload(&file).unwrap();
    assert!(log.iter().any(|l| l == "changed: [alerts]"), "{log:?}");
    file.usage.persist_interval += Duration::from_secs(1);
    let log = relay.handle.reload(&file).unwrap();
    assert!(log.iter().any(|l| l == "changed: [usage]"), "{log:?}");
    // Still served (the new allow list holds the test's address).
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert!(got.finished(), "{got:?}");
}

/// The usage ledger across a reload and a crash: a reload leaves the
/// counters as they were (a counter never goes down), and a SIGKILL
/// loses the stream that was live then, whole, while the streams that
/// ended before the last persist are there after the restart.
#[test]
fn usage_survives_a_reload_and_a_crash_loses_the_live_stream() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let dir = std::env::temp_dir().join(format!("clio-reload-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("k1"), "k1\n").unwrap();
    let cfg = dir.join("relay.toml");
    let accounts = "[[account]]\nid = \"a\"\nkey_file = \"k1\"\n";
    let extra = "state_dir = \"state\"\n[usage]\npersist_interval = \"100ms\"\n";
    write_config(&cfg, &fake.url(), accounts, extra);
    let secret = secret();
    let keys = TokenKeys::new(&secret, None, Duration::from_secs(30));
    let token = |device: &str| {
        keys.mint(
            device,
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap()
    };
    let relay = RelayProcess::spawn(&cfg, &secret);
    let audio_total = |admin| {
        let (_, metrics) = http(admin, "GET", "/metrics", None, None);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("clio_relay_audio_seconds_total{account=\"a\"} "))
            .map(str::to_string)
    };
    // One stream ends: 10 frames of 100 ms.
    let (mut ws, _) = connect(relay.client, &token("ended"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    assert!(wait_until(Duration::from_secs(10), || audio_total(
        relay.admin
    )
    .as_deref()
        == Some("1")));
    // Another is live, 2 s of audio in and echoed.
    let (mut live, _) = connect(relay.client, &token("live"), Via::Header).unwrap();
    live.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(20, 2) {
        live.send(Message::binary(f)).unwrap();
        while !matches!(live.read().unwrap(), Message::Text(_)) {}
    }
    relay.sighup();
    relay.logged("reload").expect("the reload is logged");
    assert_eq!(audio_total(relay.admin).as_deref(), Some("1"));
    // Persisted every 100 ms: the ended stream is on disk well before this.
    std::thread::sleep(Duration::from_millis(500));
    drop(relay); // SIGKILL
    drop(live);
    let relay = RelayProcess::spawn(&cfg, &secret);
    let (_, body) = http(
        relay.admin,
        "GET",
        "/admin/usage?group_by=device",
        Some(ADMIN),
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows: Vec<_> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["audio_seconds"].as_f64(),
            )
        })
        .collect();
    assert_eq!(rows, vec![("ended".to_string(), Some(1.0))], "{v}");
    assert_eq!(audio_total(relay.admin).as_deref(), Some("1"));
    drop(relay);
    std::fs::remove_dir_all(&dir).ok();
}

/// Cost is computed when asked, from the audio the ledger keeps and the
/// price in force then: a reload that changes `price_per_hour` reprices
/// the usage already counted.
#[test]
fn a_reloaded_price_reprices_the_usage_already_counted() {
    let fake = fake(&["k1"], |_| {});
    let dir = std::env::temp_dir().join(format!("clio-reload-price-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("k1"), "k1\n").unwrap();
    let cfg = dir.join("relay.toml");
    let extra = "state_dir = \"state\"\n";
    let account = |price: &str| {
        format!("[[account]]\nid = \"a\"\nkey_file = \"k1\"\nprice_per_hour = {price}\n")
    };
    write_config(&cfg, &fake.url(), &account("3.6"), extra);
    let secret = secret();
    let relay = RelayProcess::spawn(&cfg, &secret);
    let token = TokenKeys::new(&secret, None, Duration::from_secs(30))
        .mint(
            "phone",
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap();
    let (mut ws, _) = connect(relay.client, &token, Via::Header).unwrap();
    // 10 s of audio: 100 frames of 100 ms.
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(100, 1)).finished());
    let cost = || {
        let (_, body) = http(
            relay.admin,
            "GET",
            "/admin/usage?group_by=account",
            Some(ADMIN),
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["rows"][0]["cost"].as_f64()
    };
    let near = |c: Option<f64>, want: f64| c.is_some_and(|c| (c - want).abs() < 1e-9);
    // 10 s at 3.6 an hour.
    assert!(wait_until(Duration::from_secs(10), || near(cost(), 0.01)));
    write_config(&cfg, &fake.url(), &account("7.2"), extra);
    relay.sighup();
    relay.logged("reload").expect("the reload is logged");
    assert!(
        wait_until(Duration::from_secs(10), || near(cost(), 0.02)),
        "{:?}",
        cost()
    );
    // Removed from the file, the account has no price in force: its audio
    // stays, priced 0 (README, "Usage and cost"), and by pool it is under
    // `-`.
    let other = "[[account]]\nid = \"b\"\nkey_file = \"k1\"\nprice_per_hour = 7.2\n";
    write_config(&cfg, &fake.url(), other, extra);
    relay.sighup();
    assert!(
        wait_until(Duration::from_secs(10), || near(cost(), 0.0)),
        "{:?}",
        cost()
    );
    let (_, body) = http(
        relay.admin,
        "GET",
        "/admin/usage?group_by=pool",
        Some(ADMIN),
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rows"][0]["key"], "-", "{body}");
    assert_eq!(v["rows"][0]["audio_seconds"], 10.0, "{body}");
    assert_eq!(v["rows"][0]["cost"], 0.0, "{body}");
    drop(relay);
    std::fs::remove_dir_all(&dir).ok();
}

/// The key-rotation runbook rotates with `keys rotate`, then writes the new
/// key into the account's `key_file` (step 4). A later rotation the
/// documented way for a file account (write the `key_file`, reload) was
/// ignored, with nothing in the log: the account had counted as changed at
/// runtime since the first rotation, and runtime wins. The relay kept the
/// key the operator was about to revoke. Now a new key in a file that held
/// the key the account runs is rotated in; one written while the account
/// runs another key (rotated at runtime since) is kept out, and said so.
#[test]
fn a_file_rotation_after_a_runtime_rotation_is_applied() {
    let fake = fake(&["k1", "k2", "k3", "k4", "k5"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let rotate = |key: &str| {
        let (status, answer) = http(
            relay.handle.admin_addr,
            "POST",
            "/admin/accounts/acct-a/rotate",
            Some(ADMIN),
            Some(&format!(r#"{{"key":"{key}","overlap":"0s"}}"#)),
        );
        assert_eq!(status, 200, "{answer}");
    };
    let key_used = || {
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
        assert!(got.finished(), "{got:?}");
        fake.sessions().last().unwrap().key.clone().unwrap()
    };
    rotate("k2");
    assert_eq!(key_used(), "k2");
    // Step 4: the file catches up; nothing to do.
    let mut file = relay.cfg.clone();
    file.accounts[0].key = Secret::new("k2");
    let log = relay.handle.reload(&file).unwrap();
    assert!(!log.iter().any(|l| l.contains("acct-a")), "{log:?}");
    assert_eq!(key_used(), "k2");
    // 90 days on, the file rotates: k3 takes the new streams.
    file.accounts[0].key = Secret::new("k3");
    let log = relay.handle.reload(&file).unwrap();
    assert!(
        log.iter().any(|l| l.starts_with("rotated acct-a to key ")),
        "{log:?}"
    );
    assert_eq!(key_used(), "k3");
    // Rotated at runtime again, and the file changed before it caught up:
    // runtime wins, and the log says the file's key was not used.
    rotate("k4");
    file.accounts[0].key = Secret::new("k5");
    let log = relay.handle.reload(&file).unwrap();
    assert!(
        log.iter().any(|l| l.starts_with("kept acct-a key ")
            && l.ends_with("(rotated at runtime; the file's new key is not used)")),
        "{log:?}"
    );
    assert_eq!(key_used(), "k4");
}

/// README: a reload's log names each change of the file that a runtime
/// change kept out. An account rotated at runtime keeps its region, flag
/// and limit over the file's, and a reload that changed them in the file
/// said nothing of it: the operator saw the reload succeed and took the
/// change for applied.
#[test]
fn a_reload_says_what_it_kept_on_an_account_rotated_at_runtime() {
    let fake = fake(&["k1", "k2"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let (status, answer) = http(
        relay.handle.admin_addr,
        "POST",
        "/admin/accounts/acct-a/rotate",
        Some(ADMIN),
        Some(r#"{"key":"k2","overlap":"0s"}"#),
    );
    assert_eq!(status, 200, "{answer}");
    let mut file = relay.cfg.clone();
    file.accounts[0].region = "eu-west".into();
    file.accounts[0].enabled = false;
    file.accounts[0].max_concurrent_streams = 4;
    let log = relay.handle.reload(&file).unwrap();
    for line in [
        "kept acct-a region \"\" (changed at runtime; the file now says \"eu-west\")",
        "kept acct-a enabled (changed at runtime; the file now says disabled)",
        "kept acct-a max_concurrent_streams 10 (changed at runtime; the file now says 4)",
    ] {
        assert!(log.iter().any(|l| l == line), "{line:?} not in {log:?}");
    }
    let (_, body) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/accounts",
        Some(ADMIN),
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let a = &v["accounts"][0];
    assert_eq!(
        (&a["region"], &a["enabled"], &a["max_concurrent_streams"]),
        (
            &serde_json::json!(""),
            &serde_json::json!(true),
            &serde_json::json!(10)
        ),
        "{a}"
    );
    // The same file again: nothing new to say.
    let log = relay.handle.reload(&file).unwrap();
    assert!(!log.iter().any(|l| l.contains("acct-a")), "{log:?}");
}
