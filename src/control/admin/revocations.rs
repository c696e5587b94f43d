//! Revocations on the admin thread: `/admin/revocations`, and outside a
//! fleet their file in the state directory (`revocations.json`), written
//! at each change and read before the shards start. In a fleet the
//! shared store keeps them (`core::cluster`).
//!
//! Outside a fleet a token id revocation expires once no token carrying
//! the id can still be valid: `tokens.max_ttl` plus `tokens.clock_skew`
//! after it was made ([`expire`], once a second; `core::devices`). In a
//! fleet Redis lets them go (`core::cluster::scripts::TOKENS_EXPIRE`) and
//! each node takes the lists it loads.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;

use super::{Admin, Request};
use crate::core::token::valid_device_id;
use crate::dataplane::http;
use crate::dataplane::shard::ShardMsg;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    device_id: Option<String>,
    token_id: Option<String>,
    /// Many at once: one save and one answer for all (a wave of lost
    /// devices), where one request each rewrote the whole file each time.
    #[serde(default)]
    device_ids: Vec<String>,
    #[serde(default)]
    token_ids: Vec<String>,
    #[serde(default)]
    end_live_streams: bool,
}

/// What a body asks the error names.
const WANT: &str = "want {\"device_id\"?, \"token_id\"?, \"device_ids\"?: [...], \"token_ids\"?: [...], \"end_live_streams\"?}";

impl RevokeBody {
    /// The device ids and the token ids it names, each once, in the order
    /// given (`device_id` before `device_ids`); an error naming the first
    /// id no token can carry (it would be kept and match nothing).
    fn ids(self) -> Result<(Vec<String>, Vec<String>), String> {
        let mut out = (Vec::new(), Vec::new());
        for (name, one, many, list) in [
            ("device_id", self.device_id, self.device_ids, &mut out.0),
            ("token_id", self.token_id, self.token_ids, &mut out.1),
        ] {
            let named = one.map(|id| (name.to_string(), id));
            let listed = many
                .into_iter()
                .enumerate()
                .map(|(i, id)| (format!("{name}s[{i}]"), id));
            let mut seen = std::collections::HashSet::new();
            for (at, id) in named.into_iter().chain(listed) {
                if !valid_device_id(&id) {
                    return Err(format!(
                        "{at}: 1 to 128 characters of A-Z a-z 0-9 . _ : @ - (as in tokens)"
                    ));
                }
                if seen.insert(id.clone()) {
                    list.push(id);
                }
            }
        }
        Ok(out)
    }
}

