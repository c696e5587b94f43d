//! The Lua scripts the fleet runs in Redis. Each is one round trip and runs
//! atomically, so two nodes can never both take the last slot of a limit.
//!
//! Key layout (every key starts with `clio:`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `clio:nodes` | sorted set | member → lease end (ms, Redis clock); a member is `<node id>/<instance>`, one per running process |
//! | `clio:n:<member>:dev` | hash | device id → live streams on that process |
//! | `clio:n:<member>:acct` | hash | account id → live streams on that process |
//! | `clio:owner` | hash | node id → the member that last registered or renewed a lease under it (two running relays with one node id take turns: each sees the other) |
//! | `clio:rev:dev`, `clio:rev:tok` | sets | revoked device ids, token ids |
//! | `clio:rev:tokat` | sorted set | revoked token id → when Redis took the revocation (ms, Redis clock); dropped with the id once no token can carry it ([`TOKENS_EXPIRE`]) |
//! | `clio:rev:tokskew` | sorted set | revoked token id → the fleet's largest `tokens.clock_skew` before it went down (ms), recorded for every revocation kept when it does ([`TOKENS_EXPIRE`]): kept that much longer than the longest `max_ttl`, however the skews change after |
//! | `clio:rev:hold` | hash | member → its `tokens.max_ttl` + `tokens.clock_skew` (ms): the fleet keeps a token id revocation the longest of these; written with the member's lease ([`REGISTER`], [`HEARTBEAT`]) and by a poll that finds it changed ([`TOKENS_EXPIRE`]) |
//! | `clio:rev:skew` | hash | member → its `tokens.clock_skew` (ms), written with its hold |
//! | `clio:ver` | hash | `rev`, `acct`: bumped on every change; `tokcut`: the latest revocation time (ms, Redis clock) of a token id revocation dropped, tokens issued up to it plus a node's clock skew stay refused; `tokmark`: the latest revocation time plus its clock skew (the larger of the fleet's and its `clio:rev:tokskew`) of one dropped, tokens issued up to it stay refused; `skewseen`: the fleet's largest clock skew as the last [`TOKENS_EXPIRE`] saw it (ms); `epoch`: names this copy of the data (new after a loss); `settle`, `settle_nodes`: after a loss, until when (ms, Redis clock) stream opens wait for that many nodes to register again |
//! | `clio:ends` | stream | "end the live streams of …" requests |
//! | `clio:rate:<device>` | hash | new-stream token bucket (`t`, `ts`) |
//! | `clio:audio:<day>` | hash | device id → audio ms streamed that UTC day |
//! | `clio:accounts` | string | the account set, sealed like `accounts.store` |
//! | `clio:u:<day>:<node>:acct`, `…:dev` | hash | that node's usage that UTC day: `s:<id>` streams, `a:` audio ms, `r:` audio ms by the relay's meter, `u:`/`d:` bytes up/down, `e<code>:` errors |
//! | `clio:u:<day>:nodes` | set | the nodes with usage that day |
//! | `clio:useq` | hash | member → id of the last usage batch it added (a process whose last batch is not there sees the store went back); deleted when the member stops, or by a heartbeat a day after its lease ended |
//!
//! A process's streams count only while its lease in `clio:nodes` is
//! current: a node that dies stops counting `lease_ttl` after its last
//! heartbeat, and its hashes expire with it. Counts and leases are kept
//! by member, not by node id, so a copied config file (two relays with
//! one `node_id`) cannot make one process delete or decrement the other's
//! counts; usage stays by node id (each node's ledger is its own).

use std::sync::LazyLock;

use redis::Value;

use super::OpenAnswer;
use crate::core::devices::Limit;

/// Where a script's arguments go: a pipeline's invocation (the cluster
/// thread) or a bare `EVALSHA` (a shard's own connection).
pub trait Args {
    /// Appends one argument.
    fn push<T: redis::ToRedisArgs>(&mut self, v: T);
}

