//! Usage and cost figures against what upstream (fake-soniox) saw and
//! what the client sent: the ledger's per-account and per-device audio,
//! its streams and its cost, in the ways real streams end.

use std::io::Write;
use std::time::Duration;

use fake_soniox::FaultKind;
use serde_json::Value;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(20);
const ADMIN: &str = "usage-admin-token-0123456789";

/// `/admin/usage` rows of `group` by key, once `want` rows are there.
fn usage_rows(relay: &Relay, group: &str, want: usize) -> serde_json::Map<String, Value> {
    let mut rows = serde_json::Map::new();
    let ok = wait_until(LIMIT, || {
        rows = ledger_rows(relay.handle.admin_addr, group);
        rows.len() >= want
    });
    assert!(ok, "{rows:?}");
    rows
}

#[test]
fn a_stream_resumed_on_another_account_bills_each_account_its_audio() {
    // Two accounts at different prices. The first connection is refused
    // (401) at its sixth audio frame, after upstream accepted the stream:
    // its account is marked and the resume takes the other. Each account
    // must carry the audio its own connection was sent, less what the
    // resume replayed, at its own price; the stream counts once.
    let faults = only_first_connection_fails(FaultKind::Error(401), 6, |n| n == 6);
    let fake = fake(&["k1", "k2"], |c| c.faults.random = Some(faults));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]);
    cfg.accounts[0].price_per_hour = 3.6;
    cfg.accounts[1].price_per_hour = 36.0;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    // 20 frames of 100 ms.
    let frames = audio_frames(20, 3);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
    let sessions = fake.sessions();
    let first = &sessions[0];
    let second = &sessions[1];
    assert_ne!(first.key, second.key, "the resume took the other account");
    let account_of = |key: &Option<String>| match key.as_deref() {
        Some("k1") => "a",
        Some("k2") => "b",
        k => panic!("{k:?}"),
    };
    // What each upstream connection processed, by upstream's own count.
    let (first_ms, second_ms) = (first.audio_ms, second.audio_ms);
    let rows = usage_rows(&relay, "account", 2);
    let ms = |a: &str| (rows[a]["audio_seconds"].as_f64().unwrap() * 1000.0).round() as u64;
    let first_account = account_of(&first.key);
    let second_account = account_of(&second.key);
    let context = format!(
        "first connection {first_ms} ms on {first_account}, second {second_ms} ms on \
         {second_account}: {rows:?}"
    );
    // The first account carries what its connection reported processing
    // (its last result's total: the fake reports one per 100 ms frame,
    // and the frame it failed at got an error, no result), the second the
    // rest of the audio; the audio sent counts once.
    assert_eq!(ms(first_account), first_ms - 100, "{context}");
    assert_eq!(ms(first_account) + ms(second_account), 2000, "{context}");
    // The second account's connection processed the replay again: the
    // ledger is below its bill by less than what was replayed.
    assert!(ms(second_account) <= second_ms, "{context}");
    let streams: u64 = rows.values().map(|r| r["streams"].as_u64().unwrap()).sum();
    assert_eq!(streams, 1, "one stream: {context}");
    assert_eq!(rows[second_account]["streams"], 1, "{context}");
    let seconds = |a: &str| rows[a]["audio_seconds"].as_f64().unwrap();
    let price = |a: &str| if a == "a" { 3.6 } else { 36.0 };
    for a in [first_account, second_account] {
        let cost = rows[a]["cost"].as_f64().unwrap();
        let want = seconds(a) / 3600.0 * price(a);
        assert!((cost - want).abs() < 1e-9, "{a}: cost {cost}, want {want}");
    }
    let devices = usage_rows(&relay, "device", 1);
    assert_eq!(devices["dev"]["streams"], 1, "{devices:?}");
    assert_eq!(devices["dev"]["audio_seconds"], 2.0, "{devices:?}");
}

