//! `/metrics` tells the truth: each test drives streams whose numbers it
//! knows and reads the admin port's `/metrics` as Prometheus would.

use std::io::Write;
use std::time::Duration;

use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

fn metrics(relay: &Relay) -> String {
    http(relay.handle.admin_addr, "GET", "/metrics", None, None).1
}

/// The sum of every series of the family `name` (all label sets).
fn sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// With the token on the request, the relay connects upstream while the
/// client writes its config: a client that then leaves, or whose first
/// message is refused, ends a stream whose upstream had already opened.
/// The live-stream gauges must come back to 0 (they stayed at 1, for
/// good, for every such client: an app killed before its first message,
/// a bad config).
#[test]
fn live_stream_gauges_return_to_zero_when_the_first_message_fails_after_upstream_opened() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let opened = |n: f64| {
        wait_until(LIMIT, || {
            sum(&metrics(&relay), "clio_relay_streams_total") == n
        })
    };

    // A client that leaves before its first message.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev-1"), Via::Header).unwrap();
    assert!(opened(1.0), "upstream never opened: {}", metrics(&relay));
    ws.close(None).unwrap();
    let _ = read_all(&mut ws);
    drop(ws);

    // A client whose first message is not JSON.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev-2"), Via::Header).unwrap();
    assert!(opened(2.0), "upstream never opened: {}", metrics(&relay));
    ws.send(Message::text("{not json,")).unwrap();
    assert_error_frame(&read_all(&mut ws), 400, 1002);

    assert!(
        wait_until(LIMIT, || relay.handle.process.live_streams() == 0),
        "the streams themselves never ended"
    );
    let live = |m: &str| {
        (
            sum(m, "clio_relay_streams_active"),
            series_value(m, "clio_relay_account_streams_active{account=\"acct-a\"}"),
        )
    };
    assert!(
        wait_until(LIMIT, || live(&metrics(&relay)) == (0.0, Some(0.0))),
        "gauges left up: {:?}\n{}",
        live(&metrics(&relay)),
        metrics(&relay)
    );
}

/// `streams_live` counts a client stream from its admission to its end,
/// also while it resumes on a new upstream connection, when
/// `streams_active` (upstream connections open) does not count it:
/// fake-soniox drops the first connection at its third audio frame and
/// answers every upgrade 3 s late, so the resume's reconnect is a gap of
/// 3 s, in which the stream's first connection has opened and closed
/// (`streams_total` 1, `streams_active` 0) and its second has not opened.
#[test]
fn streams_live_counts_a_stream_while_its_resume_reconnects() {
    let fake = fake(&["k1"], |c| {
        c.echo = true;
        c.faults.close_after_frames = Some(3);
        c.faults.handshake_delay = Duration::from_secs(3);
    });
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(3, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    let in_the_gap = |m: &str| {
        sum(m, "clio_relay_streams_total") == 1.0 && sum(m, "clio_relay_streams_active") == 0.0
    };
    let mut seen = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            seen = metrics(&relay);
            in_the_gap(&seen)
        }),
        "never between the two connections: {seen}"
    );
    assert_eq!(
        series_value(&seen, "clio_relay_streams_live"),
        Some(1.0),
        "{seen}"
    );
    // The resume goes through and the stream ends: nothing live.
    ws.send(Message::binary(Vec::new())).unwrap();
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
    assert!(wait_until(LIMIT, || series_value(
        &metrics(&relay),
        "clio_relay_streams_live"
    ) == Some(0.0)));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

