//! A client that stops reading does not hold its stream or its connection:
//! what the relay still has to tell it (a pong, the error frame and close
//! of a stream's end) waits a bounded time on its full socket, and then
//! the relay closes. Each client here is a raw TCP socket with a small
//! receive buffer that speaks WebSocket by hand and never reads after the
//! upgrade, so its socket fills (`upgraded_raw_client`).

use std::time::Duration;

use clio_frame::frame::Opcode;

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
