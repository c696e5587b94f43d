//! A client that stops reading does not hold its stream or its connection:
//! what the relay still has to tell it (a pong, the error frame and close
//! of a stream's end) waits a bounded time on its full socket, and then
//! the relay closes. Each client here is a raw TCP socket with a small
//! receive buffer that speaks WebSocket by hand and never reads after the
//! upgrade, so its socket fills (`upgraded_raw_client`).

use std::time::Duration;

use clio_frame::frame::Opcode;
use clio_relay::core::metrics::Side;

use crate::sockets::*;
use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// A relay with `limits` in front of [`chatty_upstream`], and a stream
/// through it whose raw client sent its config and reads nothing.
fn stream_that_stops_reading(
    limits: impl FnOnce(&mut clio_relay::core::config::LimitsConfig),
) -> (Relay, std::net::TcpStream) {
    let url = chatty_upstream();
    let mut cfg = relay_config(&url, &[("acct-a", "key-a")]);
    limits(&mut cfg.limits);
    let relay = Relay::start(cfg);
    let token = relay.token("dev-1");
    let mut client =
        upgraded_raw_client(relay.addr(), &format!("Authorization: Bearer {token}\r\n"));
    let config = config_message(None);
    send_frames(&mut client, Opcode::Text, config.as_bytes(), 1);
    (relay, client)
}

/// A stream whose client stopped reading while results came, and then went
/// quiet, is ended when idle, though the error frame for that (408) finds
/// the client's socket full: the stream's slot is free again, and the
/// relay has closed the connection.
#[test]
fn a_stream_whose_client_stopped_reading_still_ends_when_idle() {
    let (relay, client) = stream_that_stops_reading(|l| l.idle_timeout = Duration::from_secs(1));
    assert!(
        wait_until(LIMIT, || relay.handle.process.live_streams() == 1),
        "the stream opened"
    );
    let ours = (relay.addr(), client.local_addr().unwrap());
    assert_eq!(tcp_socket(ours.0, ours.1), Some((1, true)), "established");
    assert!(
        relay.wait_idle(LIMIT + Duration::from_secs(5)),
        "the stream of a client that stopped reading never ended"
    );
    // And the relay's socket is closed (no file holds it; its FIN waits
    // behind what the client never read), not kept in the kernel with a
    // full send buffer: the client never sends its FIN, so once the 2 s
    // bound on that wait is over.
    assert!(
        wait_until(LIMIT, || !matches!(
            tcp_socket(ours.0, ours.1),
            Some((_, true))
        )),
        "the relay's socket to the client is still open: {:?}",
        tcp_socket(ours.0, ours.1)
    );
}

/// A connection without a token yet that pings without reading the pongs
/// is let go at its first message's deadline, though its socket is full
/// of pongs: it does not keep its place among the unauthenticated.
#[test]
fn pings_from_a_client_that_never_reads_do_not_keep_its_connection() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    let mut client = upgraded_raw_client(relay.addr(), "");
    assert!(wait_until(LIMIT, || relay.handle.metrics().unauthenticated == 1));
    // Far more pongs (131 bytes each, 13 MB) than the client's socket and
    // the relay's send buffer, which grows to a few MiB, hold; 20,000 were
    // not enough. The client's writes stop once the relay stops reading.
    send_frames(&mut client, Opcode::Ping, &[b'p'; 125], 100_000);
    assert!(
        wait_until(LIMIT, || relay.handle.metrics().unauthenticated == 0),
        "a client that pings and never reads kept its connection"
    );
}

