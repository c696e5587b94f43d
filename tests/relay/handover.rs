//! Operator changes under live streams, on the `clio-relay` binary: a
//! hand-over restart (`--join-client-port`, then SIGTERM to the old
//! process), config reloads and key changes, and what the usage ledger
//! says after each.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use serde_json::Value;
use tungstenite::Message;

use crate::util::*;

const ADMIN: &str = "handover-admin-token-0123456789";
const MASTER: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// Generous bound on any wait: the machine is shared.
const LIMIT: Duration = Duration::from_secs(30);

/// A `clio-relay run` process, killed when dropped.
struct Proc {
    child: Child,
    admin: SocketAddr,
    /// The log lines that hold `logged`'s pattern, as they come.
    kept: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(cfg: &std::path::Path, secret: &Secret, join: bool) -> Proc {
        Proc::spawn_with(cfg, secret, join, &[])
    }

    /// [`Proc::spawn`] with more environment (libfaketime's, to shift the
    /// process's clock).
    fn spawn_with(
        cfg: &std::path::Path,
        secret: &Secret,
        join: bool,
        env: &[(&str, &str)],
    ) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clio-relay"));
        cmd.envs(env.iter().copied());
        cmd.args(["run", "--config", cfg.to_str().unwrap()]);
        if join {
            cmd.arg("--join-client-port");
        }
        let mut child = cmd
            .env("HANDOVER_SECRET", secret.expose())
            .env("HANDOVER_ADMIN", ADMIN)
            .env("HANDOVER_MASTER", MASTER)
            .env("HANDOVER_KEY", "k1")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let listening = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.contains("clio-relay listening"))
            .expect("the relay logs its addresses");
        // The rest of the log is read (kept only when a test looks for
        // it: the WARN lines), so it never blocks.
        let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = kept.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.contains("WARN") {
                    keep.lock().unwrap().push(line);
                }
            }
        });
        Proc {
            admin: listening_addr(&listening, "admin"),
            child,
            kept,
        }
    }

    /// How many WARN lines so far hold `what`.
    fn logged(&self, what: &str) -> usize {
        self.kept
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    fn exited(&mut self) -> bool {
        wait_until(LIMIT, || self.child.try_wait().unwrap().is_some())
    }

    fn rows(&self, group: &str) -> serde_json::Map<String, Value> {
        let (status, body) = http(
            self.admin,
            "GET",
            &format!("/admin/usage?group_by={group}"),
            Some(ADMIN),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["key"].as_str().unwrap().to_string(), r.clone()))
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on 127.0.0.1 now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A state directory and in it a config file: client port `port`, the
/// admin port chosen by the kernel (so two processes can share the file),
/// the key store's master key, the ledger persisted every 100 ms, then
/// `rest` (sections and accounts).
fn handover_config(
    upstream: &str,
    port: u16,
    rest: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("relay.toml");
    write_handover_config(&cfg, upstream, port, rest);
    (dir, cfg)
}

fn write_handover_config(cfg: &std::path::Path, upstream: &str, port: u16, rest: &str) {
    std::fs::write(
        cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 2\n\
             [upstream]\nurl = \"{upstream}\"\n[tokens]\nsecret_env = \"HANDOVER_SECRET\"\n\
             [admin]\ntoken_env = \"HANDOVER_ADMIN\"\nmaster_key_env = \"HANDOVER_MASTER\"\n\
             state_dir = \"state\"\nhealth_interval = \"0s\"\n\
             [usage]\npersist_interval = \"100ms\"\n{rest}"
        ),
    )
    .unwrap();
}