/// How a probed stream ends after its paced frames.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    /// The client's TCP connection goes, with no close frame.
    Vanishes,
    /// The client goes quiet; `limits.idle_timeout` (1 s) ends it.
    Idle,
    /// The relay drains.
    Drain,
    /// The device is revoked with `end_live_streams`.
    Revoked,
    /// Upstream ends it with a 400 at the frame after the paced ones (not
    /// a failure a resume hides).
    UpstreamError,
    /// The device's daily allowance (1 s) ends it.
    Allowance,
    /// The client ends its audio and upstream says `finished`.
    Finished,
}

/// A config message for `format` (a raw one at 16 kHz mono, or a
/// compressed one, which the fake counts at 16,000 bytes a second).
fn config_for(format: &str) -> String {
    let mut v: Value = serde_json::from_str(&config_message(None)).unwrap();
    v["audio_format"] = format.into();
    if format != "pcm_s16le" {
        v.as_object_mut().unwrap().remove("sample_rate");
        v.as_object_mut().unwrap().remove("num_channels");
    }
    v.to_string()
}

/// One stream of `format` that sends `paced` frames of 3,200 bytes, each
/// answered before the next goes, then ends as `ending` says. Returns
/// (the ledger's audio ms for the device, its streams, what fake-soniox
/// counted on the stream's connection).
fn probe(format: &str, paced: usize, ending: Ending) -> (u64, u64, u64) {
    let fake = fake(&["k1"], |c| {
        // A result for every frame: each is answered before the next goes.
        c.ms_per_word = 100;
        if ending == Ending::UpstreamError {
            c.faults.error_after_frames = Some((paced as u64 + 1, 400));
        }
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    if ending == Ending::Idle {
        cfg.limits.idle_timeout = Duration::from_secs(1);
    }
    if ending == Ending::Allowance {
        cfg.devices.default.audio_seconds_per_day = 1;
    }
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(tungstenite::Message::text(config_for(format)))
        .unwrap();
    let frames = audio_frames(paced + 1, 5);
    for f in &frames[..paced] {
        ws.send(tungstenite::Message::binary(f.clone())).unwrap();
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => assert!(!t.contains("error_code"), "{format}: {t}"),
            other => panic!("{format}: {other:?}"),
        }
    }
    match ending {
        Ending::Vanishes => drop(ws),
        Ending::Idle => {
            read_all(&mut ws);
        }
        Ending::Drain => {
            assert_eq!(relay.handle.drain(Duration::from_secs(2)), 1);
            read_all(&mut ws);
        }
        Ending::Revoked => {
            let (status, body) = http(
                relay.handle.admin_addr,
                "POST",
                "/admin/revocations",
                Some(ADMIN),
                Some(r#"{"device_id":"dev","end_live_streams":true}"#),
            );
            assert_eq!(status, 200, "{body}");
            let got = read_all(&mut ws);
            assert_eq!(got.error_code(), Some(401), "{got:?}");
        }
        Ending::Allowance => {
            // On, paced, until the relay ends the stream.
            let mut ended = false;
            for f in audio_frames(30, 6) {
                if ws.send(tungstenite::Message::binary(f)).is_err() {
                    ended = true;
                    break;
                }
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) if !t.contains("error_code") => {}
                    _ => {
                        ended = true;
                        break;
                    }
                }
            }
            assert!(ended, "{format}: the allowance never ended the stream");
            read_all(&mut ws);
        }
        Ending::UpstreamError => {
            let _ = ws.send(tungstenite::Message::binary(frames[paced].clone()));
            let got = read_all(&mut ws);
            assert!(got.error_code().is_some(), "{got:?}");
        }
        Ending::Finished => {
            ws.send(tungstenite::Message::binary(Vec::<u8>::new()))
                .unwrap();
            let got = read_all(&mut ws);
            assert!(got.finished(), "{got:?}");
        }
    }
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert!(relay.wait_idle(LIMIT));
    let rows = usage_rows(&relay, "device", 1);
    let row = &rows["dev"];
    let ms = (row["audio_seconds"].as_f64().unwrap() * 1000.0).round() as u64;
    let accounts = usage_rows(&relay, "account", 1);
    assert_eq!(accounts["a"]["audio_seconds"], row["audio_seconds"]);
    (
        ms,
        row["streams"].as_u64().unwrap(),
        fake.sessions()[0].audio_ms,
    )
}

