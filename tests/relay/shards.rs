//! Several shards share the client port; the kernel spreads connections.

use std::time::Duration;

use crate::util::*;

#[test]
fn streams_spread_over_two_shards() {
    let fake = fake(&["key-a"], |c| c.keys[0].max_concurrent = 200);
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.server.shards = 2;
    cfg.accounts[0].max_concurrent_streams = 200;
    let relay = Relay::start(cfg);
    let (addr, token) = (relay.addr(), relay.token("dev"));
    const THREADS: usize = 4;
    const PER_THREAD: usize = 10;
    let results: Vec<Received> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let token = token.clone();
                s.spawn(move || {
                    (0..PER_THREAD)
                        .map(|i| {
                            let (mut ws, _) = connect(addr, &token, Via::Header).unwrap();
                            stream_session(
                                &mut ws,
                                &config_message(None),
                                &audio_frames(3, (t * PER_THREAD + i) as u8),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(results.len(), THREADS * PER_THREAD);
    for r in &results {
        assert!(r.finished(), "{r:?}");
        assert_eq!(r.close_code(), Some(1000), "{r:?}");
    }
    assert!(relay.wait_idle(Duration::from_secs(10)));
    let shards = relay.handle.shard_metrics();
    assert_eq!(shards.len(), 2);
    let totals: Vec<u64> = shards.iter().map(|m| m.streams_total()).collect();
    assert_eq!(
        totals.iter().sum::<u64>(),
        (THREADS * PER_THREAD) as u64,
        "{totals:?}"
    );
    assert!(
        totals.iter().all(|&n| n > 0),
        "one shard took every stream: {totals:?}"
    );
    assert_eq!(
        relay.handle.metrics().streams_total(),
        (THREADS * PER_THREAD) as u64
    );
}