/// The dashboard's "live streams" are `/metrics`' `streams_live`: a
/// stream whose resume is reconnecting is live (it holds its
/// `max_streams` slot, and its account's and pool's place, which the
/// dashboard's account and pool rows count). The tile read `/admin/stats`'
/// `streams_active`, upstream connections open, and showed 0 for it, as
/// it did for every stream while an upstream outage had them all
/// reconnecting.
#[test]
fn the_dashboards_live_streams_are_the_metrics_streams_live() {
    const ADMIN: &str = "admin-token-for-tests-0123456789";
    let fake = fake(&["k1"], |c| {
        c.echo = true;
        c.faults.close_after_frames = Some(3);
        c.faults.handshake_delay = Duration::from_secs(3);
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let (_, page) = http(admin, "GET", "/dashboard", None, None);
    let tile = page
        .split("$(\"t-live\").textContent = st.")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("the dashboard sets its live-streams tile from /admin/stats");
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(3, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    // Between the two upstream connections of the resume.
    let mut seen = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            seen = metrics(&relay);
            sum(&seen, "clio_relay_streams_total") == 1.0
                && sum(&seen, "clio_relay_streams_active") == 0.0
        }),
        "never between the two connections: {seen}"
    );
    let (status, stats) = http(admin, "GET", "/admin/stats", Some(ADMIN), None);
    assert_eq!(status, 200, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats[tile].as_f64(),
        series_value(&metrics(&relay), "clio_relay_streams_live"),
        "the tile shows /admin/stats' {tile}: {stats}"
    );
    assert_eq!(stats[tile].as_f64(), Some(1.0), "{stats}");
    ws.send(Message::binary(Vec::new())).unwrap();
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
}

/// An error Soniox sends mid-stream that the relay passes to the client
/// unchanged (no resume left, or not one to resume from) ends the stream:
/// it is counted in `errors_total` like the relay's own, so the error-rate
/// alerts see it. 5xx (and 401, 402, 429) are upstream's, on the account;
/// a 400 or 408 is about the client's request. Before, neither was
/// counted at all, while the usage ledger recorded both.
#[test]
fn soniox_errors_passed_to_the_client_are_counted() {
    for (code, side, on_account) in [(500, "upstream", true), (400, "client", false)] {
        let fake = fake(&["key-a"], |c| {
            c.faults.error_after_frames = Some((5, code))
        });
        let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
        cfg.failover.max_resumes = 0;
        let relay = Relay::start(cfg);
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(5, 1));
        assert_eq!(got.error_code(), Some(u64::from(code)), "{got:?}");
        assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
        let m = metrics(&relay);
        assert_eq!(
            series_value(
                &m,
                &format!("clio_relay_errors_total{{side=\"{side}\",code=\"{code}\"}}")
            ),
            Some(1.0),
            "{code}: {m}"
        );
        assert_eq!(sum(&m, "clio_relay_errors_total"), 1.0, "{code}: {m}");
        let account = series_value(
            &m,
            &format!("clio_relay_account_errors_total{{account=\"acct-a\",code=\"{code}\"}}"),
        );
        assert_eq!(account, on_account.then_some(1.0), "{code}: {m}");
    }
}

/// Every account answered the stream's config with Soniox's 500 (upstream
/// failing, not full): the stream is refused by upstream (503, as a lost
/// connection), not "at the relay's stream limit", and counted so: not
/// `refusals_total{by="relay_limit"}`, not an internal 429.
#[test]
fn accounts_refused_by_upstream_at_open_are_upstreams_refusal() {
    let fake = fake(&["key-a", "key-b"], |c| {
        c.faults.error_after_frames = Some((1, 500))
    });
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a"), ("acct-b", "key-b")]);
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert!(
        !got.messages.iter().any(|m| m["error_message"]
            .as_str()
            .is_some_and(|t| t.contains("relay's stream limit"))),
        "blamed the relay's limits: {got:?}"
    );
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
    let m = metrics(&relay);
    assert_eq!(
        series_value(&m, "clio_relay_refusals_total{by=\"upstream\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        series_value(&m, "clio_relay_refusals_total{by=\"relay_limit\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        series_value(
            &m,
            "clio_relay_errors_total{side=\"internal\",code=\"429\"}"
        ),
        None,
        "{m}"
    );
    assert_eq!(
        series_value(
            &m,
            "clio_relay_errors_total{side=\"upstream\",code=\"500\"}"
        ),
        Some(2.0),
        "{m}"
    );
}

/// A stream that moves on at open because upstream refused its account's
/// upgrade (here 402) is a failover the client never sees, as one refused
/// in upstream's first message is: each move off an account is counted
/// in `failovers_total{phase="open"}` as in `account_retries_total`.
/// Before, only moves after the upgrade were counted: relay-load's
/// "failovers the clients never saw" left these out.
#[test]
fn failovers_at_the_upgrade_are_counted() {
    let fake = fake(&[], |c| {
        c.keys = vec![
            fake_soniox::FakeKey::new("key-bad", 50),
            fake_soniox::FakeKey::new("key-ok", 50),
        ];
        c.keys[0].reject = Some(402);
    });
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("bad", "key-bad"), ("good", "key-ok")],
    ));
    for i in 0..3 {
        let (mut ws, _) =
            connect(relay.addr(), &relay.token(&format!("dev{i}")), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
        assert!(got.finished(), "{got:?}");
    }
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
    let m = metrics(&relay);
    let moved = series_value(&m, "clio_relay_account_retries_total{account=\"bad\"}");
    assert!(moved.is_some_and(|n| n >= 1.0), "{m}");
    assert_eq!(
        series_value(
            &m,
            "clio_relay_account_errors_total{account=\"bad\",code=\"402\"}"
        ),
        moved,
        "{m}"
    );
    assert_eq!(
        series_value(
            &m,
            "clio_relay_failovers_total{phase=\"open\",reason=\"refused\"}"
        ),
        moved,
        "{m}"
    );
}