/// What a client that stops reading its results makes the relay hold in
/// its kernel is bounded by `limits.socket_buffer`: the results left
/// unsent in the client's socket (`TCP_NOTSENT_LOWAT`, up to one segment
/// more). Without the bound the kernel's send buffer grew to 4 MiB, about
/// 3 MB of it unsent results, for each such client.
#[test]
fn a_client_that_stops_reading_strands_at_most_socket_buffer_in_the_relay() {
    const SB: usize = 64 << 10;
    let (relay, client) = stream_that_stops_reading(|l| {
        l.socket_buffer = SB;
        // Nothing may end the stream while the test looks at it.
        l.idle_timeout = Duration::from_secs(600);
    });
    let ours = (relay.addr(), client.local_addr().unwrap());
    // Filled once what the relay holds stops growing (the upstream's
    // results, about 300 KB a second, back up behind it).
    let mut last = 0;
    let full = wait_until(LIMIT, || {
        std::thread::sleep(Duration::from_millis(300));
        let (unsent, _, _) = socket_state(ours.0, ours.1);
        let steady = unsent > 0 && unsent == last;
        last = unsent;
        steady
    });
    assert!(
        full,
        "the relay's socket to the client kept filling: {last} bytes"
    );
    // About SB, at most one segment past it (64 KiB on loopback; see the
    // same bound towards upstream in resume.rs), at least half of it.
    assert!(
        (SB as u64 / 2..=(SB + (64 << 10)) as u64).contains(&last),
        "the relay holds {last} bytes unsent to a client that stopped reading"
    );
}

/// An upstream that answers a stream's config with results of about 5 KB,
/// as fast as the relay takes them, then holds the connection open.
fn upstream_with_large_results() -> String {
    use tungstenite::Message;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(tcp).unwrap();
        ws.read().unwrap(); // the config
        ws.get_mut()
            .set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let words = "word ".repeat(1000);
        let result = format!(
            r#"{{"tokens":[{{"text":"{words}","is_final":false}}],"final_audio_proc_ms":0,"total_audio_proc_ms":0}}"#
        );
        while ws.send(Message::text(result.clone())).is_ok() {}
        std::thread::sleep(Duration::from_secs(60));
    });
    url
}

/// A raw-audio stream (the resume pump) whose client stops reading while
/// large results come, so the relay's write of them waits on a full
/// socket, part of a frame sent; the stream then ends (idle). The error
/// frame may go only at a frame boundary: what the client reads must
/// still be whole frames, every text one JSON, the last a close.
#[test]
fn an_error_frame_never_lands_inside_a_result_the_client_was_slow_to_read() {
    let url = upstream_with_large_results();
    let mut cfg = relay_config(&url, &[("acct-a", "key-a")]);
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    let token = relay.token("dev-1");
    let mut client =
        upgraded_raw_client(relay.addr(), &format!("Authorization: Bearer {token}\r\n"));
    send_frames(
        &mut client,
        Opcode::Text,
        config_message(None).as_bytes(),
        1,
    );
    // Past the idle timeout, within the relay's wait for room for its
    // error frame.
    std::thread::sleep(Duration::from_millis(1600));
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut data = Vec::new();
    use std::io::Read;
    let _ = client.read_to_end(&mut data);
    let mut at = 0;
    let mut frames = Vec::new();
    while let Ok(Some(h)) =
        clio_frame::frame::parse_header(&data[at..], clio_frame::frame::Sender::Server, 1 << 30)
    {
        let end = at + h.header_len + h.payload_len as usize;
        if end > data.len() {
            break;
        }
        frames.push((h.opcode, data[at + h.header_len..end].to_vec()));
        at = end;
    }
    let bad: Vec<String> = frames
        .iter()
        .filter(|(op, p)| {
            *op == Opcode::Text && serde_json::from_slice::<serde_json::Value>(p).is_err()
        })
        .map(|(_, p)| String::from_utf8_lossy(&p[p.len().saturating_sub(300)..]).to_string())
        .collect();
    assert!(bad.is_empty(), "a text frame that is not JSON: {bad:?}");
    // Either whole frames to the close, or (the relay's write cut inside
    // a result) the start of one result and nothing after it: the
    // connection closed without an error frame, as documented.
    let rest = String::from_utf8_lossy(&data[at..]);
    assert!(
        !rest.contains("error_code"),
        "the relay's error frame inside a result, ending: {:?}",
        &rest[rest.len().saturating_sub(400)..]
    );
    if at == data.len() {
        assert_eq!(frames.last().map(|f| f.0), Some(Opcode::Close));
    }
}

