//! Before a relay joins the fleet: is its `node_id` another running
//! relay's? Usage is kept by node id, so two running processes under one
//! id (a copied config file) would mix their usage; the start refuses.

use std::time::{Duration, Instant};

use super::timed::Timed;
use super::{client, POLL};
use crate::core::config::ClusterConfig;

/// The member that last registered or renewed under `ARGV[1]` (a node
/// id) and the end of its lease, if that lease is current; `{}` if none.
const OWNER: &str = r#"
local m = redis.call('HGET', 'clio:owner', ARGV[1])
if not m then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = tonumber(redis.call('ZSCORE', 'clio:nodes', m) or '0')
if s < now then return {} end
return {m, tostring(s)}
"#;

/// Before a relay joins the fleet: whether another running relay already
/// has `cfg.node_id` (a copied config file). Usage is kept by node id, so
/// two running processes under one id would mix their usage in one row
/// and, after Redis loses its data, each would delete the other's when it
/// gives its own back. A member under this id with a current lease is
/// either such a twin or this node's own previous process, dead (killed,
/// crashed) before its lease ended: a twin renews its lease within a
/// heartbeat (a third of `lease_ttl`), a dead process never does, so the
/// check watches the lease that long. `Err` names the conflict; a Redis
/// that cannot be reached or answer is no conflict (the cluster thread
/// connects later, and its heartbeats still report a twin). `watching`
/// is told how long the watch may take, when it begins (under systemd,
/// the caller asks for that much more start time).
pub fn check_node_id(
    cfg: &ClusterConfig,
    watching: impl FnOnce(Duration),
) -> std::io::Result<Result<(), String>> {
    let client = client(cfg)?;
    let mut known = super::timed::KnownAddrs::default();
    let Ok(mut con) = Timed::connect(
        client.get_connection_info(),
        cfg.ca.as_deref(),
        cfg.timeout,
        &mut known,
    ) else {
        return Ok(Ok(()));
    };
    let owner = redis::Script::new(OWNER);
    let mut ask = || owner.arg(&cfg.node_id).invoke::<Vec<String>>(&mut con).ok();
    let Some(first) = ask() else {
        return Ok(Ok(()));
    };
    if first.is_empty() {
        return Ok(Ok(()));
    }
    // A heartbeat is due a third of a lease after the last, checked every
    // poll, and may wait for a slow call.
    let watch = cfg.lease_ttl / 3 + POLL + 2 * cfg.timeout + Duration::from_millis(500);
    let until = Instant::now() + watch;
    tracing::info!(node = %cfg.node_id, seconds = watch.as_secs_f64(), "a relay with this cluster.node_id holds a lease: waiting to see whether it is still running");
    watching(watch);
    while Instant::now() < until {
        std::thread::sleep(POLL);
        match ask() {
            None => return Ok(Ok(())),
            Some(now) if now.is_empty() => return Ok(Ok(())),
            Some(now) if now != first => {
                return Ok(Err(format!(
                    "cluster.node_id \"{}\": another running relay has it (it renewed its lease in the fleet's Redis just now); give each node its own node_id",
                    cfg.node_id
                )))
            }
            Some(_) => {}
        }
    }
    Ok(Ok(()))
}
