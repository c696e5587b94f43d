//! Small pieces of a stream's life: its place in the shard's live-stream
//! registry, the audio byte rate of its format, and closing the client.

use std::rc::Rc;

use serde_json::{Map, Value};

use super::CLOSE_WAIT;
use crate::io::{timeout, Duplex};
use crate::shard::{LiveStream, Shard};
use crate::token::Claims;

/// Audio bytes per millisecond for a raw `audio_format` in the config
/// message; 0 for compressed formats, whose duration only upstream knows.
pub(super) fn audio_bytes_per_ms(config: &Map<String, Value>) -> f64 {
    let sample_bytes = match config.get("audio_format").and_then(Value::as_str) {
        Some("pcm_s16le" | "pcm_s16be") => 2.0,
        Some("pcm_f32le" | "pcm_f32be" | "pcm_s32le" | "pcm_s32be") => 4.0,
        Some("mulaw" | "alaw" | "pcm_s8" | "pcm_u8") => 1.0,
        _ => return 0.0,
    };
    let rate = config
        .get("sample_rate")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let channels = config
        .get("num_channels")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    rate * channels * sample_bytes / 1000.0
}

/// Keeps a stream in its shard's registry of live streams while it runs.
pub(super) struct LiveGuard<'a> {
    shard: &'a Shard,
    id: u64,
    pub(super) stream: Rc<LiveStream>,
}

impl<'a> LiveGuard<'a> {
    pub(super) fn register(shard: &'a Shard, claims: &Claims) -> Self {
        let stream = LiveStream::new(&claims.device_id, &claims.token_id);
        let id = shard.next_live_id();
        shard.live.borrow_mut().insert(id, stream.clone());
        LiveGuard { shard, id, stream }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.shard.live.borrow_mut().remove(&self.id);
    }
}

/// Closes the client side after the relay's last frame: FIN, then read and
/// discard until the client closes too (bounded), so no unread byte turns
/// the close into a reset that could cost the client its last frames.
pub(super) async fn close_client(client: &Duplex) {
    let _ = client.close().await;
    let mut scratch = [0u8; 512];
    let _ = timeout(CLOSE_WAIT, async {
        while let Ok(n) = client.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