/// A client that goes on sending audio and never reads its results makes
/// upstream stop reading too: its results back up behind the client, the
/// relay stops reading them, and upstream, its own socket full, stops
/// taking audio. That is the client's doing. The stream ends as the
/// client's failure, once `limits.stall_timeout` has passed; it is not
/// counted against upstream, and not resumed on a new upstream
/// connection (where the same client would do the same again). Found
/// with a release build and clients that flooded audio and read nothing:
/// each such stream was logged and counted as an upstream failure (WARN
/// "upstream stopped reading", `errors_total{side="upstream",code="503"}`).
#[test]
fn a_client_that_never_reads_its_results_is_not_an_upstream_stall() {
    use std::io::Write as _;
    use std::time::Instant;
    let (fake, relay, mut client) =
        stream_that_reads_nothing(|l| l.stall_timeout = Duration::from_secs(1));
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 1));
    // Small audio frames, each answered with a larger result: upstream's
    // side fills long before the relay's bound on audio does. Sent until
    // the stream ends (its writes time out while nobody reads them).
    let frame = clio_frame::frame::build_frame(Opcode::Binary, &[7u8; 16], Some([1, 2, 3, 4]));
    let batch = frame.repeat(500);
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.handle.process.live_streams() == 1 && Instant::now() < deadline {
        if client.write_all(&batch).is_err() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(
        relay.wait_idle(LIMIT),
        "the stream of a client that never read did not end"
    );
    counted_as_the_clients_stall(&relay);
    assert_eq!(fake.sessions().len(), 1, "no second upstream connection");
}

/// A client that ends its audio and then does not read its results: the
/// relay waits to hand them over and reads nothing more from upstream,
/// which has answered everything. The quiet that follows is the
/// client's, not upstream's silence after the end of audio: the stream
/// ends after `limits.idle_timeout` as the client's failure, counted
/// against neither upstream nor an account.
#[test]
fn a_client_that_stops_reading_after_its_audio_is_not_a_silent_upstream() {
    let (fake, relay, mut client) =
        stream_that_reads_nothing(|l| l.idle_timeout = Duration::from_secs(1));
    // 2,000 small frames, each answered with a result of about 150 bytes:
    // far more than the client's socket and the relay's bound hold, far
    // less than upstream's side of the relay takes in. Then the end of
    // audio, and nothing more: the client reads nothing.
    send_frames(&mut client, Opcode::Binary, &[7u8; 16], 2000);
    send_frames(&mut client, Opcode::Binary, &[], 1);
    assert!(
        fake.wait_for(LIMIT, |s| s.iter().any(|s| s.empty_frame_received)),
        "upstream got the end of audio"
    );
    assert!(
        relay.wait_idle(LIMIT),
        "the stream of a client that stopped reading did not end"
    );
    counted_as_the_clients_stall(&relay);
    assert!(no_account_blamed(&relay));
}

/// A stream's end counted as the client's stall: its 408, nothing
/// against upstream, no resume.
fn counted_as_the_clients_stall(relay: &Relay) {
    let m = relay.handle.metrics();
    let upstream: Vec<_> = m
        .error_counts()
        .filter(|(side, _, _)| *side == Side::Upstream)
        .collect();
    assert!(
        upstream.is_empty(),
        "the client's stall was counted as upstream's failure: {upstream:?}"
    );
    assert_eq!(m.streams_resumed(), 0, "resumed for the client's stall");
    assert_eq!(
        m.errors(Side::Client, 408),
        1,
        "counted as the client's: {:?}",
        m.error_counts().collect::<Vec<_>>()
    );
}

/// An echoing fake, a relay in front of it with small socket buffers and
/// `limits` tweaked, and a raw client that sent its config and will read
/// nothing.
fn stream_that_reads_nothing(
    limits: impl FnOnce(&mut clio_relay::core::config::LimitsConfig),
) -> (fake_soniox::FakeSoniox, Relay, std::net::TcpStream) {
    let fake = fake(&["key-a"], |c| c.echo = true);
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.limits.socket_buffer = 16 << 10;
    limits(&mut cfg.limits);
    let relay = Relay::start(cfg);
    let token = relay.token("dev-1");
    let mut client =
        upgraded_raw_client(relay.addr(), &format!("Authorization: Bearer {token}\r\n"));
    send_frames(
        &mut client,
        Opcode::Text,
        config_message(None).as_bytes(),
        1,
    );
    (fake, relay, client)
}