/// `GET`, `POST` and `DELETE /admin/revocations`. In a fleet the change
/// goes to the shared store too, and every node applies it (and ends the
/// live streams, when asked) within a poll interval.
pub(super) async fn revocations(admin: &Admin, req: &Request<'_>) -> Vec<u8> {
    let devices = &admin.process.devices;
    // Alone, a change goes from taking in the file to its own write
    // ending before the next begins (see `SharedFile::changing`); a GET
    // takes in the file only when no change is under way.
    let alone = admin.process.fleet.get().is_none();
    let changing = &admin.revocations_file.changing;
    let _one_at_a_time = match req.method {
        "GET" => changing.try_acquire_permit(1).ok(),
        _ if alone => changing.acquire_permit(1).await.ok(),
        _ => None,
    };
    if _one_at_a_time.is_some() {
        // Onto the lists another process saved, so this change does not
        // write over one made there.
        catch_up(admin).await;
    }
    let mut changed = None;
    if req.method != "GET" {
        if let Err(answer) = req.length_required() {
            return answer;
        }
        let b: RevokeBody = match serde_json::from_slice(req.body) {
            Ok(b) => b,
            Err(_) => return http::json_error(400, WANT),
        };
        let end_live = b.end_live_streams;
        let (device_ids, token_ids) = match b.ids() {
            Ok(ids) => ids,
            Err(why) => return http::json_error(400, &why),
        };
        if device_ids.is_empty() && token_ids.is_empty() {
            return http::json_error(
                400,
                "give a device_id or a token_id (or device_ids, token_ids)",
            );
        }
        match req.method {
            "POST" => {
                for d in &device_ids {
                    devices.revoke_device(d);
                }
                for t in &token_ids {
                    if admin.process.fleet.get().is_some() {
                        devices.revoke_token(t);
                    } else {
                        devices.revoke_token_at(t, crate::control::accounts::unix_now(), None);
                    }
                }
                if end_live {
                    end_streams(admin, &device_ids, &token_ids);
                    if admin.process.fleet.get().is_none() {
                        admin.revocations_file.asked(
                            device_ids
                                .iter()
                                .map(|d| (Some(d.clone()), None))
                                .chain(token_ids.iter().map(|t| (None, Some(t.clone())))),
                        );
                    }
                }
                log_revoked(&device_ids, &token_ids, end_live);
            }
            "DELETE" => {
                for d in &device_ids {
                    devices.unrevoke(Some(d), None);
                }
                for t in &token_ids {
                    devices.unrevoke(None, Some(t));
                }
            }
            _ => return http::json_error(405, "GET, POST or DELETE"),
        }
        // Alone, the state directory keeps them over a restart (in a
        // fleet, Redis does).
        if admin.process.fleet.get().is_none() {
            if let Err(e) = save(admin).await {
                let dir = admin.config.borrow().state_dir.clone();
                tracing::error!(dir = %dir.display(), error = %e, "revocations changed on this relay, but not saved");
                return http::json_error(
                    500,
                    &format!("applied on this relay, but not saved to the state directory ({e}); a restart would lose it"),
                );
            }
        }
        if let Some(fleet) = admin.process.fleet.get() {
            let ids = device_ids
                .iter()
                .map(|d| (Some(d.clone()), None))
                .chain(token_ids.iter().map(|t| (None, Some(t.clone()))))
                .collect();
            let shared = fleet.revoke(ids, end_live, req.method == "DELETE").await;
            if let Err(e) = shared {
                tracing::error!(error = %e, "revocation applied on this node; the fleet gets it when the cluster store answers again");
                return http::json_error(
                    503,
                    &format!("applied on this node, not yet fleet-wide ({e}); sent when the cluster store answers again"),
                );
            }
        }
        changed = Some(change_answer(devices, &device_ids, &token_ids));
    }
    if let Some(answer) = changed {
        return answer;
    }
    let query = match super::query::checked(
        req.query,
        &[
            ("of", "devices or token_ids"),
            ("limit", "ids, 1 to 10000"),
            ("after", "the previous page's next"),
        ],
    ) {
        Ok(q) => q,
        Err(answer) => return answer,
    };
    if let Some(of) = query.get("of") {
        let (limit, after) = match query.page(PAGE, MAX_PAGE) {
            Ok(page) => page,
            Err(answer) => return answer,
        };
        return page_answer(devices, of, limit, after.as_deref());
    }
    if query.get("limit").is_some() || query.get("after").is_some() {
        return http::json_error(
            400,
            "limit and after page one list: add of=devices or of=token_ids",
        );
    }
    let (d, t) = devices.revoked();
    let expire: BTreeMap<_, _> = devices
        .revoked_token_times()
        .into_iter()
        .map(|(id, _, _, until)| (id, until))
        .collect();
    http::response(
        200,
        "application/json",
        "",
        json!({"devices": d, "token_ids": t, "token_ids_expire": expire})
            .to_string()
            .as_bytes(),
    )
}

/// Ids in a page of `GET /admin/revocations?of=…` by default, and at most.
const PAGE: usize = 1_000;
const MAX_PAGE: usize = 10_000;