fn minter(secret: &Secret) -> impl Fn(&str) -> String {
    let keys = TokenKeys::new(secret, None, Duration::from_secs(30));
    move |device: &str| {
        keys.mint(
            device,
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap()
    }
}

/// A stream of `device` opened on `addr`: its config, then `frames`
/// frames of 100 ms, each echoed before the next goes; left open.
fn open(addr: SocketAddr, token: &str, frames: usize) -> Ws {
    let (mut ws, _) = connect(addr, token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    more(&mut ws, frames);
    ws
}

/// `frames` more frames of 100 ms on `ws`, each echoed before the next.
fn more(ws: &mut Ws, frames: usize) {
    for f in audio_frames(frames, 3) {
        ws.send(Message::binary(f)).unwrap();
        loop {
            match ws.read().unwrap() {
                Message::Text(t) => {
                    assert!(!t.contains("error_code"), "{t}");
                    break;
                }
                _ => continue,
            }
        }
    }
}

/// Ends `ws`'s audio and reads to the close.
fn finish(ws: &mut Ws) -> Received {
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    read_all(ws)
}

fn audio(rows: &serde_json::Map<String, Value>, key: &str) -> (u64, f64) {
    let r = rows.get(key).unwrap_or_else(|| panic!("{key}: {rows:?}"));
    (
        r["streams"].as_u64().unwrap(),
        r["audio_seconds"].as_f64().unwrap(),
    )
}

fn current_key(p: &Proc, id: &str) -> String {
    let (status, body) = http(p.admin, "GET", "/admin/accounts", Some(ADMIN), None);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let a = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("{id}: {v}"))
        .clone();
    a["key"]["fingerprint"].to_string()
}

/// A key pulled during a hand-over restart, on either process, reaches
/// the other within a second: both run on one state directory, and each
/// takes the account set the other saves in the key store. The operator's
/// `clio-relay keys` reaches the process at the config file's admin port,
/// the old one; the new one's streams must leave the pulled key too, and
/// a change made on the new one must move the old one's draining streams.
/// Before, the new process never saw a change made on the old one: it kept
/// taking streams on the pulled key, and its next change (or a reload)
/// wrote its own set over the store, so the pull was lost for good.
#[test]
fn a_key_pulled_on_either_relay_of_a_hand_over_reaches_the_other() {
    let fake = fake(&["k1", "k2", "k3"], |c| c.echo = true);
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\n",
    );
    let secret = secret();
    let token = minter(&secret);
    let old = Proc::spawn(&cfg, &secret, false);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut live = open(addr, &token("draining"), 5);
    let new = Proc::spawn(&cfg, &secret, true);
    old.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(wait_until(LIMIT, || http_get(old.admin, "/healthz", "").0 == 503));
    let rotate = |p: &Proc, key: &str| {
        let (status, body) = http(
            p.admin,
            "POST",
            "/admin/accounts/a/rotate",
            Some(ADMIN),
            Some(&format!(r#"{{"key":"{key}","overlap":"0s"}}"#)),
        );
        assert_eq!(status, 200, "{body}");
        current_key(p, "a")
    };
    // Pulled on the old process: the new one runs the new key.
    let k2 = rotate(&old, "k2");
    assert!(
        wait_until(LIMIT, || current_key(&new, "a") == k2),
        "the new process still runs key {} after the old one pulled it for {k2}",
        current_key(&new, "a")
    );
    let mut fresh = open(addr, &token("fresh"), 3);
    assert!(finish(&mut fresh).finished());
    // The draining stream moved to k2 unseen, and goes on.
    more(&mut live, 3);
    // Pulled on the new process: the old one's draining stream leaves it.
    let k3 = rotate(&new, "k3");
    assert!(
        wait_until(LIMIT, || current_key(&old, "a") == k3),
        "the old process still runs key {} after the new one pulled it for {k3}",
        current_key(&old, "a")
    );
    // The move off the pulled key is the shard's, a moment after the
    // process knows of the pull: waited for, not raced by the stream's end.
    assert!(
        wait_until(LIMIT, || fake
            .sessions()
            .iter()
            .any(|s| s.key.as_deref() == Some("k3"))),
        "the draining stream never moved to k3"
    );
    more(&mut live, 3);
    assert!(finish(&mut live).finished());
    let mut old = old;
    assert!(
        old.exited(),
        "the old process did not exit after its stream"
    );
    // Upstream: the draining stream began on k1, and ended (its empty
    // frame) on k3; the new process's stream ran on k2.
    let sessions = fake.sessions();
    let mut ended_on: Vec<_> = sessions
        .iter()
        .filter(|s| s.empty_frame_received)
        .map(|s| s.key.clone().unwrap_or_default())
        .collect();
    ended_on.sort();
    assert_eq!(ended_on, ["k2", "k3"], "{sessions:?}");
    assert_eq!(sessions[0].key.as_deref(), Some("k1"));
    // Usage: each stream once, with the audio its client sent.
    assert!(wait_until(LIMIT, || new
        .rows("device")
        .contains_key("draining")));
    let devices = new.rows("device");
    assert_eq!(audio(&devices, "draining"), (1, 1.1), "{devices:?}");
    assert_eq!(audio(&devices, "fresh"), (1, 0.3), "{devices:?}");
    drop(new);
    // The next start runs the last key pulled.
    let next = Proc::spawn(&cfg, &secret, false);
    assert_eq!(current_key(&next, "a"), k3);
    drop(next);
    std::fs::remove_dir_all(&dir).ok();
}

/// `/admin/revocations` on `p`: its revoked devices and token ids.
fn revoked(p: &Proc) -> (Vec<String>, Vec<String>) {
    let (status, body) = http(p.admin, "GET", "/admin/revocations", Some(ADMIN), None);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let ids = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    };
    (ids("devices"), ids("token_ids"))
}

/// A revocation made during a hand-over restart, on either process,
/// holds on both, and so does a lift: they share `revocations.json`, and
/// each takes the lists the other saves, and ends its own live streams of
/// a device revoked there with `end_live_streams`. A device revoked on the old
/// process (where the config file's admin port leads) is refused by the
/// new one, which takes every new connection. Before, the new process
/// read the file only at its start: it took the revoked device's
/// streams, and its next change wrote its own lists over the file, so
/// the revocation was gone after the next restart too.
#[test]
fn a_revocation_made_on_either_relay_of_a_hand_over_holds_on_both() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\n",
    );
    let secret = secret();
    let token = minter(&secret);
    let old = Proc::spawn(&cfg, &secret, false);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut live = open(addr, &token("draining"), 3);
    let mut lost = open(addr, &token("lost"), 3);
    let new = Proc::spawn(&cfg, &secret, true);
    old.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(wait_until(LIMIT, || http_get(old.admin, "/healthz", "").0 == 503));
    let change = |p: &Proc, method: &str, body: &str| {
        let (status, answer) = http(
            p.admin,
            method,
            "/admin/revocations",
            Some(ADMIN),
            Some(body),
        );
        assert_eq!(status, 200, "{answer}");
    };
    // Revoked on the old process: refused by the new one.
    change(&old, "POST", r#"{"device_id":"stolen"}"#);
    assert!(
        wait_until(LIMIT, || revoked(&new).0 == ["stolen"]),
        "the new process's revocations: {:?}",
        revoked(&new)
    );
    let (mut ws, _) = connect(addr, &token("stolen"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(401), Some(1008)),
        "{got:?}"
    );
    // Revoked on the new process, its live streams to end, and the first
    // lifted there: the old process's lists follow, and its stream of
    // the device ends.
    change(
        &new,
        "POST",
        r#"{"device_id":"lost","end_live_streams":true}"#,
    );
    change(&new, "DELETE", r#"{"device_id":"stolen"}"#);
    assert!(
        wait_until(LIMIT, || revoked(&old).0 == ["lost"]),
        "the old process's revocations: {:?}",
        revoked(&old)
    );
    let got = read_all(&mut lost);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(401), Some(1008)),
        "the old process's stream of a device revoked on the new one: {got:?}"
    );
    more(&mut live, 2);
    assert!(finish(&mut live).finished());
    let mut old = old;
    assert!(
        old.exited(),
        "the old process did not exit after its stream"
    );
    // A stream of the lifted device is served.
    let mut back = open(addr, &token("stolen"), 2);
    assert!(finish(&mut back).finished());
    drop(new);
    // The next start has the lists as last changed.
    let next = Proc::spawn(&cfg, &secret, false);
    assert_eq!(revoked(&next), (vec!["lost".to_string()], vec![]));
    drop(next);
    std::fs::remove_dir_all(&dir).ok();
}