/// A client that sends its close frame and then reads nothing while
/// upstream goes on sending results: the relay's write of them waits on
/// the client's full socket, and nothing else moves (the client sends
/// nothing more, upstream's answer to the close waits behind the
/// results). Before, the stream, both sockets and its `max_streams` slot
/// were held until `limits.idle_timeout` (here 600 s); now a write to a
/// client whose close went up waits at most `limits.stall_timeout`, then
/// the stream ends as the client's stall: its usage recorded, its slot
/// and its sockets free, and another stream of the relay untouched.
#[test]
fn a_client_that_closes_and_stops_reading_does_not_hold_its_stream() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tungstenite::Message;
    const ADMIN: &str = "linger-admin-token-0123456789";
    // Connection 0: results as fast as the relay takes them, reading
    // nothing after the config (so the client's close is not answered).
    // Any other: a result per audio frame, `finished` and a close at the
    // end of audio.
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let (url, _) = ws_upstream(move |conn, mut ws| {
        ws.read().unwrap(); // the config
        if conn == 0 {
            ws.get_mut()
                .set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let result = r#"{"tokens":[{"text":"word ","is_final":false}],"final_audio_proc_ms":0,"total_audio_proc_ms":0}"#;
            while !stopped.load(Ordering::Relaxed) {
                let _ = ws.send(Message::text(result));
            }
            return;
        }
        let mut ms = 0;
        while let Ok(m) = ws.read() {
            let Message::Binary(b) = m else { continue };
            let reply = if b.is_empty() {
                serde_json::json!({"tokens": [], "final_audio_proc_ms": ms,
                    "total_audio_proc_ms": ms, "finished": true})
            } else {
                ms += 100;
                serde_json::json!({"tokens": [{"text": "w ", "is_final": true}],
                    "final_audio_proc_ms": ms, "total_audio_proc_ms": ms})
            };
            let _ = ws.send(Message::text(reply.to_string()));
            if b.is_empty() {
                let _ = ws.close(Some(normal_close()));
                while ws.read().is_ok() {}
                return;
            }
        }
    });
    let mut cfg = relay_config(&url, &[("acct-a", "key-a")]);
    cfg.limits.socket_buffer = 16 << 10;
    cfg.limits.idle_timeout = Duration::from_secs(600);
    cfg.limits.stall_timeout = Duration::from_secs(1);
    cfg.server.max_streams = 2;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let mut client = upgraded_raw_client(
        relay.addr(),
        &format!("Authorization: Bearer {}\r\n", relay.token("dev-closed")),
    );
    send_frames(
        &mut client,
        Opcode::Text,
        config_message(None).as_bytes(),
        1,
    );
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 1));
    // Another stream, open while the first one stalls.
    let (mut other, _) = connect(relay.addr(), &relay.token("dev-other"), Via::Header).unwrap();
    other.send(Message::text(config_message(None))).unwrap();
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 2));
    // The close (masked, code 1000), and nothing read ever after.
    let close = clio_frame::frame::build_frame(
        Opcode::Close,
        &clio_frame::frame::close_payload(1000, ""),
        Some([9, 8, 7, 6]),
    );
    use std::io::Write as _;
    client.write_all(&close).unwrap();
    let ours = (relay.addr(), client.local_addr().unwrap());
    let ended = wait_until(LIMIT * 3, || relay.handle.process.live_streams() == 1);
    stop.store(true, Ordering::Relaxed);
    assert!(
        ended,
        "the stream of a client that closed and stopped reading was held"
    );
    // Its socket closed (the 2 s bound on the wait for the client's FIN).
    assert!(
        wait_until(LIMIT, || !matches!(
            tcp_socket(ours.0, ours.1),
            Some((_, true))
        )),
        "the relay's socket to the client is still open: {:?}",
        tcp_socket(ours.0, ours.1)
    );
    let m = relay.handle.metrics();
    assert_eq!(
        m.errors(Side::Client, 408),
        1,
        "counted as the client's stall: {:?}",
        m.error_counts().collect::<Vec<_>>()
    );
    assert!(no_account_blamed(&relay));
    // Its usage recorded.
    let recorded = wait_until(LIMIT, || {
        let (status, body) = http(
            relay.handle.admin_addr,
            "GET",
            "/admin/usage?group_by=device",
            Some(ADMIN),
            None,
        );
        status == 200 && body.contains("dev-closed")
    });
    assert!(recorded, "the stream's usage was not recorded");
    // The other stream goes on to its end, whole.
    let got = stream_session_after_config(&mut other, &audio_frames(5, 1));
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.text(), "w w w w w ");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert!(relay.wait_idle(LIMIT));
}