/// A page of one list (`of`): its ids in order, at most `limit` after
/// `after`, `next` when more follow (the page's last id, for `after=`),
/// and how many ids each list holds. A list of 600,000 ids answered whole
/// is 21 MB, built on the admin thread while `/healthz` waits.
fn page_answer(
    devices: &crate::core::devices::Devices,
    of: &str,
    limit: usize,
    after: Option<&str>,
) -> Vec<u8> {
    let (n_devices, n_tokens) = devices.revoked_counts();
    let mut body = json!({"revoked": {"devices": n_devices, "token_ids": n_tokens}});
    let (last, more) = match of {
        "devices" => {
            let (page, more) = devices.revoked_devices_page(after, limit);
            let last = page.last().cloned();
            body["devices"] = json!(page);
            (last, more)
        }
        "token_ids" => {
            let (page, more) = devices.revoked_tokens_page(after, limit);
            let last = page.last().map(|(t, _)| t.clone());
            let expire: BTreeMap<&str, u64> = page
                .iter()
                .filter_map(|(t, until)| Some((t.as_str(), (*until)?)))
                .collect();
            body["token_ids_expire"] = json!(expire);
            body["token_ids"] = json!(page.iter().map(|(t, _)| t).collect::<Vec<_>>());
            (last, more)
        }
        _ => return http::json_error(400, "of: want of=devices or of=token_ids"),
    };
    if more {
        body["next"] = json!(last);
    }
    http::response(200, "application/json", "", body.to_string().as_bytes())
}

/// Most ids named in one log line of a revocation.
const IDS_A_LINE: usize = 100;

/// Logs a revocation: the log is its audit trail, so every id is named.
/// One device id and one token id go in one line (`device=`, `token_id=`);
/// lists go [`IDS_A_LINE`] ids a line (`devices="a b …"`), not a line an
/// id: a list as long as a body holds (16,000 short ids) would be 16,000
/// lines at once, past journald's default rate limit (10,000 lines in
/// 30 s a service, `RateLimitBurst=`), which drops the rest of the trail.
fn log_revoked(device_ids: &[String], token_ids: &[String], end_live: bool) {
    if device_ids.len() <= 1 && token_ids.len() <= 1 {
        tracing::warn!(
            device = device_ids.first().map_or("", String::as_str),
            token_id = token_ids.first().map_or("", String::as_str),
            end_live_streams = end_live,
            "revoked"
        );
        return;
    }
    for ids in device_ids.chunks(IDS_A_LINE) {
        tracing::warn!(
            devices = ids.join(" ").as_str(),
            n = ids.len(),
            end_live_streams = end_live,
            "revoked"
        );
    }
    for ids in token_ids.chunks(IDS_A_LINE) {
        tracing::warn!(
            token_ids = ids.join(" ").as_str(),
            n = ids.len(),
            end_live_streams = end_live,
            "revoked"
        );
    }
}

/// The answer to a change: the ids it named as they now stand (`devices`
/// and `token_ids` hold each if it is revoked, `token_ids_expire` its
/// expiry once known) and how many ids each list holds (`revoked`).
/// Not the lists: they grow with every device revocation, which never
/// expires, and answering them whole made each change cost as much as
/// the lists (7 MB at 200,000 revoked devices), so that revoking ids one
/// by one grew with the square of their number. `GET` lists them.
fn change_answer(
    devices: &crate::core::devices::Devices,
    device_ids: &[String],
    token_ids: &[String],
) -> Vec<u8> {
    let d: Vec<&str> = device_ids
        .iter()
        .map(String::as_str)
        .filter(|d| devices.device_revoked(d))
        .collect();
    let held: Vec<(&str, Option<u64>)> = token_ids
        .iter()
        .filter_map(|t| Some((t.as_str(), devices.token_revoked(t)?)))
        .collect();
    let t: Vec<&str> = held.iter().map(|(t, _)| *t).collect();
    let expire: BTreeMap<&str, u64> = held
        .iter()
        .filter_map(|(t, until)| Some((*t, (*until)?)))
        .collect();
    let (n_devices, n_tokens) = devices.revoked_counts();
    http::response(
        200,
        "application/json",
        "",
        json!({
            "devices": d,
            "token_ids": t,
            "token_ids_expire": expire,
            "revoked": {"devices": n_devices, "token_ids": n_tokens},
        })
        .to_string()
        .as_bytes(),
    )
}