/// Each ending, for a raw and a compressed stream: the ledger has the
/// audio fake-soniox processed, and one stream.
fn probe_both(ending: Ending) {
    for (format, frame_ms) in [("pcm_s16le", 100), ("ogg", 200)] {
        let (ledger, streams, fake_ms) = probe(format, 8, ending);
        // A compressed stream is counted by upstream's figure: an error
        // carries none (the frame it answered is not counted), and a stream
        // the allowance ends is ended at the frame that passes it, before
        // upstream reports on that frame.
        let lost = if format == "ogg" && matches!(ending, Ending::UpstreamError | Ending::Allowance)
        {
            frame_ms
        } else {
            0
        };
        assert_eq!(
            (ledger, streams),
            (fake_ms - lost, 1),
            "{format} {ending:?}: ledger {ledger} ms, fake-soniox {fake_ms} ms"
        );
        assert!(fake_ms >= 8 * frame_ms, "{format} {ending:?}: {fake_ms}");
    }
}

#[test]
fn a_stream_that_finishes_is_billed_what_upstream_processed() {
    probe_both(Ending::Finished);
}

#[test]
fn a_client_that_vanishes_is_billed_what_upstream_processed() {
    probe_both(Ending::Vanishes);
}

#[test]
fn an_idle_stream_is_billed_what_upstream_processed() {
    probe_both(Ending::Idle);
}

#[test]
fn a_drained_stream_is_billed_what_upstream_processed() {
    probe_both(Ending::Drain);
}

#[test]
fn a_revoked_stream_is_billed_what_upstream_processed() {
    probe_both(Ending::Revoked);
}

#[test]
fn an_upstream_error_is_billed_what_upstream_processed() {
    probe_both(Ending::UpstreamError);
}

#[test]
fn a_stream_past_its_allowance_is_billed_what_upstream_processed() {
    probe_both(Ending::Allowance);
}

#[test]
fn cost_is_the_audio_hours_times_the_price_rounded_once() {
    // 1.5 s at 36 an hour is 0.015 exactly: the figure an operator reads
    // in /admin/usage, by pool, and in /metrics is that, not a value a
    // rounding off it (0.015000000000000001).
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].price_per_hour = 36.0;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(15, 1));
    assert!(got.finished(), "{got:?}");
    let rows = usage_rows(&relay, "account", 1);
    assert_eq!(rows["a"]["audio_seconds"], 1.5, "{rows:?}");
    assert_eq!(rows["a"]["cost"], 0.015, "{rows:?}");
    let pools = usage_rows(&relay, "pool", 1);
    let pool = pools.values().next().unwrap();
    assert_eq!(pool["cost"], 0.015, "{pools:?}");
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    let line = metrics
        .lines()
        .find(|l| l.starts_with("clio_relay_cost_month{account=\"a\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(line.ends_with(" 0.015"), "{line}");
}

#[test]
fn a_pools_cost_is_its_accounts_audio_priced_and_rounded_once() {
    // Two accounts of one pool: 10 s and 20 s at 36 an hour are 0.1 and
    // 0.2. The pool's row summed the two rounded costs, 0.1 + 0.2 =
    // 0.30000000000000004; priced as one sum it is 0.3.
    let fake = fake(&["k1", "k2"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]);
    cfg.accounts[0].price_per_hour = 36.0;
    cfg.accounts[1].price_per_hour = 36.0;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let call = |path: &str| {
        let (status, body) = http(admin, "POST", path, Some(ADMIN), None);
        assert_eq!(status, 200, "{path}: {body}");
    };
    // Each account in turn takes the streams: the other is disabled.
    for (account, other, frames) in [("a", "b", 100), ("b", "a", 200)] {
        call(&format!("/admin/accounts/{account}/enable"));
        call(&format!("/admin/accounts/{other}/disable"));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(frames, 1));
        assert!(got.finished(), "{got:?}");
    }
    let rows = usage_rows(&relay, "account", 2);
    assert_eq!(rows["a"]["cost"], 0.1, "{rows:?}");
    assert_eq!(rows["b"]["cost"], 0.2, "{rows:?}");
    let pools = usage_rows(&relay, "pool", 1);
    let pool = pools.values().next().unwrap();
    assert_eq!(pool["audio_seconds"], 30.0, "{pools:?}");
    assert_eq!(pool["cost"], 0.3, "{pools:?}");
}

