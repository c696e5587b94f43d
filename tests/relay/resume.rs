//! Mid-stream resume: a raw-audio stream whose upstream connection fails
//! (dropped, 503, 500, a protocol violation) goes on, on a new connection,
//! with one continuous transcript.

use std::time::Duration;

use fake_soniox::{transcript_of, FakeConfig, FakeKey, FakeSoniox, FaultKind, RandomFaults};
use serde_json::Value;
use tungstenite::Message;

use crate::sockets::*;
use crate::util::*;

const LIMIT: Duration = Duration::from_secs(20);

/// The final tokens a client got, as (text, start_ms, end_ms).
fn finals(got: &Received) -> Vec<(String, u64, u64)> {
    got.messages
        .iter()
        .flat_map(|m| m["tokens"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["is_final"] == true)
        .map(|t| {
            (
                t["text"].as_str().unwrap().to_string(),
                t["start_ms"].as_u64().unwrap(),
                t["end_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `n` frames of 100 ms of 16 kHz s16le audio, distinct per `stream`.
fn stream_audio(stream: u32, n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|f| {
            (0..3200u32)
                .map(|j| {
                    let x = j.wrapping_mul(2_654_435_761)
                        ^ stream.wrapping_mul(40_503)
                        ^ f.wrapping_mul(97);
                    (x >> 13) as u8
                })
                .collect()
        })
        .collect()
}

#[test]
fn two_hundred_streams_with_faults_keep_their_transcripts() {
    let fake = fake(&[], |c| {
        c.keys = ["k1", "k2", "k3"]
            .iter()
            .map(|k| FakeKey::new(k, 1000))
            .collect();
        c.record_audio = false;
        c.faults.random = Some(RandomFaults {
            share: 0.5,
            kinds: vec![
                FaultKind::Drop,
                FaultKind::Error(503),
                FaultKind::Error(500),
                FaultKind::Violation,
                FaultKind::GoingAway,
            ],
            within_frames: 30,
            seed: 11,
        });
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2"), ("c", "k3")]);
    cfg.server.max_streams = 1000;
    cfg.failover.max_resumes = 12;
    let relay = Relay::start(cfg);
    let token = relay.token("dev");
    let addr = relay.addr();
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let token = token.clone();
            std::thread::spawn(move || {
                let mut bad = vec![];
                for i in 0..25u32 {
                    let id = t * 25 + i;
                    let frames = stream_audio(id, 30);
                    let want = transcript_of(&frames.concat(), 32_000, 480);
                    let (mut ws, _) = connect(addr, &token, Via::Header).unwrap();
                    let got = stream_session(&mut ws, &config_message(None), &frames);
                    let have = finals(&got);
                    if got.error_code().is_some() || !got.finished() || have != want {
                        bad.push(format!("stream {id}: {:?} error {:?} finished {}\n  want {want:?}\n  have {have:?}", got.close_code(), got.error_code(), got.finished()));
                    }
                }
                bad
            })
        })
        .collect();
    let bad: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        bad.is_empty(),
        "{} streams differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
    let words: std::collections::BTreeSet<String> =
        transcript_of(&stream_audio(0, 30).concat(), 32_000, 480)
            .into_iter()
            .map(|w| w.0)
            .collect();
    assert!(words.len() > 3, "the audio gives varied words: {words:?}");
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    let sessions = fake.sessions();
    let failed = sessions
        .iter()
        .filter(|r| r.config.is_some() && !r.finished_sent)
        .count();
    assert!(
        failed >= 50,
        "only {failed} of {} connections failed",
        sessions.len()
    );
    let m = relay.handle.metrics();
    assert!(m.streams_resumed() >= 50, "{}", m.streams_resumed());
}

/// A stream of 20 frames whose first upstream connection fails with
/// `kind` at its sixth audio message: the failure must not reach the
/// client, and the stream goes on on a new connection with one transcript.
fn resumed_unseen_after(kind: FaultKind, stream: u32) -> Relay {
    let faults = only_first_connection_fails(kind, 6, |n| n == 6);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(stream, 20);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished() && !got.abrupt, "{got:?}");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    relay
}

#[test]
fn a_protocol_violation_from_upstream_is_resumed_unseen() {
    // A continuation frame with no message to continue, then a drop.
    let m = resumed_unseen_after(FaultKind::Violation, 6)
        .handle
        .metrics();
    assert_eq!(m.streams_resumed() + m.failovers().open_lost, 1);
}

#[test]
fn an_upstream_that_closes_before_finished_is_resumed_unseen() {
    // A close 1001 and no message before it, as a server shutting down
    // sends: for the client a close before `finished` is a failure.
    let m = resumed_unseen_after(FaultKind::GoingAway, 7)
        .handle
        .metrics();
    assert_eq!(m.streams_resumed(), 1);
}

#[test]
fn a_resume_waits_out_an_upstream_that_is_briefly_unreachable() {
    // The first connection drops at its sixth audio frame, and the next two
    // connections are closed unanswered (a restarting upstream): the resume
    // waits and tries again, and the client sees one stream.
    let faults = only_first_connection_fails(FaultKind::Drop, 6, |n| n == 6);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let url = door(&fake.url(), |n| n == 1 || n == 2);
    let relay = Relay::start(relay_config(&url, &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(8, 20);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished() && !got.abrupt, "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

#[test]
fn audio_sent_a_few_bytes_a_frame_resumes_whole() {
    // 2,000 frames of 16 bytes; the first connection drops at its 1,200th
    // to 1,999th: the replay merges the copy's tiny frames (256 bytes at
    // least) and the transcript is still the audio's.
    let faults = only_first_connection_fails(FaultKind::Drop, 2000, |n| n >= 1200);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let audio = stream_audio(9, 10).concat();
    let frames: Vec<Vec<u8>> = audio.chunks(16).map(<[u8]>::to_vec).collect();
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished() && !got.abrupt, "{got:?}");
    assert_eq!(finals(&got), transcript_of(&audio, 32_000, 480));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

#[test]
fn a_client_that_leaves_during_a_resume_is_not_resumed_for() {
    // The first connection drops at its 5th to 9th audio frame; every
    // upgrade is answered 2 s late, so the resume's new connection is
    // still opening when the client goes.
    let faults = only_first_connection_fails(FaultKind::Drop, 10, |n| n >= 5);
    let fake = fake(&["k1"], |c| {
        c.faults.random = Some(faults);
        c.faults.handshake_delay = Duration::from_secs(2);
    });
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in stream_audio(10, 10) {
        ws.send(Message::binary(f)).unwrap();
    }
    // The first connection is gone and the relay is opening the next.
    assert!(fake.wait_for(LIMIT, |s| !s.is_empty() && s[0].closed));
    drop(ws);
    assert!(relay.wait_idle(LIMIT));
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    // Only the first connection ever got a config: the new one was
    // dropped unanswered, with none of the copy replayed to it.
    let configured: Vec<u64> = fake
        .sessions()
        .iter()
        .filter(|r| r.config.is_some())
        .map(|r| r.id)
        .collect();
    assert_eq!(
        configured.len(),
        1,
        "sessions with a config: {configured:?}"
    );
    assert_eq!(relay.handle.metrics().streams_resumed(), 0);
}

/// The relay's own meter of `device`'s audio in `/admin/usage`, once the
/// admin thread has its stream (`None` until then).
fn metered_audio(relay: &Relay, admin: &str, device: &str) -> Option<f64> {
    let (status, body) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/usage?group_by=device",
        Some(admin),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["rows"].as_array()?.iter().find(|r| r["key"] == device)?["audio_seconds_relay_meter"].as_f64()
}

#[test]
fn a_stream_whose_resume_cannot_reopen_still_counts_its_audio() {
    // The first connection drops at its 5th to 9th audio frame; upgrades
    // are answered 2 s late, and upstream is gone before the resume's
    // new connection is: the client gets 503 and close 1011, and the audio
    // the stream carried is still in the usage ledger and the device's day.
    const ADMIN: &str = "resume-admin-token-0123456789";
    let faults = only_first_connection_fails(FaultKind::Drop, 10, |n| n >= 5);
    let fake = fake(&["k1"], |c| {
        c.faults.random = Some(faults);
        c.faults.handshake_delay = Duration::from_secs(2);
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in stream_audio(11, 10) {
        ws.send(Message::binary(f)).unwrap();
    }
    assert!(fake.wait_for(LIMIT, |s| !s.is_empty() && s[0].closed));
    fake.stop();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert_eq!(got.close_code(), Some(1011), "{got:?}");
    assert!(relay.wait_idle(LIMIT));
    let mut metered = None;
    assert!(
        wait_until(LIMIT, || {
            metered = metered_audio(&relay, ADMIN, "dev");
            metered.is_some()
        }),
        "the stream is not in the usage ledger"
    );
    // 10 frames of 100 ms went upstream before the drop or into the copy.
    assert_eq!(metered, Some(1.0));
}

#[test]
fn a_stream_past_max_resumes_gets_the_documented_error() {
    // Every connection fails at its fifth audio frame.
    let fake = fake(&["k1"], |c| c.faults.error_after_frames = Some((5, 503)));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.failover.max_resumes = 2;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &stream_audio(1, 40));
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    // An error as a connection's first message is a failure at open: the
    // same account again (there is no other), not a resume.
    let m = relay.handle.metrics();
    assert_eq!(
        fake.sessions().len() as u64,
        3 + m.failovers().open_refused,
        "the first connection, two resumes and any reconnect at open"
    );
    assert_eq!(m.streams_resumed(), 2);
}

#[test]
fn a_stream_whose_connections_keep_dropping_gets_503_close_1011() {
    // Every connection is dropped (no error message, no close) at its
    // fifth audio frame: after two resumes the client gets the relay's
    // "connection lost" error, as documented.
    let fake = fake(&["k1"], |c| c.faults.close_after_frames = Some(5));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.failover.max_resumes = 2;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &stream_audio(5, 40));
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert_eq!(got.close_code(), Some(1011), "{got:?}");
    let last = got.messages.last().unwrap();
    assert!(
        last["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("Reconnect")),
        "{last}"
    );
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    // A connection lost before its first result was read is moved at
    // open: the same account again (there is no other), not a resume.
    let m = relay.handle.metrics();
    assert_eq!(
        fake.sessions().len() as u64,
        3 + m.failovers().open_lost,
        "the first connection, two resumes and any reconnect at open"
    );
    assert_eq!(m.streams_resumed(), 2);
}

#[test]
fn compressed_formats_do_not_resume() {
    let fake = fake(&["k1"], |c| c.faults.error_after_frames = Some((5, 503)));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
    config["audio_format"] = "ogg".into();
    let got = stream_session(&mut ws, &config.to_string(), &stream_audio(2, 10));
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    assert_eq!(fake.sessions().len(), 1);
}

#[test]
fn a_pending_finalize_is_answered_after_a_resume() {
    // The first connection fails (503) at its eighth audio frame, before it
    // reads the finalize the client sent after its tenth; the second does not fail.
    let faults = only_first_connection_fails(FaultKind::Error(503), 8, |n| n == 8);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(3, 10);
    ws.send(Message::text(config_message(None))).unwrap();
    for f in &frames {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::text(r#"{"type":"finalize"}"#)).unwrap();
    let mut before_fin = Received::default();
    loop {
        let m: Value = match ws.read().unwrap() {
            Message::Text(t) => serde_json::from_str(&t).unwrap(),
            other => panic!("{other:?}"),
        };
        assert!(m.get("error_code").is_none(), "{m}");
        let fin = m["tokens"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["text"] == "<fin>"));
        before_fin.messages.push(m);
        if fin {
            break;
        }
    }
    let mut want = transcript_of(&frames.concat(), 32_000, 480);
    // The last 40 ms are less than half a word: no word, but final.
    want.push(("<fin>".into(), 1000, 1000));
    assert_eq!(finals(&before_fin), want);
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let rest = read_all(&mut ws);
    assert!(rest.finished(), "{rest:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    assert_eq!(s[0].error_sent, Some(503));
    assert!(s[1].text_messages.iter().any(|t| t.contains("finalize")));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

/// Two `finalize`s pending when the connection fails: each is replayed
/// where it was in the audio, as the client sent it, so the client gets
/// both `<fin>`s at the times an unbroken stream gives.
#[test]
fn two_pending_finalizes_are_each_answered_after_a_resume() {
    const FIRST: &str = r#"{"type":"finalize","trailing_silence_ms":300}"#;
    const SECOND: &str = r#"{"type":"finalize"}"#;
    let frames = stream_audio(4, 10);
    // The client: nine frames, a finalize, the tenth, another finalize;
    // then it reads up to the second `<fin>`, and ends its audio.
    let run = |relay: &Relay| -> Received {
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        ws.send(Message::text(config_message(None))).unwrap();
        for f in &frames[..9] {
            ws.send(Message::binary(f.clone())).unwrap();
        }
        ws.send(Message::text(FIRST)).unwrap();
        ws.send(Message::binary(frames[9].clone())).unwrap();
        ws.send(Message::text(SECOND)).unwrap();
        let mut got = Received::default();
        let mut fins = 0;
        while fins < 2 {
            let m: Value = match ws.read() {
                Ok(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
                other => panic!("{other:?} after {fins} <fin>: {:?}", finals(&got)),
            };
            assert!(m.get("error_code").is_none(), "{m}");
            fins += m["tokens"]
                .as_array()
                .map_or(0, |t| t.iter().filter(|t| t["text"] == "<fin>").count());
            got.messages.push(m);
        }
        ws.send(Message::binary(Vec::<u8>::new())).unwrap();
        let rest = read_all(&mut ws);
        assert!(rest.finished(), "{rest:?}");
        got
    };
    // Unbroken: what the client should see.
    let calm = fake(&["k1"], |_| {});
    let want = finals(&run(&Relay::start(relay_config(
        &calm.url(),
        &[("a", "k1")],
    ))));
    let fins: Vec<_> = want.iter().filter(|t| t.0 == "<fin>").collect();
    assert_eq!(fins.len(), 2, "{want:?}");
    assert!(fins[0].1 < fins[1].1, "{want:?}");
    // The first connection fails (503) at its eighth frame: both
    // finalizes are still unanswered.
    let faults = only_first_connection_fails(FaultKind::Error(503), 8, |n| n == 8);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let got = finals(&run(&relay));
    assert_eq!(got, want);
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    assert_eq!(s[0].error_sent, Some(503));
    let replayed: Vec<_> = s[1]
        .text_messages
        .iter()
        .filter(|t| t.contains("finalize"))
        .collect();
    assert_eq!(replayed, [FIRST, SECOND]);
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

/// A client's text message on a raw-audio stream, upstream's `<fin>`s
/// it got, and its final tokens: `texts` go after frame `at` of ten (100
/// ms each); the client reads up to `fins` `<fin>`s after the last of
/// them, sends the rest of its audio and its end, and reads all. Through
/// a relay over a fake Soniox whose first connection fails (503) at
/// frame `fail_at`, when given.
fn finalizes_through(
    texts: &[(usize, &str)],
    fins: usize,
    fail_at: Option<u64>,
) -> (usize, Vec<(String, u64, u64)>, Vec<String>) {
    let frames = stream_audio(5, 10);
    let fake = match fail_at {
        Some(n) => {
            let faults = only_first_connection_fails(FaultKind::Error(503), 10, move |f| f == n);
            fake(&["k1"], |c| c.faults.random = Some(faults))
        }
        None => fake(&["k1"], |_| {}),
    };
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let last = texts.iter().map(|t| t.0).max().unwrap();
    let mut got = Received::default();
    let count = |m: &Value| {
        m["tokens"]
            .as_array()
            .map_or(0, |t| t.iter().filter(|t| t["text"] == "<fin>").count())
    };
    for (i, f) in frames.iter().enumerate() {
        for (_, t) in texts.iter().filter(|t| t.0 == i) {
            ws.send(Message::text(*t)).unwrap();
        }
        if i == last {
            let mut seen = 0;
            while seen < fins {
                let m: Value = match ws.read() {
                    Ok(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
                    // A `<fin>` that never comes: what the client got.
                    _ => break,
                };
                seen += count(&m);
                got.messages.push(m);
            }
        }
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let rest = read_all(&mut ws);
    assert!(rest.finished(), "{rest:?}");
    got.messages.extend(rest.messages);
    let fins = got.messages.iter().map(count).sum();
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    // The second connection's text messages after its config.
    let replayed = match fake.sessions().get(1) {
        Some(s) => s.text_messages[1..].to_vec(),
        None => vec![],
    };
    (fins, finals(&got), replayed)
}

/// A text message that only names `finalize` (a keepalive with a note)
/// is no finalize: upstream answers none, so the `<fin>` of the client's
/// real finalize after it answers that one, and a resume later does not
/// send it again (the client got a second `<fin>`).
#[test]
fn a_keepalive_naming_finalize_is_not_a_pending_finalize() {
    const NOTE: &str = r#"{"type":"keepalive","note":"finalize soon"}"#;
    const FINALIZE: &str = r#"{"type":"finalize"}"#;
    let texts = [(4, NOTE), (6, FINALIZE)];
    let (fins, want, _) = finalizes_through(&texts, 1, None);
    assert_eq!(fins, 1, "{want:?}");
    // The first connection fails at its ninth frame: the finalize was
    // answered there.
    let (fins, got, replayed) = finalizes_through(&texts, 1, Some(9));
    assert_eq!(fins, 1, "{got:?}");
    assert_eq!(got, want);
    assert!(!replayed.iter().any(|t| t == FINALIZE), "{replayed:?}");
}

/// A finalize written with an escape (`fin\u0061lize`) is one to
/// upstream: pending with another at a resume, both are replayed and
/// answered (before, only the other was: the client waited for good).
#[test]
fn a_finalize_written_with_an_escape_is_replayed_at_a_resume() {
    const ESCAPED: &str = r#"{"type":"fin\u0061lize","trailing_silence_ms":300}"#;
    const FINALIZE: &str = r#"{"type":"finalize"}"#;
    let texts = [(9, ESCAPED), (9, FINALIZE)];
    let (fins, want, _) = finalizes_through(&texts, 2, None);
    assert_eq!(fins, 2, "{want:?}");
    // The first connection fails at its eighth frame: neither was seen.
    let (fins, got, replayed) = finalizes_through(&texts, 2, Some(8));
    assert_eq!(fins, 2, "{got:?}");
    assert_eq!(got, want);
    assert_eq!(replayed, [ESCAPED, FINALIZE]);
}

/// A text message too long for the copy to keep (past 4 KiB) that may be
/// a finalize (it names one) can be neither replayed nor told apart from
/// one upstream answers with `<fin>`: the copy is let go, and a failure
/// after it is seen. Before, the stream resumed without it, the other
/// pending finalize was replayed alone, and the client waited for good
/// for its second `<fin>`.
#[test]
fn a_finalize_too_long_to_keep_lets_the_copy_go() {
    let long = format!(r#"{{"type":"finalize","note":"{}"}}"#, "x".repeat(5000));
    let frames = stream_audio(6, 10);
    // The first connection fails at its eighth frame: neither finalize
    // was seen there.
    let faults = only_first_connection_fails(FaultKind::Error(503), 8, |n| n == 8);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in &frames[..9] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::text(long)).unwrap();
    ws.send(Message::binary(frames[9].clone())).unwrap();
    ws.send(Message::text(r#"{"type":"finalize"}"#)).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert_eq!(metric(&relay, "clio_relay_resume_copies_dropped_total"), 1);
    assert_eq!(relay.handle.metrics().streams_resumed(), 0);
}

#[test]
fn a_stalled_upstream_is_an_upstream_failure_not_an_idle_client() {
    // Upstream stops reading at the third audio frame and never closes;
    // the client goes on sending as fast as it can.
    let fake = fake(&["k1"], |c| {
        c.faults.stall_after_frames = Some(3);
        c.record_audio = false;
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.limits.idle_timeout = Duration::from_secs(2);
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let (mut tcp, head) = raw_upgrade(relay.addr(), &relay.token("dev"));
    assert!(String::from_utf8_lossy(&head).contains(" 101 "));
    let mut writer = tcp.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        let audio = vec![1u8; 32_000];
        let _ = writer.write_all(&client_frame(1, config_message(None).as_bytes()));
        for _ in 0..2000 {
            if writer.write_all(&client_frame(2, &audio)).is_err() {
                break;
            }
        }
    });
    let frames = raw_read_frames(&mut tcp);
    let texts = raw_texts(&frames);
    assert!(
        texts.iter().any(|t| t["error_code"] == 503),
        "reported as something else: {texts:?}"
    );
    assert_eq!(raw_close_code(&frames), Some(1011));
    drop(tcp);
    sender.join().unwrap();
}

#[test]
fn a_connection_lost_at_open_with_one_account_reconnects_to_it() {
    // The first connection drops at its first audio frame, before any
    // result: nothing was accepted, and there is no other account. The
    // relay opens the same account again and replays; the client sees
    // nothing of it.
    let faults = only_first_connection_fails(FaultKind::Drop, 1, |_| true);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(4, 10);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    assert_eq!(s[1].audio, frames.concat(), "every byte once, in order");
}

#[test]
fn a_resume_between_the_fragments_of_a_message_continues_it() {
    // The first connection drops at its eighth audio message, which the
    // client sends in one write with the first fragment of the ninth: the
    // relay has forwarded an open message when it resumes, so the new
    // connection must get a message the client's continuation continues.
    let faults = only_first_connection_fails(FaultKind::Drop, 8, |n| n == 8);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(9, 12);
    ws.send(Message::text(config_message(None))).unwrap();
    for f in &frames[..7] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    // A result first: upstream has accepted the stream, so the drop is
    // resumed, not retried from the byte copy of the open.
    let mut early = vec![];
    while early.is_empty() {
        if let Message::Text(t) = ws.read().unwrap() {
            early.push(serde_json::from_str::<Value>(&t).unwrap());
        }
    }
    ws.write(Message::binary(frames[7].clone())).unwrap();
    ws.write(fragment(&frames[8][..1600], true, false)).unwrap();
    ws.flush().unwrap();
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s[1].config.is_some()));
    ws.send(fragment(&frames[8][1600..], false, true)).unwrap();
    for f in &frames[9..] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut got = read_all(&mut ws);
    got.messages.splice(0..0, early);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    assert_eq!(s[0].audio_frames, 8, "{:?}", s[0]);
    assert!(
        s[1].audio.ends_with(&frames[7..].concat()),
        "the new connection got the copy and the rest of the open message"
    );
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

#[test]
fn an_upstream_silent_after_the_end_of_audio_is_resumed_not_blamed_on_the_client() {
    // The first connection stops reading and answering at the stream's
    // last audio frame: the client has sent everything, its end of audio
    // included, and waits for `finished`. That wait is upstream's: the
    // stream resumes after the idle timeout instead of telling the client
    // it was idle (408).
    let faults = only_first_connection_fails(FaultKind::Stall, 20, |n| n == 20);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(8, 20);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

#[test]
fn a_compressed_stream_whose_upstream_falls_silent_gets_503_not_408() {
    let faults = only_first_connection_fails(FaultKind::Stall, 10, |n| n == 10);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
    config["audio_format"] = "ogg".into();
    let got = stream_session(&mut ws, &config.to_string(), &stream_audio(9, 10));
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert_eq!(got.close_code(), Some(1011), "{got:?}");
}

#[test]
fn a_stall_mid_stream_resumes_after_the_stall_timeout() {
    // The first connection stops reading at its fifth audio frame and
    // never closes; the second does not fail. The client writes 20 s of
    // audio flat out, far more than the socket buffers hold.
    let faults = only_first_connection_fails(FaultKind::Stall, 5, |n| n == 5);
    let fake = fake(&["k1"], |c| {
        c.faults.random = Some(faults);
        c.record_audio = false;
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    // Only the stall timeout can end the wait: the idle timeout is far off.
    cfg.limits.idle_timeout = Duration::from_secs(3600);
    cfg.limits.stall_timeout = Duration::from_secs(1);
    cfg.limits.socket_buffer = 16 << 10;
    cfg.failover.resume_audio = Duration::from_secs(600);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    // A bound for a test that would otherwise hang, not a speed check.
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    ws.get_mut()
        .set_write_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let frames = stream_audio(6, 200);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

/// Upstream counts a connection against the key's concurrency limit
/// until it is closed. A stalled connection the relay still held while it
/// opened the resume's would take the key's only place: the resume was
/// refused 429, and the client got 503 / 1011 for the relay's own
/// connection. The stalled connection is reset before the new one opens.
#[test]
fn a_stall_resumes_on_a_key_at_its_concurrency_limit() {
    let faults = only_first_connection_fails(FaultKind::Stall, 5, |n| n == 5);
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("k1", 1)];
        c.faults.random = Some(faults);
        c.record_audio = false;
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 1;
    cfg.limits.idle_timeout = Duration::from_secs(3600);
    cfg.limits.stall_timeout = Duration::from_secs(1);
    cfg.limits.socket_buffer = 16 << 10;
    cfg.failover.resume_audio = Duration::from_secs(600);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    // A bound for a test that would otherwise hang, not a speed check.
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    ws.get_mut()
        .set_write_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let frames = stream_audio(6, 200);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
    // Both sessions ended: the stalled one when the relay reset it.
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert!(relay.wait_idle(LIMIT));
    assert_eq!(relay.account_live(0), 0, "the stream's places given back");
}

#[test]
fn a_stalled_upstream_leaves_at_most_limits_socket_buffer_in_the_relay() {
    // Upstream stops reading at the fifth audio frame and never closes; the
    // client writes flat out until its own socket is full. What the relay
    // then holds of the stream is bounded by limits.socket_buffer: the
    // client socket's receive buffer (SO_RCVBUF, which the kernel doubles)
    // and the bytes left unsent in the upstream socket (TCP_NOTSENT_LOWAT:
    // a send buffer capped with SO_SNDBUF instead would hold about twice
    // as much, and one left to the kernel megabytes).
    const SB: usize = 64 << 10;
    let fake = fake(&["k1"], |c| {
        c.faults.stall_after_frames = Some(5);
        c.record_audio = false;
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.limits.socket_buffer = SB;
    // Neither deadline may end the stream while the test looks at it.
    cfg.limits.idle_timeout = Duration::from_secs(600);
    cfg.limits.stall_timeout = Duration::from_secs(600);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    // Everything on the way is full once a write waits this long (bounded
    // by the frame count too: 3,000 frames are 9.6 MB).
    ws.get_mut()
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut sent = 0usize;
    for f in stream_audio(9, 3000) {
        if ws.send(Message::binary(f)).is_err() {
            break;
        }
        sent += 3200;
    }
    assert!(
        sent > 4 * SB,
        "the client sent only {sent} bytes before its writes waited"
    );
    let client = ws.get_ref().local_addr().unwrap();
    let (_, rb, _) = socket_state(relay.addr(), client);
    assert!(rb <= 2 * SB as u64, "client socket rb {rb}");
    let up = upstream_socket(fake.addr());
    let (unsent, _, _) = socket_state(up, fake.addr());
    // About SB. At most one segment past it: the kernel checks the bound
    // when a send starts a new segment, then fills that segment (up to
    // 64 KiB on loopback; `ss -i` shows mss 65483) before it checks again,
    // from that send or the next. At least half of it, or the bound was
    // not what stopped the relay's writes (a send waits once SB is unsent,
    // and is let go when less than half is; upstream's kernel may take a
    // little more meanwhile, as it packs what it holds). Seen here: 35 to
    // 116 KB.
    assert!(
        (SB as u64 / 2..=(SB + (64 << 10)) as u64).contains(&unsent),
        "the relay holds {unsent} bytes unsent to the stalled upstream"
    );
}

/// The connection a stalled upstream leaves behind is closed when the
/// stream ends, though a write of the relay's was still waiting on it: it
/// is not kept open in the kernel, with the audio it could not send, for
/// as long as the stalled upstream keeps its side open.
#[test]
fn a_stalled_upstream_connection_is_closed_when_the_stream_ends() {
    let fake = fake(&["k1"], |c| {
        c.faults.stall_after_frames = Some(5);
        c.record_audio = false;
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.limits.socket_buffer = 16 << 10;
    // Long enough to find the connection below before the stall ends it.
    cfg.limits.stall_timeout = Duration::from_secs(3);
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.get_mut()
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for f in stream_audio(9, 3000) {
        if ws.send(Message::binary(f)).is_err() {
            break;
        }
    }
    // The relay's writes upstream wait now; the stall ends the stream.
    let up = upstream_socket(fake.addr());
    assert_eq!(tcp_socket(up, fake.addr()), Some((1, true)));
    assert!(relay.wait_idle(LIMIT), "the stall ended the stream");
    assert!(
        wait_until(LIMIT, || !matches!(
            tcp_socket(up, fake.addr()),
            Some((_, true))
        )),
        "the relay still holds its connection to the stalled upstream: {:?}",
        tcp_socket(up, fake.addr())
    );
}

/// A stream that a stall ends (no resume) resets its connection: closed
/// gracefully, its FIN would wait behind the audio the stalled upstream no
/// longer reads, and upstream would count the connection against the
/// key's concurrency limit for as long as the kernel kept trying to send
/// it; the key's next stream was refused 429 meanwhile.
#[test]
fn a_stream_a_stall_ends_frees_the_keys_place_at_upstream() {
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("k1", 1)];
        c.faults.stall_after_frames = Some(5);
        c.record_audio = false;
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.limits.socket_buffer = 16 << 10;
    cfg.limits.stall_timeout = Duration::from_secs(1);
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.get_mut()
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for f in stream_audio(9, 3000) {
        if ws.send(Message::binary(f)).is_err() {
            break;
        }
    }
    assert!(relay.wait_idle(LIMIT), "the stall ended the stream");
    assert!(
        fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed),
        "upstream's session of the stalled connection still open"
    );
    // The key's one place is free for the next stream (which upstream
    // does not stall before its end: 4 frames).
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(10, 4);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
}

/// The value of the unlabelled metric `name` in `/metrics`.
fn metric(relay: &Relay, name: &str) -> u64 {
    let (status, _, body) = http_get(relay.handle.admin_addr, "/metrics", "");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Whether the resume copies' budget falls back to 0 (streams just ended
/// may still be letting go).
fn copies_freed(relay: &Relay) -> bool {
    wait_until(LIMIT, || relay.handle.process.resume_copies.used() == 0)
}

/// A fake whose final tokens never come within these streams: every
/// resume copy keeps all of its stream's audio.
fn fake_without_finals(tweak: impl FnOnce(&mut FakeConfig)) -> FakeSoniox {
    fake(&["k1"], |c| {
        c.ms_per_word = 1_000_000;
        tweak(c);
    })
}

#[test]
fn a_copy_past_resume_memory_is_let_go_and_the_stream_loses_nothing() {
    let fake = fake_without_finals(|_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    // 40 frames of 3,200 bytes need a copy of 128,000.
    cfg.failover.resume_memory = 64_000;
    let relay = Relay::start(cfg);
    assert_eq!(metric(&relay, "clio_relay_resume_copy_limit_bytes"), 64_000);
    let frames = stream_audio(7, 40);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    assert_eq!(s.len(), 1);
    assert!(
        s[0].audio == frames.concat(),
        "upstream got every byte, in order"
    );
    assert_eq!(metric(&relay, "clio_relay_resume_copies_dropped_total"), 1);
    assert!(copies_freed(&relay), "every copy's storage went back");
    assert_eq!(metric(&relay, "clio_relay_resume_copy_bytes"), 0);
    // A reload moves the limit.
    let mut cfg = relay.cfg.clone();
    cfg.failover.resume_memory = 1 << 20;
    relay.handle.reload(&cfg).unwrap();
    assert_eq!(
        metric(&relay, "clio_relay_resume_copy_limit_bytes"),
        1 << 20
    );
}

#[test]
fn a_stream_that_let_go_of_its_copy_no_longer_resumes() {
    // The first connection fails (503) at its 25th to 30th audio frame,
    // long after upstream accepted the stream (its first word comes at
    // 480 ms of audio); the second does not fail. Final words every 480 ms
    // keep the copy under 20,000 bytes, so 10,000 lets it go.
    let faults = only_first_connection_fails(FaultKind::Error(503), 30, |n| n >= 25);
    for memory in [1 << 30, 10_000] {
        let fake = fake(&["k1"], |c| c.faults.random = Some(faults.clone()));
        let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
        cfg.failover.resume_memory = memory;
        let relay = Relay::start(cfg);
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &stream_audio(8, 40));
        let m = relay.handle.metrics();
        let dropped = metric(&relay, "clio_relay_resume_copies_dropped_total");
        if memory == 1 << 30 {
            assert!(got.finished() && got.error_code().is_none(), "{got:?}");
            assert_eq!((m.streams_resumed(), dropped), (1, 0));
        } else {
            assert_eq!(got.error_code(), Some(503), "{got:?}");
            assert!(!got.finished());
            assert_eq!((m.streams_resumed(), dropped), (0, 1));
        }
        assert!(copies_freed(&relay), "every copy's storage went back");
    }
}

/// An upstream that answers each connection's end of audio with one final
/// token and `finished`, then holds the connection open without a word
/// (no close frame): a server that hung after its last word. Counts the
/// streams' connections (those that sent a config).
fn mute_after_finished() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    let conns = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let counted = counted.clone();
            std::thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(tcp) else {
                    return;
                };
                if ws.read().is_err() {
                    return; // no config: not a stream's connection
                }
                counted.fetch_add(1, Ordering::SeqCst);
                loop {
                    match ws.read() {
                        Ok(Message::Binary(b)) if b.is_empty() => break,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
                let last = r#"{"tokens":[{"text":"hello","start_ms":0,"end_ms":500,"is_final":true}],"final_audio_proc_ms":2000,"total_audio_proc_ms":2000}"#;
                let fin = r#"{"tokens":[],"final_audio_proc_ms":2000,"total_audio_proc_ms":2000,"finished":true}"#;
                ws.send(Message::text(last)).unwrap();
                ws.send(Message::text(fin)).unwrap();
                // Hung: no close frame, no FIN, nothing read.
                std::thread::sleep(Duration::from_secs(30));
            });
        }
    });
    (url, conns)
}

#[test]
fn an_upstream_that_hangs_after_finished_is_not_resumed() {
    // Upstream's last word (`finished`) reached the client, then upstream
    // fell silent without its close. The stream is over: resuming it
    // replays its end of audio on a new connection and gives the client
    // a second `finished` (and its results again).
    let (url, conns) = mute_after_finished();
    let mut cfg = relay_config(&url, &[("a", "k1")]);
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &stream_audio(10, 20));
    let finished = got
        .messages
        .iter()
        .filter(|m| m["finished"] == true)
        .count();
    assert_eq!(finished, 1, "{got:?}");
    // It has its answer: the relay closes in upstream's place, no error.
    assert_eq!(got.error_code(), None, "{got:?}");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert_eq!(relay.handle.metrics().streams_resumed(), 0, "{got:?}");
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn a_resume_at_44_1_khz_keeps_the_first_word_of_the_new_connection() {
    // 44.1 kHz s16le mono is 88.2 bytes a ms: the last final token's end
    // (295 ms) falls inside a sample, and the copy starts at the sample
    // before it. The first connection's finals end 5 ms before each
    // 100 ms frame's end, and it drops at the fourth frame; the second
    // connection's first word starts at its time 0 (the replay of the
    // last 5 ms of the third frame).
    let (url, conns) = scripted_upstream(|c, n| {
        let (start, end) = match c {
            0 if n == 4 => return UpStep::Raw(Vec::new()),
            0 => (n * 100 - 95, n * 100 - 5),
            _ => ((n * 100).saturating_sub(195), n * 100 - 95),
        };
        UpStep::Text(
            serde_json::json!({
                "tokens": [{"text": format!("c{c}w{n} "), "start_ms": start, "end_ms": end,
                    "is_final": true}],
                "final_audio_proc_ms": end, "total_audio_proc_ms": end,
            })
            .to_string(),
        )
    });
    let relay = Relay::start(relay_config(&url, &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let config = serde_json::json!({"model": "stt-rt-v4", "audio_format": "pcm_s16le",
        "sample_rate": 44_100, "num_channels": 1});
    let frames: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 8820]).collect();
    let got = stream_paced(&mut ws, &config.to_string(), &frames, 3);
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    let words: Vec<String> = finals(&got).into_iter().map(|w| w.0).collect();
    // The second connection got 5 ms and then frames 4 to 6.
    assert_eq!(
        words,
        ["c0w1 ", "c0w2 ", "c0w3 ", "c1w1 ", "c1w2 ", "c1w3 ", "c1w4 "],
        "{got:?}"
    );
    // One timeline: each word starts where the one before ended, and the
    // final point never goes back.
    let times = finals(&got);
    for pair in times.windows(2) {
        assert!(pair[1].1 >= pair[0].2, "{pair:?} in {times:?}");
    }
    assert_eq!((times[3].1, times[3].2), (295, 300), "{times:?}");
    let points: Vec<u64> = got
        .messages
        .iter()
        .filter_map(|m| m["final_audio_proc_ms"].as_u64())
        .collect();
    assert!(points.windows(2).all(|p| p[1] >= p[0]), "{points:?}");
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

#[test]
fn streams_at_44_1_khz_with_faults_keep_their_final_tokens_times() {
    // fake-soniox's words of 485 ms at 44.1 kHz end inside a sample, as
    // real word ends do; a resume's copy starts at the sample before.
    // Each stream must get as many final tokens, at the same times, as
    // the audio gives with no fault (the words themselves may differ: a
    // new connection hears the half sample before its first word too).
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("k1", 1000)];
        c.record_audio = false;
        c.ms_per_word = 485;
        c.faults.random = Some(RandomFaults {
            share: 0.6,
            kinds: vec![FaultKind::Drop, FaultKind::Error(503), FaultKind::GoingAway],
            within_frames: 12,
            seed: 5,
        });
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.failover.max_resumes = 20;
    let relay = Relay::start(cfg);
    let config = serde_json::json!({"model": "stt-rt-v4", "audio_format": "pcm_s16le",
        "sample_rate": 44_100, "num_channels": 1})
    .to_string();
    let times = |w: Vec<(String, u64, u64)>| w.into_iter().map(|w| (w.1, w.2)).collect::<Vec<_>>();
    let mut bad = vec![];
    for id in 0..20u32 {
        // 100 ms frames of 44.1 kHz s16le mono.
        let frames: Vec<Vec<u8>> = stream_audio(id, 30)
            .into_iter()
            .map(|f| f.iter().cycle().take(8820).copied().collect())
            .collect();
        let want = times(transcript_of(&frames.concat(), 88_200, 485));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config, &frames);
        let have = times(finals(&got));
        if !got.finished() || have != want {
            bad.push(format!(
                "stream {id}: {got:?}\n  want {want:?}\n  have {have:?}"
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert!(relay.handle.metrics().streams_resumed() >= 10);
}

#[test]
fn a_resume_never_takes_the_processed_audio_figures_back() {
    // The first connection's finals lag 300 ms behind the audio it has
    // processed, and it drops at its sixth frame: the client has seen
    // `total_audio_proc_ms` 500 with the final point at 200. The second
    // connection gets the audio from 200 ms again, and its own totals,
    // on the stream's timeline, start below 500.
    let (url, conns) = scripted_upstream(|c, n| {
        if c == 0 && n == 6 {
            return UpStep::Raw(Vec::new());
        }
        let total = n * 100;
        let fin = if c == 0 {
            total.saturating_sub(300)
        } else {
            total
        };
        let mut tokens = vec![];
        if fin > 0 {
            tokens.push(serde_json::json!({"text": format!("c{c}w{n} "),
                "start_ms": fin - 100, "end_ms": fin, "is_final": true}));
        }
        if total > fin {
            tokens.push(serde_json::json!({"text": "maybe ", "start_ms": fin,
                "end_ms": total, "is_final": false}));
        }
        UpStep::Text(
            serde_json::json!({"tokens": tokens, "final_audio_proc_ms": fin,
                "total_audio_proc_ms": total})
            .to_string(),
        )
    });
    let relay = Relay::start(relay_config(&url, &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(12, 10);
    let got = stream_paced(&mut ws, &config_message(None), &frames, 5);
    assert_eq!(got.messages[4]["total_audio_proc_ms"], 500, "{got:?}");
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
    for k in ["final_audio_proc_ms", "total_audio_proc_ms"] {
        let seen: Vec<u64> = got.messages.iter().filter_map(|m| m[k].as_u64()).collect();
        assert!(seen.windows(2).all(|p| p[1] >= p[0]), "{k}: {seen:?}");
        assert_eq!(seen.last(), Some(&1000), "{k}: {seen:?}");
    }
    // Every final token once, on one timeline.
    let times = finals(&got);
    let words: Vec<&str> = times.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(
        words,
        [
            "c0w4 ", "c0w5 ", "c1w1 ", "c1w2 ", "c1w3 ", "c1w4 ", "c1w5 ", "c1w6 ", "c1w7 ",
            "c1w8 "
        ],
        "{times:?}"
    );
    assert!(times.windows(2).all(|p| p[1].1 == p[0].2), "{times:?}");
}

#[test]
fn a_resume_that_every_account_refuses_gets_503_close_1011() {
    // Every account's key is refused (401) at its connection's fifth
    // audio frame, after upstream accepted the stream: each refusal marks
    // its account and the resume takes the next, and when none is left
    // the client gets the relay's "reconnect", not upstream's 401 (its
    // token is fine) nor the 429 of a stream refused at open.
    let fake = fake(&["k1", "k2", "k3"], |c| {
        c.faults.error_after_frames = Some((5, 401));
    });
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("a", "k1"), ("b", "k2"), ("c", "k3")],
    ));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &stream_audio(13, 12));
    assert_error_frame(&got, 503, 1011);
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    let keys: Vec<Option<String>> = fake.sessions().into_iter().map(|r| r.key).collect();
    assert_eq!(
        keys,
        [Some("k1".into()), Some("k2".into()), Some("k3".into())],
        "each account once"
    );
    assert_eq!(relay.handle.metrics().streams_resumed(), 2);
    let now = std::time::Instant::now();
    assert!(relay
        .handle
        .process
        .accounts()
        .iter()
        .all(|a| !a.healthy(now)));
}

/// Sends `config`, then the first `paced` frames one by one, each answered
/// before the next goes (a drop with unread bytes resets the connection,
/// which may take a result in flight with it), then the rest and the end
/// of audio. Returns everything received, the paced frames' answers first.
fn stream_paced(ws: &mut Ws, config: &str, frames: &[Vec<u8>], paced: usize) -> Received {
    ws.send(Message::text(config)).unwrap();
    let mut before = Vec::new();
    for f in &frames[..paced] {
        ws.send(Message::binary(f.clone())).unwrap();
        match ws.read().unwrap() {
            Message::Text(t) => before.push(serde_json::from_str::<Value>(&t).unwrap()),
            other => panic!("{other:?}"),
        }
    }
    for f in &frames[paced..] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut got = read_all(ws);
    got.messages.splice(0..0, before);
    got
}

#[test]
fn an_upstream_error_of_an_odd_shape_is_still_an_error() {
    // Soniox sends `error_code` as a number. One sent as a string (or a
    // whole float, or with a `null` message) was taken for a result:
    // passed on to the client, the stream counted as accepted, and no
    // move or resume followed. At open (frame 1) it now moves the stream
    // to a new connection, and mid-stream (frame 3, raw audio) resumes it,
    // unseen, as a 503 does.
    for (format, at) in [("pcm_s16le", 1), ("ogg", 1), ("pcm_s16le", 3)] {
        let (url, conns) = scripted_upstream(move |c, n| match (c, n) {
            (0, n) if n == at => UpStep::Text(
                r#"{"tokens":[],"error_code":"503","error_message":"Cannot continue request"}"#
                    .into(),
            ),
            _ => UpStep::Final,
        });
        let relay = Relay::start(relay_config(&url, &[("a", "k1")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = format.into();
        let got = stream_paced(&mut ws, &config.to_string(), &stream_audio(6, 3), 2);
        let errors: Vec<&Value> = got
            .messages
            .iter()
            .filter(|m| !m["error_code"].is_null())
            .collect();
        assert!(errors.is_empty(), "{format} at {at}: {errors:?}");
        assert!(got.finished(), "{format} at {at}: {got:?}");
        assert_eq!(got.close_code(), Some(1000), "{format} at {at}");
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "{format} at {at}"
        );
    }
}

#[test]
fn a_finished_with_a_fractional_figure_ends_the_stream_once() {
    // A `finished` whose `total_audio_proc_ms` is not a whole number was
    // not seen as upstream's last word: the close after it was taken for
    // a server going away, and the raw-audio stream resumed, its client
    // given `finished` again by each new connection, then a 503.
    let (url, conns) = scripted_upstream(|_, n| {
        match n {
        2 => UpStep::Text(
            r#"{"tokens":[],"final_audio_proc_ms":200,"total_audio_proc_ms":200.5,"finished":true}"#
                .into(),
        ),
        _ => UpStep::Final,
    }
    });
    let relay = Relay::start(relay_config(&url, &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in stream_audio(2, 4) {
        ws.send(Message::binary(f)).unwrap();
    }
    let got = read_all(&mut ws);
    let finished = got
        .messages
        .iter()
        .filter(|m| m["finished"] == true)
        .count();
    assert_eq!(finished, 1, "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(relay.handle.metrics().streams_resumed(), 0);
}

#[test]
fn a_stream_on_an_account_at_its_limit_resumes_on_that_account() {
    // One account, its `max_concurrent_streams` 1, and one stream on it:
    // the account is at its limit. The stream's connection drops at its
    // sixth audio frame; the failed connection's place is the stream's
    // own, so the resume takes it again and the client sees one stream.
    let faults = only_first_connection_fails(FaultKind::Drop, 6, |n| n == 6);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 1;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(14, 20);
    // Upstream's first word (at 480 ms of audio) has reached the client
    // before the sixth frame goes: the drop comes mid-stream, not at open
    // (a reset can take a result in flight with it).
    ws.send(Message::text(config_message(None))).unwrap();
    for f in &frames[..5] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    let first = match ws.read().unwrap() {
        Message::Text(t) => serde_json::from_str::<Value>(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    for f in &frames[5..] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut got = read_all(&mut ws);
    got.messages.insert(0, first);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished() && !got.abrupt, "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
    assert!(relay.wait_idle(LIMIT));
    assert_eq!(relay.account_live(0), 0, "the stream's places given back");
}

#[test]
fn a_connection_lost_at_open_on_an_account_at_its_limit_reconnects_to_it() {
    // As above, before upstream accepted the stream: its first connection
    // drops at its first audio frame, and the only account, its limit 1,
    // takes the stream again.
    let faults = only_first_connection_fails(FaultKind::Drop, 1, |_| true);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 1;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(15, 10);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(fake.sessions()[1].audio, frames.concat(), "every byte once");
    assert!(relay.wait_idle(LIMIT));
    assert_eq!(relay.account_live(0), 0, "the stream's places given back");
}

#[test]
fn a_stream_moved_at_open_off_a_stalled_connection_reopens_on_a_key_at_its_limit() {
    // As above, the key's concurrency limit 1 at upstream: the first
    // connection stops reading and answering at its first audio frame,
    // so after the client's end of audio upstream is silent, before it
    // accepted the stream. The stream moves to a new connection at open
    // (no resume); the stalled one, upstream's only place for the key,
    // is reset first, or upstream refuses the new one 429.
    let faults = only_first_connection_fails(FaultKind::Stall, 1, |_| true);
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("k1", 1)];
        c.faults.random = Some(faults);
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 1;
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = stream_audio(16, 10);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert_eq!(finals(&got), transcript_of(&frames.concat(), 32_000, 480));
    assert_eq!(relay.handle.metrics().streams_resumed(), 0);
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(fake.sessions()[1].audio, frames.concat(), "every byte once");
    assert!(relay.wait_idle(LIMIT));
    assert_eq!(relay.account_live(0), 0, "the stream's places given back");
}

#[test]
fn two_hundred_streams_whose_account_dies_resume_and_the_others_never_notice() {
    // 200 streams open at once on two accounts. Then account "a"'s key
    // dies under its streams (its balance exhausted: each of its sessions
    // gets 402 at its next audio frame, each new upgrade 402 too). Every
    // stream of "a" resumes on "b", unseen, and no resume goes back to
    // the dead key (the first 402 marks it); "b"'s streams never notice.
    const STREAMS: u32 = 200;
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("k1", 1000), FakeKey::new("k2", 1000)];
        c.record_audio = false;
        c.shards = 2;
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]);
    cfg.server.max_streams = 1000;
    for a in &mut cfg.accounts {
        a.max_concurrent_streams = 400;
    }
    let relay = Relay::start(cfg);
    let token = relay.token("dev");
    let addr = relay.addr();
    // Every stream open and accepted upstream; then the key dies; then
    // they go on.
    let opened = std::sync::Arc::new(std::sync::Barrier::new(STREAMS as usize + 1));
    let died = std::sync::Arc::new(std::sync::Barrier::new(STREAMS as usize + 1));
    let threads: Vec<_> = (0..STREAMS)
        .map(|id| {
            let (token, opened, died) = (token.clone(), opened.clone(), died.clone());
            std::thread::spawn(move || {
                let frames = stream_audio(id, 20);
                let want = transcript_of(&frames.concat(), 32_000, 480);
                let (mut ws, _) = connect(addr, &token, Via::Header).unwrap();
                let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
                config["client_reference_id"] = format!("ref-{id}").into();
                ws.send(Message::text(config.to_string())).unwrap();
                // 800 ms of audio: upstream's first word comes with it,
                // and the stream is committed to its connection.
                for f in &frames[..8] {
                    ws.send(Message::binary(f.clone())).unwrap();
                }
                let first = match ws.read() {
                    Ok(Message::Text(t)) => serde_json::from_str::<Value>(&t).unwrap(),
                    other => panic!("stream {id}: {other:?}"),
                };
                opened.wait();
                died.wait();
                for f in &frames[8..] {
                    ws.send(Message::binary(f.clone())).unwrap();
                }
                ws.send(Message::binary(Vec::<u8>::new())).unwrap();
                let mut got = read_all(&mut ws);
                got.messages.insert(0, first);
                let have = finals(&got);
                if got.error_code().is_some() || !got.finished() || have != want {
                    Some(format!(
                        "stream {id}: {:?} error {:?} finished {}\n  want {want:?}\n  have {have:?}",
                        got.close_code(),
                        got.error_code(),
                        got.finished()
                    ))
                } else {
                    None
                }
            })
        })
        .collect();
    opened.wait();
    fake.set_key_reject("k1", Some(402));
    fake.fail_sessions_of("k1", Some(FaultKind::Error(402)));
    died.wait();
    let bad: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    assert!(
        bad.is_empty(),
        "{} streams differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    let sessions = fake.sessions();
    let of = |r: &fake_soniox::SessionRecord| {
        r.config.as_ref().map(|c| c["client_reference_id"].clone())
    };
    let on_a: Vec<_> = sessions
        .iter()
        .filter(|r| r.key.as_deref() == Some("k1"))
        .filter_map(of)
        .collect();
    assert!(
        !on_a.is_empty() && on_a.len() < STREAMS as usize,
        "both accounts took streams: {} on a",
        on_a.len()
    );
    assert!(
        sessions.iter().all(|r| r.http_status.is_none()),
        "a resume went back to the dead key"
    );
    // "b"'s own streams: one connection each, all of it.
    for r in sessions.iter().filter(|r| r.key.as_deref() == Some("k2")) {
        let reference = of(r);
        if on_a.iter().all(|a| Some(a) != reference.as_ref()) {
            assert!(r.finished_sent && r.audio_frames == 20, "{r:?}");
        }
    }
    assert_eq!(sessions.len(), STREAMS as usize + on_a.len());
    let m = relay.handle.metrics();
    assert_eq!(m.streams_resumed(), on_a.len() as u64);
    assert!(!relay.handle.process.accounts()[0].healthy(std::time::Instant::now()));
    assert!(relay.wait_idle(LIMIT));
    assert_eq!((relay.account_live(0), relay.account_live(1)), (0, 0));
}
