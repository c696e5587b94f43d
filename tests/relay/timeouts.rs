//! An upstream that accepts TCP but never answers the upgrade (black-holed):
//! a connect timeout holds the account off, so the next stream does not
//! wait the whole timeout on it again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tungstenite::Message;

use crate::util::*;

#[test]
fn a_connect_timeout_holds_the_account_off() {
    // Accepts connections and holds them, silent.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/transcribe-websocket", hole.local_addr().unwrap());
    let reached = Arc::new(AtomicUsize::new(0));
    {
        let reached = reached.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in hole.incoming() {
                reached.fetch_add(1, Ordering::SeqCst);
                held.push(c);
            }
        });
    }
    let mut cfg = relay_config(&url, &[("acct-a", "key-a"), ("acct-b", "key-b")]);
    cfg.upstream.connect_timeout = Duration::from_millis(500);
    // The usage reconciliation would reach the same host (its REST base)
    // about a second after start and count as a connection.
    cfg.usage.reconcile_interval = Duration::ZERO;
    let relay = Relay::start(cfg);

    // The first stream tries both accounts, each for the whole timeout.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev-1"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let got = read_all(&mut ws);
    assert_error_frame(&got, 503, 1011);
    assert_eq!(reached.load(Ordering::SeqCst), 2);

    // Both are held off now: the next stream is told after the waits of
    // a first connection (neither comes back within them), and neither
    // account is tried again.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev-2"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let got = read_all(&mut ws);
    assert_error_frame(&got, 503, 1011);
    assert_eq!(
        reached.load(Ordering::SeqCst),
        2,
        "a held-off account was tried again"
    );
    let (status, _, body) = http_get(relay.handle.admin_addr, "/readyz", "");
    assert_eq!(status, 503, "{body}");
}
