//! Small pieces of a stream's life: its place in the shard's live-stream
//! registry, the audio byte rate of its format, the config message as
//! upstream gets it, and closing its connections.

use std::rc::Rc;

use serde_json::value::RawValue;

use super::config::{members, Fields};
use crate::core::token::Claims;
use crate::dataplane::io::{timeout, Conn, Duplex, Tcp};
use crate::dataplane::shard::{LiveStream, Shard, StopReason};
use crate::dataplane::uring::CloseReply;

/// Audio bytes per millisecond for a raw `audio_format` in the config
/// message; 0 for compressed formats, whose duration only upstream knows,
/// and for a raw one without a rate [`raw_audio_rate`] takes. The
/// client's numbers: a rate that is no whole number (`1e-300`) divided
/// the audio into more milliseconds than a `u64` holds, so upstream's
/// figure meters such a stream.
pub(super) fn audio_bytes_per_ms(config: &Fields) -> f64 {
    raw_audio_rate(config).map_or(0.0, |(per_sec, _)| per_sec as f64 / 1000.0)
}

/// A raw `audio_format`'s bytes per second and bytes per sample frame (all
/// channels), from whole-number `sample_rate` and `num_channels`; `None`
/// for compressed formats and `auto`, which cannot be cut mid-stream.
pub(super) fn raw_audio_rate(config: &Fields) -> Option<(u64, u64)> {
    let sample_bytes = match config.audio_format.as_deref()? {
        "pcm_s16le" | "pcm_s16be" => 2,
        "pcm_f32le" | "pcm_f32be" | "pcm_s32le" | "pcm_s32be" => 4,
        "mulaw" | "alaw" | "pcm_s8" | "pcm_u8" => 1,
        _ => return None,
    };
    let rate = config.sample_rate?;
    let channels = config.num_channels?;
    // The client's numbers: a product that overflows is no rate (upstream
    // judges the config; the stream keeps no resume copy).
    let frame = channels.checked_mul(sample_bytes)?;
    let per_sec = rate.checked_mul(frame)?;
    (rate > 0 && frame > 0).then_some((per_sec, frame))
}

/// Keeps a stream in its shard's registry of live streams while it runs,
/// until its usage is recorded: a stop that ends the live streams waits
/// for the process's count of them to fall to 0
/// ([`ProcessState::wait_all_recorded`](crate::dataplane::process::ProcessState::wait_all_recorded)).
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
        shard.process.stream_registered();
        // Past the drain deadline, `ShardMsg::Drain` may have gone by
        // already (the stream was admitted before, and its open waited):
        // it ends as the streams that message stopped do.
        if shard.process.finalizing() {
            stream.stop(StopReason::Drain);
        }
        LiveGuard { shard, id, stream }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.shard.live.borrow_mut().remove(&self.id);
        self.shard.process.stream_unregistered();
    }
}

/// Closes a stream's connection once its peer has closed its side, read
/// and discarded by the shard's data plane (bounded in time and bytes,
/// `uring/closing.rs`), so the stream's task ends now. Two uses:
///
/// - the client, after the relay's last frame and its FIN
///   ([`Duplex::close`]): no byte the client still sends is left unread,
///   which would turn the close into a reset that could cost the client
///   its last frames;
/// - upstream, after a close frame went up: upstream, the server, closes
///   the TCP connection first, as RFC 6455 §7.1.1 has it. The side that
///   closes first keeps the connection's TIME_WAIT for a minute. Closing
///   first, the relay kept one for every stream, each on an ephemeral port
///   towards the same upstream address; with Linux's defaults (no reuse
///   beyond loopback) those ports run out at about 28,000 stream opens a
///   minute to one upstream address. Its FIN goes when it closes: the
///   relay sends nothing more (no TLS close_notify either) once upstream
///   has closed.
pub(super) fn close_after_peer(conn: Duplex) {
    match conn.into_inner().into_tcp() {
        Some(Tcp::Ring(socket)) => socket.close_after_peer(),
        // Off the data plane (a stream's sockets never are): closed now.
        Some(Tcp::Glommio(_)) => {}
        // Reset already (`Duplex::reset`).
        None => {}
    }
}