impl Args for redis::ScriptInvocation<'_> {
    fn push<T: redis::ToRedisArgs>(&mut self, v: T) {
        self.arg(v);
    }
}

impl Args for redis::Cmd {
    fn push<T: redis::ToRedisArgs>(&mut self, v: T) {
        self.arg(v);
    }
}

/// `EVALSHA` of `script` with no keys, its arguments to follow (Redis
/// knows the script once anyone has loaded it; see `SCRIPT LOAD`).
pub fn evalsha(hash: &str) -> redis::Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(hash).arg(0);
    c
}

/// The SHA-1 of [`OPEN`], as `EVALSHA` names it.
pub static OPEN_HASH: LazyLock<String> =
    LazyLock::new(|| redis::Script::new(OPEN).get_hash().to_string());
/// The SHA-1 of [`ADJUST`].
pub static ADJUST_HASH: LazyLock<String> =
    LazyLock::new(|| redis::Script::new(ADJUST).get_hash().to_string());

/// [`PUBLISH_ON`]'s reply.
pub fn accounts_answer(v: &Value) -> super::AccountsAnswer {
    let a = items(v);
    let ver = a.get(1).map_or(0, int);
    if a.first().map(int) == Some(1) {
        return super::AccountsAnswer::Current(ver);
    }
    let set = match a.get(2) {
        Some(Value::BulkString(b)) => Some(b.clone()),
        _ => None,
    };
    super::AccountsAnswer::Moved(ver, set)
}

/// An integer reply, or a number in a string.
pub(crate) fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        Value::SimpleString(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// A string reply.
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        _ => String::new(),
    }
}

/// An array reply's items.
pub(crate) fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) => a,
        _ => &[],
    }
}

/// What [`OPEN`]'s reply says; anything else is [`OpenAnswer::Down`].
pub fn open_answer(v: &Value) -> OpenAnswer {
    let a = items(v);
    match (a.first().map(text).as_deref(), a.get(1)) {
        (Some("ok"), Some(i)) => OpenAnswer::Ok(
            usize::try_from(int(i)).ok(),
            a.get(2).map_or(0, |a| u64::try_from(int(a)).unwrap_or(0)),
        ),
        (Some("settling"), None) => OpenAnswer::Settling,
        (Some("refused"), Some(l)) if text(l) == "no_account" => OpenAnswer::NoAccount,
        (Some("refused"), Some(l)) => {
            let l = text(l);
            OpenAnswer::Refused(
                Limit::ALL
                    .into_iter()
                    .find(|x| x.label() == l)
                    .unwrap_or(Limit::Revoked),
            )
        }
        _ => OpenAnswer::Down,
    }
}

/// Stream open: revocation, daily audio, the device's live streams, the
/// account with the most fleet-wide headroom among the candidates, the
/// new-stream rate; then counts the stream for this node. While the store
/// settles after a loss (see [`RESEED`]) it answers `{"settling"}`: the
/// node decides by its share, as when the store is down.
///
/// ARGV: member, device, token id, max concurrent (0 = none), streams per
/// minute (0 = none), audio cap ms (0 = none), UTC day, lease ttl ms, then
/// pairs of (account id, limit). Returns `{"ok", index, audio}` (index
/// into the pairs, -1 when none were given; the device's audio ms today
/// fleet-wide, 0 when no cap was given) or `{"refused", limit}`.
pub const OPEN: &str = r#"
local node, dev, tok = ARGV[1], ARGV[2], ARGV[3]
local maxc, perm, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local day, ttl = ARGV[7], tonumber(ARGV[8])
if redis.call('SISMEMBER', 'clio:rev:dev', dev) == 1
  or redis.call('SISMEMBER', 'clio:rev:tok', tok) == 1 then
  return {'refused', 'revoked'}
end
local audio = 0
if cap > 0 then
  audio = tonumber(redis.call('HGET', 'clio:audio:' .. day, dev) or '0')
  if audio >= cap then return {'refused', 'daily_audio'} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nodes = redis.call('ZRANGEBYSCORE', 'clio:nodes', now, '+inf')