/// `clio-relay run` on `cfg`, its admin token [`ADMIN`]: the process and
/// its client and admin addresses, from the line that says it listens
/// (the rest of its log is read and dropped, so it never blocks on it).
fn run_binary(cfg: &std::path::Path, secret: &str) -> (std::process::Child, Addrs) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("USAGE_CUT_SECRET", secret)
        .env("USAGE_CUT_KEY", "k1")
        .env("USAGE_CUT_ADMIN", ADMIN)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("clio-relay listening"))
        .expect("the relay logs its addresses");
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    let addrs = Addrs {
        client: listening_addr(&listening, "client"),
        admin: listening_addr(&listening, "admin"),
    };
    (child, addrs)
}

/// A relay's client and admin addresses.
struct Addrs {
    client: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

/// A stream of `format` for `device`, its `frames` (3,200 bytes each)
/// each answered before the next goes, left open.
fn open_stream(relay: std::net::SocketAddr, token: &str, format: &str, frames: usize) -> Ws {
    let (mut ws, _) = connect(relay, token, Via::Header).unwrap();
    ws.send(tungstenite::Message::text(config_for(format)))
        .unwrap();
    for f in audio_frames(frames, 7) {
        ws.send(tungstenite::Message::binary(f)).unwrap();
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => assert!(!t.contains("error_code"), "{format}: {t}"),
            other => panic!("{format}: {other:?}"),
        }
    }
    ws
}

/// The token secret of [`stop_config`]'s relay.
const STOP_SECRET: &str = "ssssssssssssssssssssssssssssssssssssssss";

/// A state directory and in it the config file of a relay for the stop's
/// tests ([`run_binary`]): two shards, upstream at `upstream`, nothing
/// that ends a stream or saves the ledger on its own (an hour's drain,
/// idle timeout and persist interval).
fn stop_config(upstream: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 2\n\
             [upstream]\nurl = \"{}\"\n[tokens]\nsecret_env = \"USAGE_CUT_SECRET\"\n\
             [limits]\ndrain_timeout = \"1h\"\nidle_timeout = \"1h\"\n\
             [usage]\npersist_interval = \"1h\"\n\
             [admin]\ntoken_env = \"USAGE_CUT_ADMIN\"\nstate_dir = \"{}\"\nhealth_interval = \"0s\"\n\
             [[account]]\nid = \"a\"\nkey_env = \"USAGE_CUT_KEY\"\n",
            upstream,
            dir.join("state").display()
        ),
    )
    .unwrap();
    (dir, cfg)
}

/// A session token for `device`, signed with [`STOP_SECRET`].
fn stop_token(device: &str) -> String {
    let keys = clio_relay::core::token::TokenKeys::from_config(
        &clio_relay::core::config::TokensConfig::new(clio_relay::core::secret::Secret::new(
            STOP_SECRET,
        )),
    );
    keys.mint(
        device,
        Duration::from_secs(600),
        std::time::SystemTime::now(),
    )
    .unwrap()
}