/// Outside a fleet, once a second: takes in the lists another process
/// saved, lets go of the token id revocations that have expired, and saves
/// the lists when any did. Never ends.
pub(super) async fn upkeep(admin: &Admin) {
    loop {
        glommio::timer::Timer::new(std::time::Duration::from_secs(1)).await;
        expire(admin).await;
    }
}

/// Outside a fleet: lets go of the token id revocations that have
/// expired, and saves the lists when any did.
async fn expire(admin: &Admin) {
    if admin.process.fleet.get().is_some() {
        return;
    }
    // After a change under way, not between its catching up and its write.
    let _one_at_a_time = admin.revocations_file.changing.acquire_permit(1).await;
    catch_up(admin).await;
    let devices = &admin.process.devices;
    let gone = devices.expire_revoked_tokens(crate::control::accounts::unix_now());
    if gone == 0 {
        return;
    }
    tracing::info!(
        expired = gone,
        "token id revocations expired (no token carrying them can still be valid)"
    );
    if let Err(e) = save(admin).await {
        let dir = admin.config.borrow().state_dir.clone();
        // Kept in memory: the file still has them, and a restart expires
        // them again.
        tracing::error!(dir = %dir.display(), error = %e, "expired token id revocations not saved");
    }
}

/// The file is gone while this relay revokes something (removed, or the
/// state directory removed or moved, under it; no process on the state
/// directory removes it): the lists are written again, or a restart
/// would serve the revoked devices and tokens. One that cannot be
/// written is logged once (the next second tries again), and its return
/// once.
async fn file_gone(admin: &Admin, dir: &std::path::Path) {
    let devices = &admin.process.devices;
    let (d, t) = devices.revoked();
    if d.is_empty() && t.is_empty() && devices.forgotten_through() == 0 {
        return;
    }
    let reported = &admin.revocations_file.gone_reported;
    match save(admin).await {
        Ok(()) => {
            reported.set(false);
            tracing::warn!(dir = %dir.display(), "revocations.json was gone (removed, or its directory moved) under the running relay; the revocations are written there again");
        }
        Err(e) if !reported.replace(true) => {
            tracing::error!(dir = %dir.display(), error = %e, "revocations.json is gone (removed, or its directory moved) under the running relay and cannot be written again; a restart now serves the revoked devices and tokens again (trying again each second)");
        }
        Err(_) => {}
    }
}

/// Outside a fleet: takes the revocation lists another process saved in
/// the state directory since this one last looked (the other relay of a
/// hand-over restart, which shares it), in place of its own. Both then
/// refuse what either revoked, and a lift on either lifts it on both;
/// without this each process's next save wrote its own lists over the
/// other's, and the new process took the streams of a device revoked on
/// the old one (where `clio-relay keys`' admin port, the config file's,
/// leads). The file is read only when its inode, time or size moved.
async fn catch_up(admin: &Admin) {
    // While a save of this process's is queued or under way, the file is
    // older than the running lists: not another process's save.
    if admin.process.fleet.get().is_some() || admin.revocations_file.turns.busy() {
        return;
    }
    let dir = admin.config.borrow().state_dir.clone();
    // A change whose save failed (a full disk) is saved once the disk has
    // room: this process's lists are newer than the file's.
    if admin.revocations_file.unsaved.get() {
        if save(admin).await.is_ok() {
            tracing::info!(dir = %dir.display(), "revocations not saved before are saved in revocations.json now");
        }
        return;
    }
    let path = dir.join(REVOCATIONS_FILE);
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if crate::control::usage::is_gone(&e) => {
            file_gone(admin, &dir).await;
            return;
        }
        Err(_) => return,
    };
    let Some(saved) = admin.revocations_file.changed(&path, &meta) else {
        return;
    };
    let devices = &admin.process.devices;
    let now = crate::control::accounts::unix_now();
    let skew_now = devices.token_bounds().1;
    let tokens: std::collections::HashMap<_, _> = saved
        .token_ids
        .iter()
        .map(|t| {
            let at = saved.token_ids_revoked_at.get(t).copied().unwrap_or(now);
            let skew = saved
                .token_ids_clock_skew
                .get(t)
                .copied()
                .unwrap_or(skew_now);
            (t.clone(), Some((at, skew)))
        })
        .collect();
    let before = devices.revoked();
    devices.replace_revoked(
        saved.devices.iter().cloned().collect(),
        tokens,
        saved.issued_through_refused,
    );
    let after = devices.revoked();
    if after != before {
        tracing::info!(
            devices = after.0.len(),
            token_ids = after.1.len(),
            "revocations saved by another process on the state directory applied"
        );
    }
    // Its requests to end live streams, each once: this process's streams
    // of a device revoked there end too.
    let (mut ended_devices, mut ended_tokens) = (Vec::new(), Vec::new());
    for e in admin.revocations_file.new_ends(&saved.end_live_streams) {
        tracing::warn!(
            device = e.device_id.as_deref().unwrap_or(""),
            token_id = e.token_id.as_deref().unwrap_or(""),
            "revoked by another process on the state directory, with end_live_streams: ending the live streams here"
        );
        ended_devices.extend(e.device_id);
        ended_tokens.extend(e.token_id);
    }
    if !(ended_devices.is_empty() && ended_tokens.is_empty()) {
        end_streams(admin, &ended_devices, &ended_tokens);
    }
}