/// The rest of [`stream_session`] once the config went: audio, the end
/// of audio, and what came back.
fn stream_session_after_config(ws: &mut Ws, frames: &[Vec<u8>]) -> Received {
    use tungstenite::Message;
    for f in frames {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    read_all(ws)
}

/// A client that ends its audio and then reads nothing while upstream
/// goes on sending large results: the relay's write of them waits on the
/// client's full socket, and nothing else moves (the client sends nothing
/// more, upstream's `finished` and close wait behind the results). Before,
/// the stream, both sockets and its `max_streams` slot were held until
/// `limits.idle_timeout` (here 600 s); now a write to a client whose audio
/// has ended waits at most `limits.stall_timeout`, then the stream ends as
/// the client's stall: its usage recorded, its slot and its sockets free,
/// and another stream of the relay untouched.
#[test]
fn a_client_that_ends_its_audio_and_stops_reading_does_not_hold_its_stream() {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tungstenite::Message;
    const ADMIN: &str = "linger-admin-token-0123456789";
    // Connection 0: at the end of audio, results of about 5 KB as fast as
    // the relay takes them. Any other: a result per audio frame,
    // `finished` and a close at the end of audio.
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let (url, _) = ws_upstream(move |conn, mut ws| {
        ws.read().unwrap(); // the config
        let mut ms = 0;
        while let Ok(m) = ws.read() {
            let Message::Binary(b) = m else { continue };
            if conn == 0 && b.is_empty() {
                ws.get_mut()
                    .set_write_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let words = "word ".repeat(1000);
                let result = format!(
                    r#"{{"tokens":[{{"text":"{words}","is_final":false}}],"final_audio_proc_ms":{ms},"total_audio_proc_ms":{ms}}}"#
                );
                while !stopped.load(Ordering::Relaxed) {
                    let _ = ws.send(Message::text(result.clone()));
                }
                return;
            }
            let reply = if b.is_empty() {
                serde_json::json!({"tokens": [], "final_audio_proc_ms": ms,
                    "total_audio_proc_ms": ms, "finished": true})
            } else {
                ms += 100;
                serde_json::json!({"tokens": [{"text": "w ", "is_final": true}],
                    "final_audio_proc_ms": ms, "total_audio_proc_ms": ms})
            };
            let _ = ws.send(Message::text(reply.to_string()));
            if b.is_empty() {
                let _ = ws.close(Some(normal_close()));
                while ws.read().is_ok() {}
                return;
            }
        }
    });
    let mut cfg = relay_config(&url, &[("acct-a", "key-a")]);
    cfg.limits.socket_buffer = 16 << 10;
    cfg.limits.idle_timeout = Duration::from_secs(600);
    cfg.limits.stall_timeout = Duration::from_secs(1);
    cfg.server.max_streams = 2;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let mut client = upgraded_raw_client(
        relay.addr(),
        &format!("Authorization: Bearer {}\r\n", relay.token("dev-ended")),
    );
    send_frames(
        &mut client,
        Opcode::Text,
        config_message(None).as_bytes(),
        1,
    );
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 1));
    // Another stream, open while the first one stalls.
    let (mut other, _) = connect(relay.addr(), &relay.token("dev-other"), Via::Header).unwrap();
    other.send(Message::text(config_message(None))).unwrap();
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 2));
    // Audio, its end, and nothing read ever after.
    for f in audio_frames(3, 2) {
        let frame = clio_frame::frame::build_frame(Opcode::Binary, &f, Some([9, 8, 7, 6]));
        client.write_all(&frame).unwrap();
    }
    send_frames(&mut client, Opcode::Binary, &[], 1);
    let ours = (relay.addr(), client.local_addr().unwrap());
    let ended = wait_until(LIMIT * 3, || relay.handle.process.live_streams() == 1);
    stop.store(true, Ordering::Relaxed);
    assert!(
        ended,
        "the stream of a client that ended its audio and stopped reading was held"
    );
    // Its socket closed (the 2 s bound on the wait for the client's FIN).
    assert!(
        wait_until(LIMIT, || !matches!(
            tcp_socket(ours.0, ours.1),
            Some((_, true))
        )),
        "the relay's socket to the client is still open: {:?}",
        tcp_socket(ours.0, ours.1)
    );
    counted_as_the_clients_stall(&relay);
    assert!(no_account_blamed(&relay));
    // Its usage recorded.
    let recorded = wait_until(LIMIT, || {
        let (status, body) = http(
            relay.handle.admin_addr,
            "GET",
            "/admin/usage?group_by=device",
            Some(ADMIN),
            None,
        );
        status == 200 && body.contains("dev-ended")
    });
    assert!(recorded, "the stream's usage was not recorded");
    // The other stream goes on to its end, whole.
    let got = stream_session_after_config(&mut other, &audio_frames(5, 1));
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.text(), "w w w w w ");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert!(relay.wait_idle(LIMIT));
}