/// `/admin/usage?group_by=group` of the relay at `admin`, its rows by key.
fn ledger_rows(admin: std::net::SocketAddr, group: &str) -> serde_json::Map<String, Value> {
    let (status, body) = http(
        admin,
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

/// SIGINT (or SIGINT during a drain, which stops it at once as well)
/// ends the live streams (Soniox's 503 "reconnect", close 1012, no
/// finalize); their usage so far is in the ledger after the restart: per
/// device and account, the audio upstream processed (raw audio by the
/// relay's meter, which matched upstream's count; compressed by
/// upstream's last `total_audio_proc_ms`), the bytes, each stream once,
/// with the 503 a drain's cut stream has. Before, the stop saved the
/// ledger without them: they were lost as at a crash.
fn sigint_records_live_streams(during_drain: bool) {
    // Nothing ends the streams on their own: only the stop.
    let fake = fake(&["k1"], |c| {
        // A result for every frame.
        c.ms_per_word = 100;
        c.idle_timeout = Duration::from_secs(3600);
    });
    let (dir, cfg) = stop_config(&fake.url());
    let secret = STOP_SECRET;
    let token = stop_token;
    let (mut child, addrs) = run_binary(&cfg, secret);
    // 8 frames of 100 ms raw, 6 of 200 ms compressed (as the fake counts
    // them), a stream each, both left open.
    let mut raw = open_stream(addrs.client, &token("raw"), "pcm_s16le", 8);
    let mut ogg = open_stream(addrs.client, &token("ogg"), "ogg", 6);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if during_drain {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let draining = wait_until(LIMIT, || http_get(addrs.admin, "/healthz", "").0 == 503);
        assert!(draining, "SIGTERM began no drain");
    }
    sigint_and_reap(&mut child, "SIGINT did not stop the relay");
    // What each client got (checked last, after the ledger).
    let told = [read_all(&mut raw), read_all(&mut ogg)];
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    // What upstream processed of each: every frame sent.
    let mut fake_ms: Vec<u64> = fake.sessions().iter().map(|s| s.audio_ms).collect();
    fake_ms.sort();
    assert_eq!(fake_ms, [800, 1200]);

    // The ledger, as the next start reads it.
    let (mut child, addrs) = run_binary(&cfg, secret);
    let devices = ledger_rows(addrs.admin, "device");
    let accounts = ledger_rows(addrs.admin, "account");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let context = format!("devices {devices:?}, accounts {accounts:?}");
    for (device, secs) in [("raw", 0.8), ("ogg", 1.2)] {
        let row = devices
            .get(device)
            .unwrap_or_else(|| panic!("{device}: {context}"));
        assert_eq!(row["streams"], 1, "{device}: {context}");
        assert_eq!(row["audio_seconds"], secs, "{device}: {context}");
        assert_eq!(row["errors"]["503"], 1, "{device}: {context}");
        assert!(
            row["bytes_up"].as_u64().unwrap() > 3_200 * 6,
            "{device}: {context}"
        );
        assert!(
            row["bytes_down"].as_u64().unwrap() > 0,
            "{device}: {context}"
        );
    }
    assert_eq!(accounts["a"]["streams"], 2, "{context}");
    assert_eq!(accounts["a"]["audio_seconds"], 2.0, "{context}");
    // Each ended through its own end, unfinalized: told to reconnect.
    for got in told {
        assert_eq!(got.error_code(), Some(503), "{got:?}");
        assert_eq!(got.close_code(), Some(1012), "{got:?}");
    }
}

#[test]
fn sigint_records_the_usage_of_the_streams_it_cuts() {
    sigint_records_live_streams(false);
}

#[test]
fn sigint_during_a_drain_records_the_usage_of_the_streams_it_cuts() {
    sigint_records_live_streams(true);
}

/// A stream whose upstream said `finished` and closed, and whose client
/// has not answered the close when SIGINT comes: its end waits up to 2 s
/// for the reply, to carry it up. The stop does not wait for the reply
/// but for the stream's usage (at most `STOP_CUT_WAIT`, 3 s), so the wait
/// gives up when the stop comes and the stream records its usage at
/// once; the ledger has its audio after a restart. Before, the stop
/// waited out the reply's wait, with only a second to spare, which a
/// loaded host can take; then the usage was lost as at a crash.
#[test]
fn sigint_records_a_stream_whose_client_does_not_answer_the_close() {
    let fake = fake(&["k1"], |_| {});
    let (dir, cfg) = stop_config(&fake.url());
    let (mut child, addrs) = run_binary(&cfg, STOP_SECRET);
    let auth = format!("Authorization: Bearer {}\r\n", stop_token("mute"));
    let mut client = upgraded_raw_client(addrs.client, &auth);
    let mut sent = client_frame(1, config_for("pcm_s16le").as_bytes());
    for f in audio_frames(8, 7) {
        sent.extend(client_frame(2, &f));
    }
    // The end of audio: upstream answers `finished`, then closes.
    sent.extend(client_frame(2, &[]));
    client.write_all(&sent).unwrap();
    // Upstream's close reaches the client, which does not answer it: the
    // stream's end is waiting for the reply.
    let frames = raw_read_frames_until_close(&mut client);
    assert_eq!(frames.last().map(|f| f.0), Some(8), "{frames:?}");
    let texts = raw_texts(&frames);
    assert!(texts.iter().any(|t| t["finished"] == true), "{frames:?}");
    sigint_and_reap(&mut child, "SIGINT did not stop the relay");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].finished_sent));
    assert_eq!(fake.sessions()[0].audio_ms, 800);
    drop(client);

    // The ledger, as the next start reads it.
    let (mut child, addrs) = run_binary(&cfg, STOP_SECRET);
    let devices = ledger_rows(addrs.admin, "device");
    sigint_and_reap(&mut child, "SIGINT did not stop the second relay");
    std::fs::remove_dir_all(&dir).ok();
    let row = devices
        .get("mute")
        .unwrap_or_else(|| panic!("the stream is not in the ledger: {devices:?}"));
    assert_eq!(row["streams"], 1, "{devices:?}");
    assert_eq!(row["audio_seconds"], 0.8, "{devices:?}");
    assert!(
        row["errors"].as_object().is_none_or(|e| e.is_empty()),
        "{devices:?}"
    );
}