/// Tells every shard to end the live streams of `devices` and `tokens`.
fn end_streams(admin: &Admin, devices: &[String], tokens: &[String]) {
    let devices: std::collections::HashSet<String> = devices.iter().cloned().collect();
    let tokens: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    for tx in &admin.shards {
        let _ = tx.try_send(ShardMsg::EndStreams {
            devices: devices.clone(),
            tokens: tokens.clone(),
        });
    }
}

/// How long a request to end live streams stays in `revocations.json`
/// for another process to act on: it looks once a second.
const END_KEPT_MS: u64 = 60_000;

/// A revocation's request to end the live streams of its device or token
/// id, as `revocations.json` carries it to another process.
#[derive(serde::Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct EndRequest {
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    token_id: Option<String>,
    /// When it was made (Unix milliseconds).
    at_ms: u64,
    /// The process that made it.
    pid: u32,
}

/// `revocations.json` as this process shares it with another on the same
/// state directory (outside a fleet).
#[derive(Debug)]
pub(super) struct SharedFile {
    /// The file as last looked at (inode, modification time, size), so
    /// the check each second reads it only when it changed.
    seen: std::cell::Cell<Option<(u64, i64, i64, u64)>>,
    /// This process's requests to end live streams, the last
    /// [`END_KEPT_MS`], written with the lists.
    asked: std::cell::RefCell<Vec<EndRequest>>,
    /// Another process's requests acted on here, the last [`END_KEPT_MS`].
    done: std::cell::RefCell<Vec<EndRequest>>,
    /// When this process started (Unix milliseconds): requests from
    /// before are another process's business, ended there.
    since_ms: u64,
    /// The file was found gone and could not be written again: logged
    /// once, until it is.
    gone_reported: std::cell::Cell<bool>,
    /// The last save failed (a full disk): tried again each second.
    unsaved: std::cell::Cell<bool>,
    /// Its writes, off the admin thread, in order.
    pub(super) turns: super::file_turns::FileTurns,
    /// Held by a change (a request's, the expiry's) from taking in the
    /// file to its write's end. The catching up is skipped while a write
    /// is queued or under way (the file is older than the running lists
    /// then), so a change that came meanwhile, its write built from the
    /// running lists after the other's, went over another process's save
    /// in between; now the next change catches up once the last is saved.
    changing: glommio::sync::Semaphore,
}