/// Ends the client's connection after the relay's last frame. With
/// `reply` (that frame was a close the client has not answered), a plain
/// connection's FIN waits in the data plane for the client's close reply
/// (`uring/closing.rs`): a proxy that has the relay's FIN resets the
/// client at its next byte, and a client whose reply or in-flight audio
/// meets that reset reports 1006, its close frame unread. Otherwise (and
/// over TLS, whose close_notify is a write of the stream's) the FIN goes
/// now; either way the socket then closes after its peer.
pub(super) async fn end_client(client: Duplex, reply: Option<CloseReply>) {
    match (client.into_inner(), reply) {
        (Conn::Plain(Tcp::Ring(socket)), Some(reply)) => socket.close_after_reply(reply),
        (conn, _) => {
            let client = Duplex::new(conn);
            let _ = timeout(super::LAST_FRAMES_WAIT, client.close()).await;
            close_after_peer(client);
        }
    }
}

/// The client's config as upstream gets it (before any key): without the
/// client's `api_key` (its session token), and with a `client_reference_id`
/// (the stream id) when the client gave none. `config` is the client's
/// text (a JSON object); every other member, its name and value, goes up
/// as the client wrote it (a number's digits included, and what a JSON map
/// cannot hold: a lone surrogate escape, `1e400`), not as a JSON map would
/// write it again. A JSON object, its members in the order of their names.
pub fn upstream_config_text(config: &[u8], stream_id: &str) -> Box<[u8]> {
    // A repeated member is the last one, as a JSON map reads it (the one
    // whose token the relay checked); names compare with their escapes
    // read (`"api\u005fkey"` is `api_key`). The caller has read `config`
    // as a JSON object already.
    let id = serde_json::to_string(stream_id).expect("a string serializes");
    let id = RawValue::from_string(id).expect("a JSON string");
    let name: &RawValue = serde_json::from_str(r#""client_reference_id""#).expect("a JSON string");
    let text = std::str::from_utf8(config).unwrap_or_default();
    let mut members = members(text).unwrap_or_default();
    members.remove(b"api_key".as_slice());
    // `null` is no id: upstream would log the stream under none, and the
    // relay's record (its stream id) would match no entry of upstream's.
    let given = members.get(b"client_reference_id".as_slice());
    if given.is_none_or(|(_, v)| v.get() == "null") {
        members.insert(b"client_reference_id".to_vec(), (name, &id));
    }
    let mut out = Vec::with_capacity(config.len() + id.get().len() + 32);
    out.push(b'{');
    for (i, (name, value)) in members.values().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(name.get().as_bytes());
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    out.push(b'}');
    out.into_boxed_slice()
}

/// `config` (a JSON object from [`upstream_config_text`]) with `api_key`
/// set to `key`, as its first member.
pub fn with_api_key(config: &[u8], key: &str) -> Vec<u8> {
    debug_assert!(config.first() == Some(&b'{') && config.last() == Some(&b'}'));
    let mut out = Vec::with_capacity(config.len() + key.len() + 16);
    out.extend_from_slice(b"{\"api_key\":");
    serde_json::to_writer(&mut out, key).expect("a string serializes");
    if config.len() > 2 {
        out.push(b',');
    }
    out.extend_from_slice(&config[1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_config_upstream_gets() {
        let client = br#"{"model": "m", "api_key": "clio1.token"}"#;
        let text = upstream_config_text(client, "s-1");
        let v: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"model": "m", "client_reference_id": "s-1"})
        );

        let keyed: Value = serde_json::from_slice(&with_api_key(&text, "k\"ey")).unwrap();
        assert_eq!(
            keyed,
            serde_json::json!({"model": "m", "client_reference_id": "s-1", "api_key": "k\"ey"})
        );
        let own = br#"{"client_reference_id": "mine"}"#;
        let v: Value = serde_json::from_slice(&upstream_config_text(own, "s-2")).unwrap();
        assert_eq!(v["client_reference_id"], "mine");
        let null = br#"{"client_reference_id": null}"#;
        let v: Value = serde_json::from_slice(&upstream_config_text(null, "s-3")).unwrap();
        assert_eq!(v["client_reference_id"], "s-3");
        let empty: Value = serde_json::from_slice(&with_api_key(b"{}", "k")).unwrap();
        assert_eq!(empty, serde_json::json!({"api_key": "k"}));
    }
}
