//! Connections without a token on the request (the token comes in the first
//! message): their own bounded pool, no `max_streams` slot until the token
//! is verified, and one deadline for the first message that pings do not
//! extend.

use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// Pings every connection until each has been ended by the relay (or
/// `limit` passes), keeping the `live` streams alive meanwhile; returns the
/// error code each connection got, if any.
fn ping_until_ended(conns: &mut [Ws], live: &mut [Ws], limit: Duration) -> Vec<Option<u64>> {
    let mut codes = vec![None; conns.len()];
    let mut ended = vec![false; conns.len()];
    for ws in conns.iter_mut() {
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    let end = Instant::now() + limit;
    while ended.iter().any(|e| !e) && Instant::now() < end {
        for ws in live.iter_mut() {
            ws.send(Message::text(r#"{"type":"keepalive"}"#)).unwrap();
        }
        for (i, ws) in conns.iter_mut().enumerate() {
            if ended[i] {
                continue;
            }
            let _ = ws.send(Message::Ping(b"still here".to_vec().into()));
            loop {
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        codes[i] = v["error_code"].as_u64();
                    }
                    Ok(Message::Close(_)) => {
                        ended[i] = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(_) => {
                        ended[i] = true;
                        break;
                    }
                }
            }
        }
    }
    codes
}

#[test]
fn tokenless_connections_take_no_stream_slot_and_pings_do_not_keep_them() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.server.max_streams = 2;
    cfg.limits.max_unauthenticated_per_address = 3;
    cfg.limits.idle_timeout = Duration::from_secs(2);
    let relay = Relay::start(cfg);

    // Three silent connections without a token: upgraded, and holding no
    // stream slot while they wait.
    let mut silent: Vec<Ws> = (0..3)
        .map(|i| {
            connect(relay.addr(), "", Via::Nowhere)
                .unwrap_or_else(|e| panic!("token-less connection {i} refused: {e:?}"))
                .0
        })
        .collect();
    // A fourth from the same address is over the per-address bound.
    let (status, body) = refused_upgrade(connect(relay.addr(), "", Via::Nowhere));
    assert_eq!(status, 429, "{body}");
    assert_http_error_body(&body, 429);
    assert!(wait_until(LIMIT, || relay.handle.metrics().unauthenticated == 3));
    let (_, _, text) = http_get(relay.handle.admin_addr, "/metrics", "");
    assert!(
        text.contains("clio_relay_unauthenticated_connections{shard=\"0\"} 3"),
        "{text}"
    );
    assert_eq!(relay.handle.process.live_streams(), 0);

    // Real clients still get both stream slots.
    let mut streams: Vec<Ws> = (0..2)
        .map(|i| {
            connect(relay.addr(), &relay.token(&format!("dev-{i}")), Via::Header)
                .expect("a client with a token gets a stream")
                .0
        })
        .collect();
    for ws in &mut streams {
        ws.send(Message::text(config_message(None))).unwrap();
    }
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2));

    // The silent ones ping, but their one deadline for the first message
    // passes all the same: 408.
    let codes = ping_until_ended(&mut silent, &mut streams, Duration::from_secs(30));
    assert_eq!(codes, vec![Some(408); 3]);
    assert!(wait_until(LIMIT, || relay.handle.metrics().unauthenticated == 0));

    // A client whose token comes in the first message, while both slots are
    // taken: upgraded, then refused with 503 once its token is known.
    let token = relay.token("dev-late");
    let (mut late, _) = connect(relay.addr(), "", Via::FirstMessage).unwrap();
    late.send(Message::text(config_message(Some(&token))))
        .unwrap();
    let got = read_all(&mut late);
    assert_error_frame(&got, 503, 1013);

    // With a slot free again, the same path streams.
    let mut done = streams.pop().unwrap();
    done.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert!(read_all(&mut done).finished());
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() < 2));
    let (mut ws, _) = connect(relay.addr(), "", Via::FirstMessage).unwrap();
    let got = stream_session(&mut ws, &config_message(Some(&token)), &audio_frames(2, 1));
    assert!(got.finished(), "{got:?}");
}