/// A client that reads its results slowly, but reads, after its end of
/// audio: about 10 KB/s, while upstream sends some 40 KB of results at
/// once. A write of the relay's (up to its 32 KiB buffer) then waits on
/// the client's socket longer than `limits.stall_timeout` (2 s here), the
/// client taking a part of it every few hundred milliseconds. The stall
/// bound counts from a write's last progress, so the client gets every
/// result, `finished` and the close, and nothing is counted against it.
/// Before, it counted from the write's start: the stream ended as the
/// client's 408 at the first such write, its last results lost.
#[test]
fn a_client_that_reads_slowly_after_its_end_of_audio_gets_every_result() {
    use std::io::{Read, Write as _};
    use tungstenite::Message;
    const RESULTS: usize = 8;
    let (url, _) = ws_upstream(move |_, mut ws| {
        ws.read().unwrap(); // the config
        while let Ok(m) = ws.read() {
            let Message::Binary(b) = m else { continue };
            if !b.is_empty() {
                continue;
            }
            let words = "word ".repeat(1000);
            for i in 0..RESULTS {
                let ms = 100 * (i + 1);
                let result = format!(
                    r#"{{"tokens":[{{"text":"{words}","is_final":true}}],"final_audio_proc_ms":{ms},"total_audio_proc_ms":{ms}}}"#
                );
                ws.send(Message::text(result)).unwrap();
            }
            let finished = serde_json::json!({"tokens": [], "final_audio_proc_ms": 800,
                "total_audio_proc_ms": 800, "finished": true});
            ws.send(Message::text(finished.to_string())).unwrap();
            let _ = ws.close(Some(normal_close()));
            while ws.read().is_ok() {}
            return;
        }
    });
    let mut cfg = relay_config(&url, &[("acct-a", "key-a")]);
    cfg.limits.socket_buffer = 4 << 10;
    cfg.limits.idle_timeout = Duration::from_secs(600);
    cfg.limits.stall_timeout = Duration::from_secs(2);
    let relay = Relay::start(cfg);
    let mut client = upgraded_raw_client(
        relay.addr(),
        &format!("Authorization: Bearer {}\r\n", relay.token("dev-slow")),
    );
    send_frames(
        &mut client,
        Opcode::Text,
        config_message(None).as_bytes(),
        1,
    );
    for f in audio_frames(3, 2) {
        let frame = clio_frame::frame::build_frame(Opcode::Binary, &f, Some([9, 8, 7, 6]));
        client.write_all(&frame).unwrap();
    }
    send_frames(&mut client, Opcode::Binary, &[], 1);
    /// Reads at most 1 KiB every 100 ms.
    struct Slowly<'a>(&'a mut std::net::TcpStream);
    impl Read for Slowly<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(100));
            let n = buf.len().min(1024);
            self.0.read(&mut buf[..n])
        }
    }
    let frames = raw_read_frames_until_close(&mut Slowly(&mut client));
    let texts = raw_texts(&frames);
    let results = texts.iter().filter(|t| t["tokens"][0]["text"].is_string());
    assert_eq!(
        results.count(),
        RESULTS,
        "{:?}",
        relay.handle.metrics().error_counts().collect::<Vec<_>>()
    );
    assert!(
        texts.last().is_some_and(|t| t["finished"] == true),
        "{:?}",
        texts.last()
    );
    assert_eq!(raw_close_code(&frames), Some(1000));
    let m = relay.handle.metrics();
    assert_eq!(
        m.error_counts().collect::<Vec<_>>(),
        [],
        "an error counted for a client that read"
    );
}