local settle = redis.call('HMGET', 'clio:ver', 'settle', 'settle_nodes')
if tonumber(settle[1] or '0') > now and #nodes < tonumber(settle[2] or '0') then
  return {'settling'}
end
local function live(kind, id)
  local n = 0
  for _, name in ipairs(nodes) do
    n = n + tonumber(redis.call('HGET', 'clio:n:' .. name .. ':' .. kind, id) or '0')
  end
  return n
end
if maxc > 0 and live('dev', dev) >= maxc then
  return {'refused', 'concurrent'}
end
local best, room = -1, 0
for i = 9, #ARGV, 2 do
  local r = tonumber(ARGV[i + 1]) - live('acct', ARGV[i])
  if r > room then best, room = (i - 9) / 2, r end
end
if #ARGV >= 9 and best < 0 then return {'refused', 'no_account'} end
if perm > 0 then
  local key = 'clio:rate:' .. dev
  local b = redis.call('HMGET', key, 't', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if tokens == nil then tokens, ts = perm, now end
  tokens = math.min(perm, tokens + (now - ts) * perm / 60000)
  if tokens < 1 then
    redis.call('HSET', key, 't', tostring(tokens), 'ts', now)
    redis.call('PEXPIRE', key, 120000)
    return {'refused', 'rate'}
  end
  redis.call('HSET', key, 't', tostring(tokens - 1), 'ts', now)
  redis.call('PEXPIRE', key, 120000)
end
local hd = 'clio:n:' .. node .. ':dev'
redis.call('HINCRBY', hd, dev, 1)
redis.call('PEXPIRE', hd, ttl)
if best >= 0 then
  local ha = 'clio:n:' .. node .. ':acct'
  redis.call('HINCRBY', ha, ARGV[9 + best * 2], 1)
  redis.call('PEXPIRE', ha, ttl)
end
return {'ok', best, audio}
"#;

/// Names the store's copy of the data, and puts back what a loss took.
///
/// A store that lost its data (restarted empty, `FLUSHALL`) has no epoch;
/// the first node to see that starts a new one. A store that went back to
/// an older copy (restarted from an old snapshot) has versions lower than
/// a node has seen. Either way each node offers what it knows: its
/// revocations and account set are written back when their version is
/// newer than the store's (so the newest known state wins, and a node that
/// knows less changes nothing), and when the node asks for it, stream
/// opens are answered `settling` for up to `settle` ms, until as many
/// nodes as it knew before have registered their counts again.
///
/// Token id revocations come back with the times they were taken (ms,
/// Redis clock; 0: not known, [`TOKENS_EXPIRE`] gives them its own) and
/// the clock skews recorded with them (ms), and `tokcut` and `tokmark`
/// never go down.
///
/// ARGV: new epoch, settle ms (0: none), nodes known before, revocation
/// version (-1: offer none), account version (-1: none), sealed account
/// set, the `tokcut` the node knows (0: none), the `tokmark` it knows (0:
/// none), number of revoked devices, the devices, then (token id, time,
/// skew) triples.
/// Returns `{epoch, rev version, account version, settle ms left}`.
pub const RESEED: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('HGET', 'clio:ver', 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', 'clio:ver', 'epoch', epoch)
end
local settle, known = tonumber(ARGV[2]), tonumber(ARGV[3])
if settle > 0 then
  local s = redis.call('HMGET', 'clio:ver', 'settle', 'settle_nodes')
  local till, need = tonumber(s[1] or '0'), tonumber(s[2] or '0')
  if till <= now then need = 0 end
  redis.call('HSET', 'clio:ver', 'settle', math.max(till, now + settle),
    'settle_nodes', math.max(need, known))
end
for i, field in ipairs({'tokcut', 'tokmark'}) do
  local mark = tonumber(ARGV[6 + i])
  if mark > tonumber(redis.call('HGET', 'clio:ver', field) or '0') then
    redis.call('HSET', 'clio:ver', field, mark)
  end
end
local rev = tonumber(redis.call('HGET', 'clio:ver', 'rev') or '0')
local mine = tonumber(ARGV[4])
if mine > rev then
  redis.call('DEL', 'clio:rev:dev', 'clio:rev:tok', 'clio:rev:tokat', 'clio:rev:tokskew')
  local nd = tonumber(ARGV[9])
  for i = 10, 9 + nd do redis.call('SADD', 'clio:rev:dev', ARGV[i]) end
  for i = 10 + nd, #ARGV - 2, 3 do
    redis.call('SADD', 'clio:rev:tok', ARGV[i])
    local at = tonumber(ARGV[i + 1])
    if at > 0 then redis.call('ZADD', 'clio:rev:tokat', at, ARGV[i]) end
    local skew = tonumber(ARGV[i + 2])
    if at > 0 and skew > 0 then redis.call('ZADD', 'clio:rev:tokskew', skew, ARGV[i]) end
  end
  redis.call('HSET', 'clio:ver', 'rev', mine)
  rev = mine
end
local acct = tonumber(redis.call('HGET', 'clio:ver', 'acct') or '0')
mine = tonumber(ARGV[5])
if mine > acct and ARGV[6] ~= '' then
  redis.call('SET', 'clio:accounts', ARGV[6])
  redis.call('HSET', 'clio:ver', 'acct', mine)
  acct = mine
end
local left = tonumber(redis.call('HGET', 'clio:ver', 'settle') or '0') - now
return {epoch, rev, acct, math.max(left, 0)}
"#;

/// Revokes a token id fleet-wide, recording when by Redis's clock (a
/// revocation made again starts over, a skew recorded before with it
/// gone). ARGV: the token id.
pub const REVOKE_TOKEN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SADD', 'clio:rev:tok', ARGV[1])
redis.call('ZADD', 'clio:rev:tokat', now, ARGV[1])
redis.call('ZREM', 'clio:rev:tokskew', ARGV[1])
return 1
"#;

/// Lets go of the token id revocations no token can still carry, on
/// every poll of every node. A node publishes its `tokens.max_ttl` +
/// `tokens.clock_skew` (`clio:rev:hold`) and its `tokens.clock_skew`
/// (`clio:rev:skew`) with its lease ([`REGISTER`], [`HEARTBEAT`]), and
/// here when they changed since (a reload), only while it has a lease;
/// they stay until its member is forgotten a day after its lease ended,
/// or it leaves, or is gone from `clio:nodes`. A revocation is kept,
/// measured on Redis's clock from when Redis took it, the longest
/// published `max_ttl` (a hold less its skew) plus the larger of the
/// largest published skew and the one recorded with it
/// (`clio:rev:tokskew`), and at least the longest published hold. When
/// the largest published skew goes down (a reload, a node gone), every
/// revocation kept records the one before (`skewseen` in `clio:ver`
/// says which), and the revocation version is bumped so that the nodes
/// load them: a skew lowered since never shortens a revocation made
/// before, and nothing is recorded per revocation until then. None goes
/// before every node with a current lease has published, nor while the
/// store settles after a loss (see [`RESEED`]). One with no time, as a
/// store reseeded from an older node gives back, gets this call's time:
/// later, so kept longer. Dropping it raises `tokcut` in `clio:ver` to
/// its time, so every node refuses tokens issued up to that plus its own
/// clock skew, and `tokmark` to its time plus its skew, up to which
/// every node refuses tokens too (all carry an id revoked before, or
/// have expired), and bumps the revocation version so the nodes load
/// the lists again. At most 1000 are looked at per call, the oldest
/// first.
/// ARGV: member, then its hold and clock skew (ms) to publish, if they
/// changed. Returns `{how many went, the longest hold, the longest
/// max_ttl, the largest skew}` (ms).
pub const TOKENS_EXPIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if #ARGV >= 3 and redis.call('ZSCORE', 'clio:nodes', ARGV[1]) then
  redis.call('HSET', 'clio:rev:hold', ARGV[1], ARGV[2])
  redis.call('HSET', 'clio:rev:skew', ARGV[1], ARGV[3])
end
local skews = {}
local sk = redis.call('HGETALL', 'clio:rev:skew')
for i = 1, #sk, 2 do skews[sk[i]] = tonumber(sk[i + 1]) or 0 end
-- A member clio:nodes no longer has (a store gone back to an older
-- copy) is forgotten here, as the heartbeat forgets the others. One
-- that published no skew (an earlier version) counts its whole hold
-- as its max_ttl.
local hold, ttl, skew = 0, 0, 0
local held = redis.call('HGETALL', 'clio:rev:hold')
for i = 1, #held, 2 do
  local m = held[i]
  if m ~= ARGV[1] and not redis.call('ZSCORE', 'clio:nodes', m) then
    redis.call('HDEL', 'clio:rev:hold', m)
    redis.call('HDEL', 'clio:rev:skew', m)
  else
    local h = tonumber(held[i + 1]) or 0
    local s = math.min(skews[m] or 0, h)
    hold = math.max(hold, h)
    ttl = math.max(ttl, h - s)
    skew = math.max(skew, s)
  end
end
-- The fleet's skew went down since the last call: each revocation kept
-- records the one before (if its own is not larger yet), and the nodes
-- load the lists again, with the skews.
local seen = tonumber(redis.call('HGET', 'clio:ver', 'skewseen') or '0')
if skew < seen and redis.call('ZCARD', 'clio:rev:tokat') > 0 then
  for _, id in ipairs(redis.call('ZRANGE', 'clio:rev:tokat', 0, -1)) do
    if tonumber(redis.call('ZSCORE', 'clio:rev:tokskew', id) or '0') < seen then
      redis.call('ZADD', 'clio:rev:tokskew', seen, id)
    end
  end
  redis.call('HINCRBY', 'clio:ver', 'rev', 1)
end
if skew ~= seen then redis.call('HSET', 'clio:ver', 'skewseen', skew) end
if redis.call('SCARD', 'clio:rev:tok') > redis.call('ZCARD', 'clio:rev:tokat') then
  for _, id in ipairs(redis.call('SMEMBERS', 'clio:rev:tok')) do
    if not redis.call('ZSCORE', 'clio:rev:tokat', id) then
      redis.call('ZADD', 'clio:rev:tokat', now, id)
    end
  end
end
-- Not while the store settles after a loss (the nodes are publishing
-- again), nor before every node with a current lease has published.
if tonumber(redis.call('HGET', 'clio:ver', 'settle') or '0') > now then
  return {0, hold, ttl, skew}
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', 'clio:nodes', now, '+inf')) do
  if redis.call('HEXISTS', 'clio:rev:hold', m) == 0 then return {0, hold, ttl, skew} end
end
local old = redis.call('ZRANGEBYSCORE', 'clio:rev:tokat', '-inf', now - hold,
  'WITHSCORES', 'LIMIT', 0, 1000)
local cut = tonumber(redis.call('HGET', 'clio:ver', 'tokcut') or '0')
local mark = tonumber(redis.call('HGET', 'clio:ver', 'tokmark') or '0')
local gone = 0
for i = 1, #old, 2 do
  local id, at = old[i], tonumber(old[i + 1])
  local s = math.max(skew, tonumber(redis.call('ZSCORE', 'clio:rev:tokskew', id) or '0'))
  if at + math.max(hold, ttl + s) <= now then
    redis.call('SREM', 'clio:rev:tok', id)
    redis.call('ZREM', 'clio:rev:tokat', id)
    redis.call('ZREM', 'clio:rev:tokskew', id)
    cut = math.max(cut, at)
    mark = math.max(mark, at + s)
    gone = gone + 1
  end
end
if gone == 0 then return {0, hold, ttl, skew} end
redis.call('HSET', 'clio:ver', 'tokcut', cut, 'tokmark', mark)
redis.call('HINCRBY', 'clio:ver', 'rev', 1)
return {gone, hold, ttl, skew}
"#;

/// Stores an account set changed while the store was unreachable, only
/// if no node stored one since (the version is still `base`). A store
/// that holds this very set took it already, from the call whose answer
/// was lost (each seal has a nonce of its own, so no other node's set is
/// the same bytes): its version is this set's.
/// ARGV: base version, the sealed set. Returns the new version, or -1.
pub const PUBLISH_IF: &str = r#"
local ver = tonumber(redis.call('HGET', 'clio:ver', 'acct') or '0')
if ver ~= tonumber(ARGV[1]) then
  if redis.call('GET', 'clio:accounts') == ARGV[2] then
    return ver
  end
  return -1
end
redis.call('SET', 'clio:accounts', ARGV[2])
return redis.call('HINCRBY', 'clio:ver', 'acct', 1)
"#;

/// Stores an account set changed on this node, only if the store's set
/// is still the version it was changed from (so a change another node
/// stored meanwhile is not written over); with no set, only compares.
/// ARGV: base version, then the sealed set (absent: compare only).
/// Returns `{1, version}` (stored, or the same version), or
/// `{0, version, set}`: the store's version and set, which apply first.
pub const PUBLISH_ON: &str = r#"
local ver = tonumber(redis.call('HGET', 'clio:ver', 'acct') or '0')
if ver ~= tonumber(ARGV[1]) then
  return {0, ver, redis.call('GET', 'clio:accounts')}
end
if #ARGV < 2 then
  return {1, ver}
end
redis.call('SET', 'clio:accounts', ARGV[2])
return {1, redis.call('HINCRBY', 'clio:ver', 'acct', 1)}
"#;

/// Adds each device's new audio to the fleet's daily total, which never
/// falls below what the node last knew plus that audio (a store that lost
/// the total, or went back to an older one, gets it back). ARGV: UTC day,
/// then (device, new audio ms, known fleet total ms with it) triples.
/// Returns each device's total.
pub const AUDIO: &str = r#"
local key = 'clio:audio:' .. ARGV[1]
local out = {}
for i = 2, #ARGV, 3 do
  local n = redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
  local floor = tonumber(ARGV[i + 2])
  if n < floor then
    redis.call('HSET', key, ARGV[i], floor)
    n = floor
  end
  out[#out + 1] = n
end
redis.call('EXPIRE', key, 2 * 86400)
return out
"#;

/// Streams ended (or holds given back): this node's counts change. One
/// call for every change a batch carries.
/// ARGV: member, then for each change: kind (`dev` or `acct`), id, delta.
pub const ADJUST: &str = r#"
local node = ARGV[1]
for i = 2, #ARGV, 3 do
  local h = 'clio:n:' .. node .. ':' .. ARGV[i]
  local n = redis.call('HINCRBY', h, ARGV[i + 1], tonumber(ARGV[i + 2]))
  if n <= 0 then redis.call('HDEL', h, ARGV[i + 1]) end
end
return (#ARGV - 1) / 3
"#;

/// Heartbeat: extends this process's lease and its hashes' lifetime,
/// publishes its token bounds again (`clio:rev:hold`, `clio:rev:skew`:
/// a store gone back to an older copy may hold older ones), and
/// forgets members whose lease ended over a day ago (up to 100 a call):
/// their entries in `clio:nodes`, `clio:useq`, `clio:rev:hold` and `clio:rev:skew`, which nothing else
/// deletes for a process that died (its count hashes expire by themselves).
/// Returns `{lapsed, nodes alive, shared, now}`: `lapsed` is 1 when the lease
/// had already ended (the node was cut off or Redis lost its data), so the
/// node must re-register what it holds; `shared` is 1 when another member
/// with a current lease registered or renewed under this node id since
/// this one last did (another running relay has the same `node_id`: a
/// process that died writes nothing more); `now` is Redis's clock (ms),
/// which the node compares with its own.
/// ARGV: member, lease ttl ms, node id, its hold ms, its clock skew ms.
pub const HEARTBEAT: &str = r#"
local node, ttl, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = tonumber(redis.call('ZSCORE', 'clio:nodes', node) or '0')
local prev = redis.call('HGET', 'clio:owner', id)
local shared = 0
if prev and prev ~= node
  and tonumber(redis.call('ZSCORE', 'clio:nodes', prev) or '0') >= now then
  shared = 1
end
redis.call('HSET', 'clio:owner', id, node)
redis.call('ZADD', 'clio:nodes', now + ttl, node)
redis.call('HSET', 'clio:rev:hold', node, ARGV[4])
redis.call('HSET', 'clio:rev:skew', node, ARGV[5])
-- A member whose lease ended a day ago is gone (a process that died; one
-- that stopped left already): its lease and last usage batch id go.
local gone = redis.call('ZRANGEBYSCORE', 'clio:nodes', '-inf', now - 86400000, 'LIMIT', 0, 100)
for _, m in ipairs(gone) do
  redis.call('ZREM', 'clio:nodes', m)
  redis.call('HDEL', 'clio:useq', m)
  redis.call('HDEL', 'clio:rev:hold', m)
  redis.call('HDEL', 'clio:rev:skew', m)
end
redis.call('PEXPIRE', 'clio:n:' .. node .. ':dev', ttl)
redis.call('PEXPIRE', 'clio:n:' .. node .. ':acct', ttl)
local lapsed = 0
if old < now then lapsed = 1 end
return {lapsed, redis.call('ZCOUNT', 'clio:nodes', now, '+inf'), shared, now}
"#;

/// Re-registration: replaces this node's counts with what it holds (so a
/// node coming back neither counts twice nor leaves a count behind),
/// renews its lease and publishes its token bounds with it (so no node
/// has a lease and no bound). ARGV: member, lease ttl ms, number of
/// device pairs, node id, its hold ms, its clock skew ms, then (device,
/// count) pairs, then (account, count) pairs.
pub const REGISTER: &str = r#"
local node, ttl, ndev = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local hd, ha = 'clio:n:' .. node .. ':dev', 'clio:n:' .. node .. ':acct'
redis.call('DEL', hd, ha)
for i = 7, 6 + ndev * 2, 2 do redis.call('HSET', hd, ARGV[i], ARGV[i + 1]) end
for i = 7 + ndev * 2, #ARGV, 2 do redis.call('HSET', ha, ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', hd, ttl)
redis.call('PEXPIRE', ha, ttl)
redis.call('HSET', 'clio:owner', ARGV[4], node)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', 'clio:nodes', now + ttl, node)
redis.call('HSET', 'clio:rev:hold', node, ARGV[5])
redis.call('HSET', 'clio:rev:skew', node, ARGV[6])
return redis.call('ZCOUNT', 'clio:nodes', now, '+inf')
"#;

/// The nodes with a current lease (what the local shares divide by),
/// each account's live streams summed over them (for the alerts), and
/// whether this member (`ARGV[1]`) has a current lease: one that is gone
/// (`clio:nodes` deleted or evicted) must register again, or its streams
/// would not count until its next heartbeat. Also how many other
/// processes of this node (`ARGV[2]`, the node id: members
/// `<node_id>/<12 hex digits>`, and the bare node id, under which
/// relays before per-process leases held theirs) hold a current lease:
/// the other side of a hand-over restart (an upgrade from such a relay
/// too), or a dead process's lease not yet ended.
/// Returns `{nodes, {account, live, account, live, ...}, mine, others}`.
pub const NODES: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nodes = redis.call('ZRANGEBYSCORE', 'clio:nodes', now, '+inf')
local live = {}
for _, name in ipairs(nodes) do
  local h = redis.call('HGETALL', 'clio:n:' .. name .. ':acct')
  for i = 1, #h, 2 do
    live[h[i]] = (live[h[i]] or 0) + tonumber(h[i + 1])
  end
end
local out = {}
for id, n in pairs(live) do
  out[#out + 1] = id
  out[#out + 1] = n
end
local mine = 0
if tonumber(redis.call('ZSCORE', 'clio:nodes', ARGV[1]) or '0') >= now then mine = 1 end
local others, prefix = 0, ARGV[2] .. '/'
for _, name in ipairs(nodes) do
  if name ~= ARGV[1] and (name == ARGV[2]
    or (#name == #prefix + 12 and string.sub(name, 1, #prefix) == prefix)) then
    others = others + 1
  end
end
return {#nodes, out, mine, others}
"#;

/// The part of [`USAGE`] and [`USAGE_MAX`] they share: every entry's
/// counters given to the script's `apply(hash, field, n)`, each hash's
/// and day's expiry, and the batch id recorded as the node's last.
/// A macro, not a `const`, so that `concat!` can join it to each
/// script's own beginning.
macro_rules! usage_entries {
    () => {
        r#"
local node, member, batch = ARGV[1], ARGV[2], ARGV[3]
local keep = {acct = tonumber(ARGV[4]), dev = tonumber(ARGV[5])}
local names = {'s', 'a', 'r', 'u', 'd'}
local days = {}
for i = 6, #ARGV, 9 do
  local day, grp, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local h = 'clio:u:' .. day .. ':' .. node .. ':' .. grp
  for j = 1, 5 do
    local n = ARGV[i + 2 + j]
    if n ~= '0' then apply(h, names[j] .. ':' .. id, n) end
  end
  for code, n in string.gmatch(ARGV[i + 8], '(%d+):(%d+)') do
    apply(h, 'e' .. code .. ':' .. id, n)
  end
  redis.call('EXPIRE', h, keep[grp])
  days[day] = true
end
for day in pairs(days) do
  local k = 'clio:u:' .. day .. ':nodes'
  redis.call('SADD', k, node)
  redis.call('EXPIRE', k, keep.acct)
end
redis.call('HSET', 'clio:useq', member, batch)
return 1
"#
    };
}

/// Usage: adds a batch of one node's per-day counters (deltas) to its
/// hashes, once. A batch whose id is the node's last one was already added
/// (its answer was lost) and is skipped, so a retry never counts twice.
/// ARGV: node, member (whose last batch id `clio:useq` keeps), batch id,
/// seconds to keep account hashes, seconds to keep device hashes, then
/// per entry: day, `acct` or `dev`, id, streams, audio
/// ms, audio ms (relay meter), bytes up, bytes down, errors as
/// `code:n,code:n`. Returns 1, or 0 for a batch already added.
pub const USAGE: &str = concat!(
    r#"
if redis.call('HGET', 'clio:useq', ARGV[2]) == ARGV[3] then return 0 end
local function apply(h, f, n)
  redis.call('HINCRBY', h, f, n)
end"#,
    usage_entries!()
);

/// Usage merge: raises each of one node's per-day counters to the value
/// given, where Redis holds less (a counter it holds more of stays). A
/// relay's first batches after it starts, from its own ledger: what a
/// previous process of the node metered and never added (it died, or
/// stopped, while Redis did not answer) is in its ledger and not in Redis;
/// what it added and its ledger lost at the crash is in Redis. Each is a
/// part of the node's usage; the larger, counter by counter, is kept.
/// Repeating it changes nothing. The ARGV and the answer are
/// [`USAGE`]'s; the batch id is recorded as the node's last the same way.
pub const USAGE_MAX: &str = concat!(
    r#"
local function apply(h, f, n)
  if tonumber(n) > tonumber(redis.call('HGET', h, f) or '0') then
    redis.call('HSET', h, f, n)
  end
end"#,
    usage_entries!()
);