/// A drain whose wait runs out cuts the streams still live, as SIGINT
/// does: here one caught in a mid-stream resume whose new upstream
/// connection never answers (it sees no drain until it is moving again).
/// The drain gives up on it after `limits.finalize_wait` and 5 s; the
/// stop records what it carried, and the ledger has it after a restart.
/// Before, it was lost as at a crash.
#[test]
fn a_stream_a_timed_out_drain_cuts_is_in_the_ledger() {
    let faults = only_first_connection_fails(FaultKind::Drop, 4, |n| n == 4);
    let fake = fake(&["k1"], |c| {
        c.ms_per_word = 100;
        c.faults.random = Some(faults);
    });
    // The first upstream connection goes through to the fake; the
    // others are accepted and never answered.
    let (url, held) = door_with(
        &fake.url(),
        |n| if n == 0 { Entry::Pipe } else { Entry::Hold },
    );
    let mut cfg = relay_config(&url, &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    cfg.upstream.connect_timeout = Duration::from_secs(120);
    cfg.limits.finalize_wait = Duration::from_millis(100);
    cfg.usage.persist_interval = Duration::from_secs(3600);
    let relay = Relay::start(cfg.clone());
    // The fourth frame drops the connection: the stream resumes, on a
    // connection that hangs. The client stays connected to the end.
    let _ws = three_answered_then_a_fourth(&relay);
    assert!(wait_until(LIMIT, || !held.lock().unwrap().is_empty()));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    let processed = fake.sessions()[0].audio_ms;
    assert_eq!(
        relay.handle.drain(Duration::ZERO),
        1,
        "the drain cut the stream"
    );
    relay.handle.shutdown();
    let relay = Relay::start(cfg.clone());
    let rows = usage_rows(&relay, "device", 1);
    let row = &rows["dev"];
    assert_eq!(row["streams"], 1, "{rows:?}");
    assert_eq!(row["errors"]["503"], 1, "{rows:?}");
    // The relay's meter, as for any stream that ends without upstream's
    // `finished`: the audio that went up, the frame the drop came at too.
    let ms = (row["audio_seconds"].as_f64().unwrap() * 1000.0).round() as u64;
    assert!(
        (processed..=400).contains(&ms),
        "{ms} ms, fake-soniox {processed}: {rows:?}"
    );
    assert!(row["bytes_up"].as_u64().unwrap() >= 4 * 3_200, "{rows:?}");
    drop(relay);
    std::fs::remove_dir_all(&cfg.admin.state_dir).ok();
}

/// A stream of device "dev" on `relay`: its config, three audio frames
/// each answered, then a fourth sent.
fn three_answered_then_a_fourth(relay: &Relay) -> Ws {
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(tungstenite::Message::text(config_message(None)))
        .unwrap();
    let frames = audio_frames(4, 3);
    for f in &frames[..3] {
        ws.send(tungstenite::Message::binary(f.clone())).unwrap();
        assert!(ws.read().unwrap().is_text());
    }
    ws.send(tungstenite::Message::binary(frames[3].clone()))
        .unwrap();
    ws
}

/// A stream waiting for a drain's finalize when SIGINT stops the relay
/// (here upstream stopped reading, so no `<fin>` comes within the
/// minute's `limits.finalize_wait`): the stop ends the wait, the client
/// is told to reconnect, and the ledger has the stream after a restart.
/// Before, the stop left it finalizing and saved the ledger without it.
#[test]
fn a_stream_finalizing_at_a_sigint_is_in_the_ledger() {
    let fake = fake(&["k1"], |c| {
        c.ms_per_word = 100;
        // Frame 4 is read, never answered; nothing after it is read.
        c.faults.stall_after_frames = Some(4);
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    cfg.limits.finalize_wait = Duration::from_secs(60);
    cfg.usage.persist_interval = Duration::from_secs(3600);
    let relay = Relay::start(cfg.clone());
    let mut ws = three_answered_then_a_fourth(&relay);
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 4));
    let handle = &relay.handle;
    std::thread::scope(|s| {
        let drain = s.spawn(|| handle.drain(Duration::ZERO));
        // The finalize went up (the fake holds it unread, or read it and
        // stopped): the stream waits for its answer.
        assert!(wait_until(LIMIT, || handle.process.finalizing()));
        std::thread::sleep(Duration::from_millis(300));
        // SIGINT during the drain, as `clio-relay run` takes it.
        handle.process.stop_now();
        assert_eq!(drain.join().unwrap(), 1, "the stream was live");
    });
    relay.handle.shutdown();
    let got = read_all(&mut ws);
    let relay = Relay::start(cfg.clone());
    let rows = usage_rows(&relay, "device", 1);
    let row = &rows["dev"];
    assert_eq!(row["streams"], 1, "{rows:?}");
    assert_eq!(row["errors"]["503"], 1, "{rows:?}");
    assert!(row["bytes_up"].as_u64().unwrap() >= 4 * 3_200, "{rows:?}");
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert_eq!(got.close_code(), Some(1012), "{got:?}");
    drop(relay);
    std::fs::remove_dir_all(&cfg.admin.state_dir).ok();
}

/// `/admin/usage` of a ledger with more devices than one answer holds
/// comes in pages of keys in order: 25,000 stored devices over two days
/// (some with errors) and one live stream's device still in memory, read
/// with the default page (1,000 rows) and `after=` each `next`, give
/// every device once, its days merged, and the live one in its place; a
/// short page starts after the key asked. Before, the whole ledger was
/// read and answered at once (a million device-days: a 166 MB answer, the
/// admin thread busy for seconds, /healthz unanswered meanwhile).
#[test]
fn device_usage_comes_in_pages_of_keys_in_order() {
    const STORED: usize = 25_000;
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let db = cfg.admin.state_dir.join("usage.db");
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    // Two days before today, written beside the running relay as another
    // SQLite writer would (the relay writes only at its persists).
    let today = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400) as i64;
    // The relay makes the database, and then its tables, as it starts
    // its admin side: looked at read-only, so this never makes the file.
    let has_tables = || {
        db.exists()
            && rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .and_then(|c| {
                c.query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name IN ('totals', 'errors')",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .is_ok_and(|n| n == 2)
    };
    assert!(
        wait_until(LIMIT, has_tables),
        "no tables in {}",
        db.display()
    );
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let tx = conn.transaction().unwrap();
        for day in [today - 2, today - 1] {
            // Each stream's day has its account's row too.
            tx.execute(
                "INSERT INTO totals VALUES (0, ?1, 'a', ?2, ?3, ?3, 1, 1)",
                rusqlite::params![day, STORED as i64, 1000 * STORED as i64],
            )
            .unwrap();
            for i in 0..STORED {
                tx.execute(
                    "INSERT INTO totals VALUES (1, ?1, ?2, 1, 1000, 1000, 100, 10)",
                    rusqlite::params![day, format!("dev-{i:05}")],
                )
                .unwrap();
                if i % 1000 == 7 && day == today - 1 {
                    tx.execute(
                        "INSERT INTO errors VALUES (1, ?1, ?2, 503, 1)",
                        rusqlite::params![day, format!("dev-{i:05}")],
                    )
                    .unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }
    // One device streams today: it sorts between dev-12345 and dev-12346.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev-12345-live"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(5, 1));
    assert!(got.finished(), "{got:?}");

    let get = |query: &str| -> (u16, Value) {
        let (status, body) = http(
            admin,
            "GET",
            &format!("/admin/usage?{query}"),
            Some(ADMIN),
            None,
        );
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    };
    let range = "group_by=device&from=1970-01-01&to=9999-12-31";
    let mut keys = Vec::new();
    let mut pages = Vec::new();
    let mut after = String::new();
    loop {
        let (status, v) = get(&format!("{range}&after={after}"));
        assert_eq!(status, 200, "{v}");
        let rows = v["rows"].as_array().unwrap();
        pages.push(rows.len());
        for r in rows {
            let key = r["key"].as_str().unwrap().to_string();
            if key == "dev-12345-live" {
                assert_eq!(r["streams"], 1, "{r}");
                assert_eq!(r["audio_seconds"], 0.5, "{r}");
            } else {
                assert_eq!(r["streams"], 2, "{r}");
                assert_eq!(r["audio_seconds"], 2.0, "{r}");
                let n: usize = key[4..].parse().unwrap();
                let errors = if n % 1000 == 7 {
                    serde_json::json!({"503": 1})
                } else {
                    serde_json::json!({})
                };
                assert_eq!(r["errors"], errors, "{r}");
            }
            keys.push(key);
        }
        match v["next"].as_str() {
            Some(next) => {
                assert_eq!(Some(next), keys.last().map(String::as_str));
                after = next.to_string();
            }
            None => break,
        }
        assert!(pages.len() < 40, "pages without end: {pages:?}");
    }
    let mut want_pages = vec![1_000; 25];
    want_pages.push(1);
    assert_eq!(pages, want_pages);
    let mut want: Vec<String> = (0..STORED).map(|i| format!("dev-{i:05}")).collect();
    want.push("dev-12345-live".into());
    want.sort();
    assert!(
        keys == want,
        "the pages' keys are not every device once, in order"
    );

    let (status, v) = get(&format!("{range}&limit=3&after=dev-12345"));
    assert_eq!(status, 200, "{v}");
    let short: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(short, ["dev-12345-live", "dev-12346", "dev-12347"]);
    assert_eq!(v["next"], "dev-12347");

    for bad in [
        "limit=0",
        "limit=10001",
        "limit=x",
        "group_by=pool&limit=5",
        "group_by=pool&after=a",
    ] {
        let (status, v) = get(bad);
        assert_eq!(status, 400, "{bad}: {v}");
    }
    ws.close(None).ok();
}
