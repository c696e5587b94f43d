//! A deadline for any future on a glommio executor: the data plane's reads
//! and handshakes, the control plane's HTTP client, and a shard's wait for
//! the fleet's store all use this one.

use std::future::Future;
use std::time::Duration;

/// Runs `fut`, giving up after `dur` (`None`).
pub async fn timeout<T>(dur: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::Timer::new(dur).await;
        None
    })
    .await
}