/// A stream whose only account upstream refuses, at the upgrade or in
/// its first message, is refused: the client sees it, and nothing moved
/// it anywhere. It is no failover the client never saw and no move off
/// the account (`failovers_total`, `account_retries_total`, which
/// relay-load's "failovers the clients never saw" reads). Before, each
/// refusal counted as one whether or not another connection followed,
/// so an upstream refusing every stream showed as failovers hidden from
/// clients that had seen every one of them.
#[test]
fn a_refusal_the_client_sees_is_no_failover() {
    for at_upgrade in [true, false] {
        let fake = fake(&[], |c| {
            c.keys = vec![fake_soniox::FakeKey::new("key-a", 50)];
            if at_upgrade {
                c.keys[0].reject = Some(402);
            } else {
                c.faults.error_after_frames = Some((1, 500));
            }
        });
        let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
        cfg.failover.max_resumes = 0;
        let relay = Relay::start(cfg);
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
        assert!(got.error_code().is_some(), "{got:?}");
        assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
        let m = metrics(&relay);
        assert_eq!(
            series_value(&m, r#"clio_relay_refusals_total{by="upstream"}"#),
            Some(1.0),
            "at_upgrade {at_upgrade}: {m}"
        );
        assert_eq!(
            sum(&m, "clio_relay_failovers_total"),
            0.0,
            "at_upgrade {at_upgrade}: {m}"
        );
        assert_eq!(
            series_value(&m, r#"clio_relay_account_retries_total{account="acct-a"}"#),
            Some(0.0),
            "at_upgrade {at_upgrade}: {m}"
        );
    }
}

/// `refusals_total`'s HELP line lists who may refuse a stream: every `by`
/// value the family has (it left out `pool_limit`).
#[test]
fn the_refusals_help_names_every_by_value() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let m = metrics(&relay);
    let help = m
        .lines()
        .find(|l| l.starts_with("# HELP clio_relay_refusals_total "))
        .expect("a HELP line");
    let values: Vec<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("clio_relay_refusals_total{by=\""))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(values.len(), 9, "{m}");
    for by in values {
        assert!(help.contains(by), "{by} not in: {help}");
    }
}

/// `frames_total` and `bytes_total` count the frames the relay passes on
/// as they came, each with its header: client to upstream, the audio, the
/// end of audio and the client's close. The config message, which the
/// relay rewrites and sends when upstream opens, is not among them.
#[test]
fn frames_and_bytes_count_the_frames_passed_on_with_their_headers() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(3, 1));
    assert!(got.finished(), "{got:?}");
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
    let m = metrics(&relay);
    // Masked client frames: 3,200-byte audio has a 2+2-byte header and a
    // 4-byte mask; the empty end of audio 2+4; the close (1000) 2+4+2.
    let up = (5.0, 3.0 * (3200.0 + 8.0) + 6.0 + 8.0);
    let seen = |m: &str| {
        (
            series_value(
                m,
                "clio_relay_frames_total{direction=\"client_to_upstream\"}",
            ),
            series_value(
                m,
                "clio_relay_bytes_total{direction=\"client_to_upstream\"}",
            ),
        )
    };
    assert_eq!(seen(&m), (Some(up.0), Some(up.1)), "{m}");
    // Every frame counted is one sample of the forwarding summary.
    assert_eq!(
        series_value(
            &m,
            "clio_relay_frame_forward_seconds_count{direction=\"client_to_upstream\"}"
        ),
        Some(5.0),
        "{m}"
    );
}