/// A hand-over restart under load, with the key pulled on the old process
/// meanwhile: relay-load (echo mode: each frame back once, in order)
/// keeps 8 streams going on the shared client port while the new process
/// joins, the old one drains and exits. No stream is refused, cut or
/// loses a frame; the streams open on the pulled key move off it unseen;
/// and the ledger counts each stream once with the audio its client sent
/// (relay-load's frames, 100 ms each), whichever process carried it.
#[test]
fn a_hand_over_under_load_with_a_key_pulled_loses_and_doubles_nothing() {
    use relay_load::{self, AuthVia, Credentials, LoadOptions, Pace, Target};
    let fake = fake(&["k1", "k2"], |c| c.echo = true);
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\nmax_concurrent_streams = 100\n",
    );
    let secret = secret();
    let old = Proc::spawn(&cfg, &secret, false);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let keys = std::sync::Arc::new(TokenKeys::new(&secret, None, Duration::from_secs(30)));
    let load = std::thread::spawn(move || {
        relay_load::run(&LoadOptions {
            target: Target::relay(addr),
            auth: AuthVia::Header,
            credentials: Credentials::Mint(keys, Duration::from_secs(600)),
            streams: 8,
            ramp_per_sec: 100.0,
            stream_seconds: 1.0,
            pace: Pace::Times(4.0),
            repeat: true,
            duration: Duration::from_secs(6),
            threads: 1,
            ..LoadOptions::default()
        })
        .unwrap()
    });
    // Streams on the old process first.
    assert!(wait_until(LIMIT, || fake.sessions().len() >= 8));
    let new = Proc::spawn(&cfg, &secret, true);
    let mut old = old;
    old.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, body) = http(
        old.admin,
        "POST",
        "/admin/accounts/a/rotate",
        Some(ADMIN),
        Some(r#"{"key":"k2","overlap":"0s"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let report = load.join().unwrap();
    let summary = report.table();
    assert!(report.streams_failed.is_empty(), "{summary}");
    assert_eq!(
        (
            report.streams_cut,
            report.lost,
            report.duplicated,
            report.reordered
        ),
        (0, 0, 0, 0),
        "{summary}"
    );
    assert!(old.exited(), "the old process did not exit");
    let streams = || {
        new.rows("account")
            .get("a")
            .and_then(|r| r["streams"].as_u64())
    };
    assert!(
        wait_until(LIMIT, || streams() == Some(report.streams_ok)),
        "ledger {:?}, relay-load {summary}",
        new.rows("account")
    );
    let a = &new.rows("account")["a"];
    assert_eq!(
        a["audio_seconds"].as_f64(),
        Some(report.frames_sent as f64 / 10.0),
        "{a}"
    );
    let on = |key: &str| {
        fake.sessions()
            .iter()
            .filter(|s| s.key.as_deref() == Some(key))
            .count()
    };
    assert!(
        on("k2") > 0 && on("k1") > 0,
        "k1 {}, k2 {}",
        on("k1"),
        on("k2")
    );
    drop(new);
    std::fs::remove_dir_all(&dir).ok();
}

/// `clio_relay_devices_tracked` of `p`.
fn devices_tracked(p: &Proc) -> Option<f64> {
    let (_, metrics) = http(p.admin, "GET", "/metrics", None, None);
    series_value(&metrics, "clio_relay_devices_tracked")
}

/// A device's audio on the old relay of a hand-over restart counts on the
/// new one against its daily allowance: the new process learns from the
/// shared ledger what the old one wrote there as its streams ended. A
/// device that streamed 2.5 s of its 3 s on the old process, its stream
/// ending there after the new one started, is ended at the first whole
/// second of its next stream on the new one (about 1 s relayed). Before,
/// the new process knew only the ledger as of its own start: it let the
/// device stream a whole new allowance (30 frames).
#[test]
fn a_devices_audio_on_the_old_relay_of_a_hand_over_counts_on_the_new() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[devices]\naudio_seconds_per_day = 3\n[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\n",
    );
    let secret = secret();
    let token = minter(&secret);
    let mut old = Proc::spawn(&cfg, &secret, false);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut first = open(addr, &token("talker"), 25);
    let new = Proc::spawn(&cfg, &secret, true);
    old.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(wait_until(LIMIT, || http_get(old.admin, "/healthz", "").0 == 503));
    assert!(finish(&mut first).finished());
    assert!(
        old.exited(),
        "the old process did not exit after its stream"
    );
    // The new process has learnt of the device (it tracks it) once the
    // old one's last persist is in the ledger.
    let learnt = wait_until(LIMIT, || devices_tracked(&new) == Some(1.0));
    // Frame by frame, each echoed before the next goes: how many got
    // through before the allowance ended the stream.
    let (mut ws, _) = connect(addr, &token("talker"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let (echoed, ended) = frames_until_ended(&mut ws, 60);
    assert!(
        echoed <= 12,
        "{echoed} frames streamed on the new process, of a day with 0.5 s left \
         (learnt: {learnt}); then {ended:?}"
    );
    let ended = ended.unwrap_or_default();
    assert!(
        ended.contains("429") && ended.contains("daily audio"),
        "{ended}"
    );
    drop(new);
    std::fs::remove_dir_all(&dir).ok();
}

/// Debian's `faketime` package's preload library (.ci/run installs it).
fn libfaketime() -> &'static str {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libfaketime is not installed: apt-get install faketime (.ci/run does)")
}

/// A stream that crosses UTC midnight counts its audio on the day it was
/// relayed, in the ledger as in the device's daily allowance: a restart
/// after midnight starts the device's day with the audio since midnight
/// only. The relay runs under libfaketime, its clock 20 s before the next
/// midnight (the host's clock is not touched); a device with 3 s a day
/// streams 2 s before midnight and 1 s after, in one stream, and the
/// relay restarts: the device has 2 s left. Before, the ledger put the
/// stream's whole audio on the day it ended, and the restart seeded the
/// device's new day with yesterday's 2 s too: its next stream was refused
/// with its allowance used up (and the ledger showed 3 s on the new day,
/// none on the old).
#[test]
fn a_stream_across_midnight_counts_its_audio_on_each_day() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let fake = fake(&["k1"], |c| {
        c.echo = true;
        // The stream waits for midnight with no audio.
        c.idle_timeout = Duration::from_secs(120);
    });
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[devices]\naudio_seconds_per_day = 3\n[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\n",
    );
    let secret = secret();
    let keys = TokenKeys::new(&secret, None, Duration::from_secs(30));
    let real = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let now = real();
    let midnight = (now / 86_400 + 1) * 86_400;
    // The relay's clock: this much ahead of the host's.
    let offset = midnight - 20 - now;
    let relay_now = || real() + offset;
    let token = |device: &str| {
        let at = UNIX_EPOCH + Duration::from_secs(relay_now());
        keys.mint(device, Duration::from_secs(600), at).unwrap()
    };
    let shift = format!("+{offset}");
    let env = [
        ("LD_PRELOAD", libfaketime()),
        ("FAKETIME", shift.as_str()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let mut first = Proc::spawn_with(&cfg, &secret, false, &env);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ws = open(addr, &token("night"), 20);
    assert!(
        relay_now() < midnight,
        "the machine was too slow: the first 2 s of audio went after midnight"
    );
    // Past midnight by the relay's clock (waited for, at most 20 s).
    assert!(wait_until(Duration::from_secs(60), || relay_now() > midnight));
    more(&mut ws, 10);
    assert!(finish(&mut ws).finished());
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.exited(), "the relay did not stop");
    let day = |d: u64| clio_relay::control::usage::format_day(d);
    let (yesterday, today) = (day(midnight / 86_400 - 1), day(midnight / 86_400));
    let again = Proc::spawn_with(&cfg, &secret, false, &env);
    let on = |d: &str| {
        let (status, body) = http(
            again.admin,
            "GET",
            &format!("/admin/usage?group_by=device&from={d}&to={d}"),
            Some(ADMIN),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == "night")
            .map(|r| r["audio_seconds"].as_f64().unwrap())
    };
    let (before, after) = (on(&yesterday), on(&today));
    let (mut ws, _) = connect(addr, &token("night"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let (echoed, ended) = frames_until_ended(&mut ws, 60);
    assert!(
        (15..=30).contains(&echoed),
        "{echoed} frames streamed after the restart, of a day with 2 s left; then {ended:?}; \
         the ledger: {before:?} s on {yesterday}, {after:?} s on {today}"
    );
    assert_eq!(
        (before, after),
        (Some(2.0), Some(1.0)),
        "the ledger's days: {yesterday}, {today}"
    );
    drop(again);
    std::fs::remove_dir_all(&dir).ok();
}

/// One stream of a frame with `token` on `addr`: `Ok` when the frame was
/// echoed, else what refused it.
fn one_frame(addr: SocketAddr, token: &str) -> Result<(), String> {
    let mut ws = match connect(addr, token, Via::Header) {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            return Err(format!(
                "{} {}",
                resp.status(),
                String::from_utf8_lossy(&body)
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    ws.send(Message::text(config_message(None))).unwrap();
    match frames_until_ended(&mut ws, 1) {
        (1, _) => Ok(()),
        (_, ended) => Err(ended.unwrap_or_else(|| "closed".into())),
    }
}

/// A token id revoked while the relay's clock was behind stays revoked
/// when the clock is put right: a revocation is kept its whole time
/// (`tokens.max_ttl` + `tokens.clock_skew`) by the process's monotonic
/// clock too, not only by the wall clock it was dated with. The relay
/// runs under libfaketime an hour behind, then (20 s after its start)
/// on the right time, as when NTP steps a clock that was off; the token
/// revoked meanwhile was minted by a right clock (refused then as issued
/// in the future) and is valid for 10 minutes more. A revocation loaded
/// from the file (the canary), due 45 s after the start, is let go once
/// its time is over, which shows the once-a-second expiry ran after the
/// step. Before, the revocation, dated an hour back, expired at the
/// first second after the step, and the revoked token opened streams.
#[test]
fn a_token_revoked_while_the_clock_was_behind_stays_revoked_when_it_is_put_right() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let fake = fake(&["k1"], |c| c.echo = true);
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[tokens]\nmax_ttl = \"30m\"\n[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\n",
    );
    // The [tokens] table is already in the file: the key goes there.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[tokens]\nmax_ttl = \"30m\"\n", "")
        .replace("[tokens]\n", "[tokens]\nmax_ttl = \"30m\"\n");
    std::fs::write(&cfg, text).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The canary: by the behind clock, due 45 s from now (1830 s kept),
    // well after the step.
    let canary_at = now - 3600 + 45 - 1830;
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(
        dir.join("state/revocations.json"),
        format!(
            r#"{{"devices":[],"token_ids":["canary"],"token_ids_revoked_at":{{"canary":{canary_at}}},"token_ids_clock_skew":{{"canary":30}}}}"#
        ),
    )
    .unwrap();
    let secret = secret();
    let token = minter(&secret);
    let stolen = token("stolen");
    let env = [
        ("LD_PRELOAD", libfaketime()),
        ("FAKETIME", "-3600"),
        ("FAKETIME_STOP_AFTER_SECONDS", "20"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let relay = Proc::spawn_with(&cfg, &secret, false, &env);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let token_id = |t: &str| {
        let payload = t.split('.').nth(2).unwrap();
        let json =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap();
        serde_json::from_slice::<Value>(&json).unwrap()["t"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let id = token_id(&stolen);
    let (status, body) = http(
        relay.admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(&format!(r#"{{"token_id":"{id}"}}"#)),
    );
    assert_eq!(status, 200, "{body}");
    // Revoked while the clock was still behind: the token was then one
    // issued in the future.
    let before = one_frame(addr, &stolen);
    assert!(
        before.as_ref().is_err_and(|e| e.contains("future")),
        "the relay's clock was not behind when the token was revoked: {before:?}"
    );
    let listed = |id: &str| {
        let (status, body) = http(relay.admin, "GET", "/admin/revocations", Some(ADMIN), None);
        assert_eq!(status, 200, "{body}");
        body.contains(&format!("\"{id}\""))
    };
    assert!(listed("canary"), "the canary was let go before its time");
    assert!(
        wait_until(Duration::from_secs(120), || !listed("canary")),
        "the canary revocation never expired"
    );
    assert!(
        listed(&id),
        "the revocation made while the clock was behind was let go"
    );
    let after = one_frame(addr, &stolen);
    assert!(
        after.as_ref().is_err_and(|e| e.contains("revoked")),
        "the revoked token, valid by the right clock: {after:?}"
    );
    drop(relay);
    std::fs::remove_dir_all(&dir).ok();
}

/// `clio_relay_key_age_seconds` of account `a`'s key on `p`.
fn key_age(p: &Proc) -> Option<f64> {
    let (_, metrics) = http(p.admin, "GET", "/metrics", None, None);
    metrics.lines().find_map(|l| {
        l.strip_prefix("clio_relay_key_age_seconds{account=\"a\",")?
            .rsplit_once(' ')?
            .1
            .parse()
            .ok()
    })
}

/// A config-file key first seen while the clock was ahead (a host that
/// booted a year ahead, until NTP stepped it back) is dated from the
/// first start on a right clock, and its age then survives restarts
/// again. The relay first runs under libfaketime 400 days ahead, then
/// twice on the host's clock: the second of those shows the key at
/// least as old as the first did. Before, `key-dates.json` kept the
/// date 400 days ahead: every start counted the key's age from 0 again
/// (the date not reached yet), so for 400 days no restarted relay
/// warned that the key was due for rotation.
#[test]
fn a_key_first_seen_by_a_clock_ahead_is_dated_from_a_right_one() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\n",
    );
    let secret = secret();
    let ahead = [
        ("LD_PRELOAD", libfaketime()),
        ("FAKETIME", "+400d"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let mut first = Proc::spawn_with(&cfg, &secret, false, &ahead);
    assert!(wait_until(LIMIT, || key_age(&first).is_some()));
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.exited(), "the relay did not stop");
    let mut right = Proc::spawn(&cfg, &secret, false);
    assert!(
        wait_until(LIMIT, || key_age(&right).is_some_and(|a| a >= 2.0)),
        "the key's age never moved: {:?}",
        key_age(&right)
    );
    right.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(right.exited(), "the relay did not stop");
    let again = Proc::spawn(&cfg, &secret, false);
    let age = key_age(&again);
    assert!(
        age.is_some_and(|a| a >= 2.0),
        "the key's age after a restart on the right clock: {age:?} s; key-dates.json: {}",
        std::fs::read_to_string(dir.join("state/key-dates.json")).unwrap_or_default()
    );
    drop(again);
    std::fs::remove_dir_all(&dir).ok();
}

/// The once-a-day warning of a key due for rotation comes again when the
/// clock is stepped back, not only once the clock is back past the day
/// after the last one. The relay runs under libfaketime 400 days ahead
/// for its first 5 s, then on the host's clock; its key, dated 100 days
/// back in `key-dates.json`, is past the 90-day rotation period either
/// way. Before, the warning of the first second was dated 400 days ahead,
/// and the next was due only a day after that: no warning for 401 days
/// (a host booted with its clock ahead, until NTP stepped it right).
#[test]
fn the_rotation_warning_comes_again_after_the_clock_is_stepped_back() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let fake = fake(&["k1"], |c| c.echo = true);
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\n",
    );
    let fingerprint = Secret::new("k1").fingerprint();
    let dated = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 100 * 86_400;
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(
        dir.join("state/key-dates.json"),
        format!(r#"{{"first_seen":{{"{fingerprint}":{dated}}}}}"#),
    )
    .unwrap();
    let secret = secret();
    let env = [
        ("LD_PRELOAD", libfaketime()),
        ("FAKETIME", "+400d"),
        ("FAKETIME_STOP_AFTER_SECONDS", "5"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let relay = Proc::spawn_with(&cfg, &secret, false, &env);
    let warning = "key is older than the rotation period";
    assert!(
        wait_until(LIMIT, || relay.logged(warning) >= 1),
        "the key due for rotation was never warned about"
    );
    assert!(
        key_age(&relay).is_some_and(|a| a > 400.0 * 86_400.0),
        "the first warning came after the clock was stepped back: {:?}",
        key_age(&relay)
    );
    assert!(
        wait_until(LIMIT, || relay.logged(warning) >= 2),
        "no warning after the clock was stepped back (the key's age now {:?})",
        key_age(&relay)
    );
    assert_eq!(
        relay.logged(warning),
        2,
        "warned more than once after the step"
    );
    drop(relay);
    std::fs::remove_dir_all(&dir).ok();
}

/// A relay from before the usage database (up to late November 2026)
/// keeps its ledger in `state_dir/usage.json`: all its usage in one
/// file, read at its start and written whole at each persist and as it
/// exits. A new relay imports that file at its start and renames it. In
/// a hand-over from such a relay the old one is still running, and
/// writes the file again with everything it read at its own start: the
/// next start of a new relay imported all of it a second time (every
/// stream the old relay ever counted, twice). So a hand-over that finds
/// `usage.json` is refused (exit 3, naming the file and what to do
/// instead), and changes nothing; a start without the old relay imports
/// it once.
#[test]
fn a_hand_over_from_a_relay_that_keeps_usage_json_is_refused() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let port = free_port();
    let (dir, cfg) = handover_config(
        &fake.url(),
        port,
        "[[account]]\nid = \"a\"\nkey_env = \"HANDOVER_KEY\"\n",
    );
    let secret = secret();
    // The relay running on the port (here a current one: what matters is
    // the state directory the older relay writes).
    let running = Proc::spawn(&cfg, &secret, false);
    // Its ledger is open (the admin API answers from it) before the file
    // below is there: it imports none.
    assert!(running.rows("account").is_empty());
    // usage.json as the older relay writes it (its `UsageBook`: by day,
    // then account or device, then the totals).
    let today = clio_relay::core::devices::utc_day(std::time::SystemTime::now());
    let totals = serde_json::json!({"streams": 4, "audio_ms": 40000, "audio_ms_relay": 40000,
        "bytes_up": 1280000, "bytes_down": 400, "errors": {}});
    let book = serde_json::json!({
        "by_account": {today.to_string(): {"a": totals.clone()}},
        "by_device": {today.to_string(): {"phone": totals}},
    });
    let state = dir.join("state");
    std::fs::write(state.join("usage.json"), book.to_string()).unwrap();
    let log = dir.join("hand-over.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--join-client-port",
        ])
        .env("HANDOVER_SECRET", secret.expose())
        .env("HANDOVER_ADMIN", ADMIN)
        .env("HANDOVER_MASTER", MASTER)
        .env("HANDOVER_KEY", "k1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let exited = wait_until(LIMIT, || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(exited, "the hand-over was taken:\n{said}");
    assert_eq!(status.code(), Some(3), "{said}");
    assert!(
        said.contains("usage.json") && said.contains("stop it first"),
        "{said}"
    );
    // Nothing imported: the file is where the older relay writes it.
    assert!(state.join("usage.json").exists());
    assert!(!state.join("usage.json.migrated").exists());
    drop(running);
    // Started alone, the new relay imports it once.
    let next = Proc::spawn(&cfg, &secret, false);
    assert_eq!(audio(&next.rows("account"), "a"), (4, 40.0));
    assert!(!state.join("usage.json").exists());
    drop(next);
    std::fs::remove_dir_all(&dir).ok();
}