impl Default for SharedFile {
    fn default() -> Self {
        SharedFile {
            seen: Default::default(),
            asked: Default::default(),
            done: Default::default(),
            since_ms: now_ms(),
            gone_reported: Default::default(),
            unsaved: Default::default(),
            turns: Default::default(),
            changing: glommio::sync::Semaphore::new(1),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SharedFile {
    /// Records this process's requests to end the live streams of each
    /// `(device_id, token_id)`, for the next save: the old ones let go
    /// once for the whole list, not once an id.
    fn asked(&self, ids: impl Iterator<Item = (Option<String>, Option<String>)>) {
        let now = now_ms();
        let mut asked = self.asked.borrow_mut();
        asked.retain(|e| now.saturating_sub(e.at_ms) < END_KEPT_MS);
        asked.extend(ids.map(|(device_id, token_id)| EndRequest {
            device_id,
            token_id,
            at_ms: now,
            pid: std::process::id(),
        }));
    }

    /// Takes in a save's outcome: the file as written is this process's
    /// (not read back as another's), and a failure is tried again.
    fn saved(&self, written: std::io::Result<std::fs::Metadata>) -> std::io::Result<()> {
        self.unsaved.set(written.is_err());
        self.seen.set(Some(stamp(&written?)));
        Ok(())
    }

    /// The lists in `path` when the file changed since this process last
    /// read or wrote it; `None` when it did not (this process's own save
    /// is not read back: each was a whole re-read, parse and rebuild of
    /// the lists, as long as the lists, after every change and at the
    /// next second), or when it cannot be read (one being replaced or
    /// damaged is left alone: the running lists stand, and this relay's
    /// next save writes them).
    fn changed(&self, path: &std::path::Path, meta: &std::fs::Metadata) -> Option<Revoked> {
        if self.seen.replace(Some(stamp(meta))) == Some(stamp(meta)) {
            return None;
        }
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Revoked>(&b).ok())
    }

    /// This process's recent requests, to save.
    fn to_save(&self) -> Vec<EndRequest> {
        let now = now_ms();
        let mut asked = self.asked.borrow_mut();
        asked.retain(|e| now.saturating_sub(e.at_ms) < END_KEPT_MS);
        asked.clone()
    }

    /// Of `saved`, another process's requests made since this one started
    /// and not yet acted on here.
    fn new_ends(&self, saved: &[EndRequest]) -> Vec<EndRequest> {
        let now = now_ms();
        let mut done = self.done.borrow_mut();
        done.retain(|e| now.saturating_sub(e.at_ms) < 2 * END_KEPT_MS);
        let fresh: Vec<EndRequest> = saved
            .iter()
            .filter(|e| e.pid != std::process::id() && e.at_ms >= self.since_ms)
            .filter(|e| !done.contains(e))
            .cloned()
            .collect();
        done.extend(fresh.iter().cloned());
        fresh
    }
}

/// The revocations of a relay outside a fleet, in its state directory.
pub const REVOCATIONS_FILE: &str = "revocations.json";

#[derive(serde::Serialize, Deserialize, Default)]
struct Revoked {
    devices: Vec<String>,
    token_ids: Vec<String>,
    /// When each token id was revoked (Unix seconds); one missing (a file
    /// from before they expired) counts from the start that reads it.
    #[serde(default)]
    token_ids_revoked_at: BTreeMap<String, u64>,
    /// `tokens.clock_skew` (seconds) when each was revoked; one missing
    /// counts the one in force.
    #[serde(default)]
    token_ids_clock_skew: BTreeMap<String, u64>,
    /// Tokens issued at or before this are refused (see
    /// `Devices::forgotten_through`); 0: none.
    #[serde(default)]
    issued_through_refused: u64,
    /// The last minute's requests to end live streams, for another
    /// process on the state directory (a hand-over's other relay).
    #[serde(default)]
    end_live_streams: Vec<EndRequest>,
}

/// Writes the revocation lists to `revocations.json` in the state
/// directory (replaced atomically), on the blocking thread: the lists as
/// they are when this save's turn comes.
async fn save(admin: &Admin) -> std::io::Result<()> {
    let file = &admin.revocations_file;
    let written = file
        .turns
        .write(|| {
            let path = admin.config.borrow().state_dir.join(REVOCATIONS_FILE);
            let bytes = to_bytes(&admin.process.devices, file);
            move || crate::control::usage::write_atomically(&path, &bytes?)
        })
        .await;
    file.saved(written)
}

/// The revocation lists as `revocations.json` holds them.
fn to_bytes(
    devices: &crate::core::devices::Devices,
    shared: &SharedFile,
) -> std::io::Result<Vec<u8>> {
    let times = devices.revoked_token_times();
    let token_ids_revoked_at = times.iter().map(|(id, at, ..)| (id.clone(), *at)).collect();
    let token_ids_clock_skew = times
        .into_iter()
        .map(|(id, _, skew, _)| (id, skew))
        .collect();
    let issued_through_refused = devices.forgotten_through();
    let (devices, token_ids) = devices.revoked();
    Ok(serde_json::to_vec(&Revoked {
        devices,
        token_ids,
        token_ids_revoked_at,
        token_ids_clock_skew,
        issued_through_refused,
        end_live_streams: shared.to_save(),
    })?)
}

/// A file's identity and version as [`SharedFile`] compares them: inode,
/// modification time and size.
fn stamp(meta: &std::fs::Metadata) -> (u64, i64, i64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.size())
}

/// At start, outside a fleet: the revocations saved in `dir`, so a
/// restart does not lift them. A missing file is none; an unreadable one
/// stops the relay (a revoked device must not come back unseen): one
/// that is not a revocation list (damaged, cut short) as the
/// configuration's fault ([`crate::cli::ConfigFault`], exit 3: a restart
/// cannot mend it), one that cannot be read as any I/O error.
pub fn load_revocations(
    dir: &std::path::Path,
    devices: &crate::core::devices::Devices,
) -> std::io::Result<usize> {
    let path = dir.join(REVOCATIONS_FILE);
    let saved: Revoked = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::other(crate::cli::ConfigFault(format!(
                "{}: not a revocation list ({e}); restore it from a backup, or move it \
                 aside to start without revocations (the devices and token ids it \
                 revoked are then served again)",
                path.display()
            )))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Revoked::default(),
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        }
    };
    for d in &saved.devices {
        devices.revoke_device(d);
    }
    let now = crate::control::accounts::unix_now();
    for t in &saved.token_ids {
        let at = saved.token_ids_revoked_at.get(t).copied().unwrap_or(now);
        let skew = saved.token_ids_clock_skew.get(t).copied();
        devices.revoke_token_at(t, at, skew);
    }
    devices.set_forgotten_through(saved.issued_through_refused);
    Ok(saved.devices.len() + saved.token_ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each change wrote the whole lists, and the next look at the file
    /// (before the next request, and each second) read them all back as
    /// another process's save: a parse and a rebuild of both lists, two
    /// sorted copies of them compared, on the admin thread, per change.
    /// With 200,000 revoked devices a change took 0.3 to 0.6 s (release
    /// build), in which `/healthz` went unanswered.
    #[test]
    fn a_save_is_not_read_back_and_another_processs_is() {
        let dir = std::env::temp_dir().join(format!("clio-revocations-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join(REVOCATIONS_FILE);
        let devices = crate::core::devices::Devices::default();
        devices.revoke_device("dev-1");
        let shared = SharedFile::default();
        let changed = |shared: &SharedFile| {
            let meta = std::fs::metadata(&path).unwrap();
            shared.changed(&path, &meta)
        };
        let bytes = to_bytes(&devices, &shared).unwrap();
        shared
            .saved(crate::control::usage::write_atomically(&path, &bytes))
            .unwrap();
        assert!(changed(&shared).is_none(), "its own save read back");
        // Another process's save (a hand-over's other relay) is read, once.
        let theirs = serde_json::to_vec(&Revoked {
            devices: vec!["dev-1".into(), "dev-2".into()],
            ..Revoked::default()
        })
        .unwrap();
        std::fs::write(dir.join("other"), theirs).unwrap();
        std::fs::rename(dir.join("other"), &path).unwrap();
        let read = changed(&shared).expect("another process's save");
        assert_eq!(read.devices, ["dev-1", "dev-2"]);
        assert!(changed(&shared).is_none(), "read once");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