/// `bytes_total{direction="upstream_to_client"}` counts the bytes the
/// client got, also of the results a resume rewrote onto the client's
/// timeline (their times shifted, so their length changed): the relay
/// writes the rewritten frame, not upstream's. It counted upstream's
/// frame's length for them, and the usage ledger's `bytes_down` with it.
#[test]
fn bytes_to_the_client_count_a_resumes_rewritten_results_as_written() {
    let fake = fake(&["k1"], |c| {
        c.faults.close_after_frames = Some(6);
        c.ms_per_word = 100;
    });
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut tcp, _) = raw_upgrade(relay.addr(), &relay.token("dev"));
    tcp.write_all(&client_frame(1, config_message(None).as_bytes()))
        .unwrap();
    for f in audio_frames(10, 3) {
        tcp.write_all(&client_frame(2, &f)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    tcp.write_all(&client_frame(2, &[])).unwrap();
    let frames = raw_read_frames_until_close(&mut tcp);
    tcp.write_all(&client_frame(8, &[0x03, 0xe8])).unwrap();
    let texts = raw_texts(&frames);
    assert!(texts.iter().any(|t| t["finished"] == true), "{texts:?}");
    // Server frames are unmasked: a 2-byte header, 4 from 126 bytes.
    let got: usize = frames
        .iter()
        .map(|(_, p)| p.len() + if p.len() < 126 { 2 } else { 4 })
        .sum();
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
    let m = metrics(&relay);
    assert_eq!(
        series_value(&m, "clio_relay_streams_resumed_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        series_value(
            &m,
            r#"clio_relay_bytes_total{direction="upstream_to_client"}"#
        ),
        Some(got as f64),
        "{m}"
    );
}

/// An error upstream sends after the stream's first audio (here a 400,
/// passed to the client as it came) is no result: the stream measured
/// no time to a first result, in `first_result_seconds` and its
/// account's histogram (and the slow-first-result alerts), whether the
/// stream is raw audio (resumable) or not. Before, the error's arrival
/// was recorded as the stream's first result.
#[test]
fn an_error_is_not_a_first_result() {
    for format in ["pcm_s16le", "mp3"] {
        let fake = fake(&["key-a"], |c| {
            c.faults.error_after_frames = Some((2, 400));
        });
        let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = format.into();
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(3, 1));
        assert_eq!(got.error_code(), Some(400), "{format}: {got:?}");
        assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
        let m = metrics(&relay);
        assert_eq!(
            series_value(&m, "clio_relay_first_result_seconds_count"),
            Some(0.0),
            "{format}: {m}"
        );
        assert_eq!(
            series_value(
                &m,
                r#"clio_relay_account_first_result_seconds_count{account="acct-a"}"#
            ),
            Some(0.0),
            "{format}: {m}"
        );
    }
}

/// The account ids the per-account series of a scrape name.
fn account_labels(metrics: &str) -> std::collections::BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("clio_relay_account_"))
        .filter_map(|l| {
            let rest = &l[l.find("account=\"")? + "account=\"".len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

/// Accounts added and removed through the admin API, each under an id of
/// its own, leave no series behind once they are gone and their streams
/// have ended. Before, every id ever added kept its per-account series
/// (14 of them, and their counters on every shard) for the life of the
/// process: an operator or a script adding and removing accounts grew
/// every scrape, and the relay's memory, without bound. A removed
/// account's series stay while a stream still runs on it, and count it.
#[test]
fn removed_accounts_leave_no_series_behind() {
    const ADMIN: &str = "admin-token-for-tests-0123456789";
    let fake = fake(&["key-a", "key-x"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let call = |method: &str, path: &str, body: Option<String>| {
        let (status, answer) = http(admin, method, path, Some(ADMIN), body.as_deref());
        assert_eq!(status, 200, "{method} {path}: {answer}");
    };
    let add = |id: &str| {
        let body = serde_json::json!({"id": id, "key": "key-x"}).to_string();
        call("POST", "/admin/accounts", Some(body));
    };

    // A stream on an account that is then removed: its series stay, and
    // count the stream to its end.
    add("acct-live");
    call("POST", "/admin/accounts/acct-a/disable", None);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev-1"), Via::Header).unwrap();
    let live = r#"clio_relay_account_streams_active{account="acct-live"}"#;
    assert!(
        wait_until(LIMIT, || series_value(&metrics(&relay), live) == Some(1.0)),
        "the stream never opened on acct-live: {}",
        metrics(&relay)
    );
    call("POST", "/admin/accounts/acct-a/enable", None);
    call("DELETE", "/admin/accounts/acct-live", None);
    for i in 0..20 {
        add(&format!("acct-tmp-{i}"));
        call("DELETE", &format!("/admin/accounts/acct-tmp-{i}"), None);
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        series_value(&metrics(&relay), live),
        Some(1.0),
        "a removed account's live stream is no longer counted: {}",
        metrics(&relay)
    );
    let r = stream_session(&mut ws, &config_message(None), &audio_frames(3, 1));
    assert!(r.finished(), "{}", r.text());
    drop(ws);

    let only_a = std::collections::BTreeSet::from(["acct-a".to_string()]);
    assert!(
        wait_until(LIMIT, || account_labels(&metrics(&relay)) == only_a),
        "removed accounts' series stay: {:?}",
        account_labels(&metrics(&relay))
    );
}

/// Every metric family a scrape holds is documented in README.md, by
/// its full name or, in "Admin port and metrics", by the name after
/// `clio_relay_` (a summary's `_max` gauge under its summary's name).
#[test]
fn every_family_in_a_scrape_is_in_the_readme() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let scrape = metrics(&relay);
    let families: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    assert!(families.len() > 40, "{scrape}");
    let documented = |name: &str| {
        let short = name.trim_start_matches("clio_relay_");
        let named = |n: &str| {
            readme.contains(&format!("`{n}`"))
                || readme.contains(&format!("`{n}{{"))
                || readme.contains(&format!("`{n}` "))
        };
        let base = name.strip_suffix("_max");
        named(name)
            || named(short)
            || base.is_some_and(|b| named(b) || named(b.trim_start_matches("clio_relay_")))
    };
    let missing: Vec<&&str> = families.iter().filter(|f| !documented(f)).collect();
    assert!(missing.is_empty(), "not in README.md: {missing:?}");
}

/// `first_result_seconds` is timed from a stream's first audio (as
/// README says, and as the per-account histogram's HELP says); its HELP
/// said "from stream start", which a stream that waits before its audio
/// would make a different figure.
#[test]
fn first_result_seconds_help_says_it_starts_at_the_first_audio() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let scrape = metrics(&relay);
    let help = |name: &str| {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# HELP {name} ")))
            .map(str::to_string)
    };
    assert_eq!(
        help("clio_relay_first_result_seconds").as_deref(),
        Some("Time from a stream's first audio to its first upstream result."),
    );
    assert_eq!(
        help("clio_relay_account_first_result_seconds").as_deref(),
        Some("Time from a stream's first audio to its first upstream result, per account."),
    );
}

/// A keepalive is not audio, and the `finished` that answers an end of
/// audio is not a result: a stream that sends only keepalives (a client
/// holding its connection between utterances, relay-load's `--idle`)
/// measures no time to a first result. Before, its first keepalive
/// started the clock and upstream's `finished` stopped it, so each idle
/// stream added a sample as long as its hold to `first_result_seconds`
/// and its account's histogram (and to the `slow_first_result` alert's
/// p99), beside the streams that did send audio.
#[test]
fn keepalives_and_the_end_of_audio_are_not_a_first_result() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let (mut idle, _) = connect(relay.addr(), &relay.token("idle"), Via::Header).unwrap();
    idle.send(Message::text(config_message(None))).unwrap();
    let got = stream_session(&mut idle, r#"{"type":"keepalive"}"#, &[]);
    assert!(got.finished(), "{got:?}");
    let (mut speaking, _) = connect(relay.addr(), &relay.token("speaking"), Via::Header).unwrap();
    let got = stream_session(&mut speaking, &config_message(None), &audio_frames(2, 7));
    assert!(got.finished(), "{got:?}");
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
    let m = metrics(&relay);
    assert_eq!(
        series_value(&m, "clio_relay_first_result_seconds_count"),
        Some(1.0),
        "only the stream with audio has a first result: {m}"
    );
    assert_eq!(
        series_value(
            &m,
            r#"clio_relay_account_first_result_seconds_count{account="acct-a"}"#
        ),
        Some(1.0),
        "{m}"
    );
}
