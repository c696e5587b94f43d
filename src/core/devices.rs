//! Per-device access control: concurrent streams, new streams per minute,
//! audio seconds per day, and revocation of devices and tokens.
//!
//! The state of a device is shared by every shard (one [`DeviceState`] per
//! device id, behind `Arc`), so each limit holds exactly whichever shard a
//! device's streams land on. It is touched when a stream opens or ends, and
//! once per second of audio a stream carries, never per frame.
//!
//! A device's state is kept only while a limit needs it ([`Devices::sweep`]):
//! a stream holds it, its new-stream bucket is still refilling, or a daily
//! audio allowance is configured and it streamed today. Every other device
//! is forgotten, so memory follows the devices that are streaming, not the
//! devices seen today.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

use crate::core::config::DeviceLimits;
use crate::core::token::Claims;

mod revocations;

/// Which limit refused a stream (also the `limit` label of
/// `clio_relay_device_rejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The device or the token was revoked.
    Revoked,
    /// Too many streams open at once.
    Concurrent,
    /// Too many new streams in the last minute.
    Rate,
    /// The day's audio allowance is used up.
    DailyAudio,
    /// The stream reached the longest a stream may last.
    MaxLength,
}

impl Limit {
    /// Every limit, for metrics.
    pub const ALL: [Limit; 5] = [
        Limit::Revoked,
        Limit::Concurrent,
        Limit::Rate,
        Limit::DailyAudio,
        Limit::MaxLength,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Revoked => "revoked",
            Limit::Concurrent => "concurrent",
            Limit::Rate => "rate",
            Limit::DailyAudio => "daily_audio",
            Limit::MaxLength => "max_length",
        }
    }
}

/// A refusal, with the message the client sees (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Which limit.
    pub limit: Limit,
    /// What the client is told.
    pub message: String,
}

/// The time in which any new-stream bucket refills completely.
const BUCKET_REFILL: Duration = Duration::from_secs(60);

/// The UTC day number (days since the Unix epoch).
pub fn utc_day(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

/// One device's shared state.
#[derive(Debug)]
pub struct DeviceState {
    /// Streams open now, across all shards.
    live: AtomicU32,
    /// New-stream token bucket: tokens left and when it was last refilled.
    bucket: Mutex<(f64, Instant)>,
    /// The UTC day `audio_ms` counts for.
    day: AtomicU64,
    /// Audio milliseconds streamed on `day` (by this process).
    audio_ms: AtomicU64,
    /// In a fleet: audio the other nodes streamed on `day`, as of the last
    /// flush to the shared store.
    others_ms: AtomicU64,
    /// In a fleet: how much of `audio_ms` the shared store has.
    reported_ms: AtomicU64,
}

/// [`DeviceState::day`] while its counters move to a new day.
const ROLLING: u64 = u64::MAX;

impl DeviceState {
    fn new(now: Instant) -> Self {
        DeviceState {
            live: AtomicU32::new(0),
            bucket: Mutex::new((f64::MAX, now)),
            day: AtomicU64::new(0),
            audio_ms: AtomicU64::new(0),
            others_ms: AtomicU64::new(0),
            reported_ms: AtomicU64::new(0),
        }
    }

    /// Audio milliseconds streamed today, fleet-wide as far as known (0 if
    /// the counters are from another day).
    fn audio_ms_on(&self, day: u64) -> u64 {
        if self.day.load(Ordering::Acquire) == day {
            self.audio_ms.load(Ordering::Relaxed) + self.others_ms.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Moves the counters to `day` if they are from an earlier one. The
    /// day reads [`ROLLING`] while the counters are zeroed, and the new
    /// day only once they are: a shard adding audio meanwhile waits, so it
    /// neither adds to yesterday's total (and sees it as today's) nor has
    /// its audio wiped by the zeroing. Once a day per device.
    fn roll(&self, day: u64) {
        loop {
            let seen = self.day.load(Ordering::Acquire);
            if seen == ROLLING {
                std::thread::yield_now();
                continue;
            }
            if seen >= day {
                return;
            }
            if self
                .day
                .compare_exchange(seen, ROLLING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.audio_ms.store(0, Ordering::Relaxed);
                self.others_ms.store(0, Ordering::Relaxed);
                self.reported_ms.store(0, Ordering::Relaxed);
                self.day.store(day, Ordering::Release);
                return;
            }
        }
    }

    /// Adds audio, rolling the counter over at midnight UTC; returns the
    /// day's total (fleet-wide as far as known).
    fn add_audio_ms(&self, ms: u64, day: u64) -> u64 {
        self.roll(day);
        self.audio_ms.fetch_add(ms, Ordering::AcqRel) + ms + self.others_ms.load(Ordering::Relaxed)
    }

    /// This process's audio on `day` and the part the shared store lacks.
    pub fn unreported_audio(&self, day: u64) -> (u64, u64) {
        self.roll(day);
        let local = self.audio_ms.load(Ordering::Acquire);
        (
            local,
            local.saturating_sub(self.reported_ms.load(Ordering::Relaxed)),
        )
    }

    /// The fleet's audio on `day` as far as this process knows: the total
    /// the shared store last gave, plus what this process streamed since.
    pub fn known_fleet_audio(&self, day: u64) -> u64 {
        self.roll(day);
        self.audio_ms_on(day)
    }

    /// The shared store had `total` of the fleet's audio on `day` at a
    /// stream's open: what of it is not this process's reported audio is
    /// the other nodes'. Only raises what is known (a flush answered
    /// meanwhile may know more).
    fn learn_fleet_audio(&self, day: u64, total: u64) {
        self.raise_others(day, |s| {
            total.saturating_sub(s.reported_ms.load(Ordering::Relaxed))
        });
    }

    /// Raises the audio on `day` known to be streamed elsewhere to
    /// `others` (reckoned once the counters are on `day`). A figure of a
    /// day the counters have left (asked before midnight, answered after)
    /// says nothing of today.
    fn raise_others(&self, day: u64, others: impl FnOnce(&Self) -> u64) {
        self.roll(day);
        if self.day.load(Ordering::Acquire) == day {
            self.others_ms.fetch_max(others(self), Ordering::Relaxed);
        }
    }

    /// The shared store has `local` of this process's audio on `day`, and
    /// `total` from the whole fleet.
    pub fn set_fleet_audio(&self, day: u64, local: u64, total: u64) {
        if self.day.load(Ordering::Acquire) == day {
            self.reported_ms.store(local, Ordering::Relaxed);
            self.others_ms
                .store(total.saturating_sub(local), Ordering::Relaxed);
        }
    }
}

/// The devices a limit needs to remember, plus the revocation lists.
#[derive(Debug)]
pub struct Devices {
    /// Device id → state. Locked in parts ([`TABLE_PARTS`]): the sweep
    /// holds one part at a time, so an open on a shard waits at most for
    /// one part's share of the sweep, not for all of it.
    map: DashMap<String, Arc<DeviceState>>,
    /// Whether a daily audio allowance is configured (the default limits,
    /// a tier or a pool): then a device's audio today is kept all day.
    daily_audio: AtomicBool,
    revoked_devices: RwLock<HashSet<String>>,
    /// Revoked token ids, with when (Unix seconds) they were revoked and
    /// under which clock skew (seconds): by this relay's clock for a relay
    /// alone, which lets them go ([`Devices::expire_revoked_tokens`]); by
    /// Redis's clock for the fleet's (a skew its nodes had before the
    /// largest went down, recorded then, or 0), which Redis lets go. `None`: not known yet (one made in a fleet,
    /// until the next load of the fleet's lists).
    revoked_tokens: RwLock<HashMap<String, Option<(u64, u64)>>>,
    /// When, by this process's monotonic clock, each token id revocation
    /// of a relay alone was made (for one loaded or taken from another
    /// process, reckoned back from its age by the wall clock then): it is
    /// let go only once its time has passed by this clock too, so a wall
    /// clock stepped forward (one that was behind when it was made, put
    /// right) does not let it go early. None here: the wall clock alone.
    revoked_made: Mutex<HashMap<String, Instant>>,
    /// A token issued at or before this (Unix seconds) is refused: a
    /// revocation by token id made before it has expired and is no longer
    /// kept. 0: none.
    forgotten_through: AtomicU64,
    /// The longest lifetime (seconds) a token may have
    /// (`tokens.max_ttl`); `u64::MAX` until set.
    token_hold: AtomicU64,
    /// `tokens.clock_skew`, seconds.
    token_skew: AtomicU64,
    /// In a fleet: how long (seconds) the fleet keeps a token id
    /// revocation, the longest `max_ttl` + `clock_skew` its nodes
    /// published; `u64::MAX`: not in a fleet ([`Devices::token_hold`]
    /// applies).
    fleet_hold: AtomicU64,
    /// In a fleet: the longest `max_ttl` (seconds) its nodes published.
    fleet_ttl: AtomicU64,
    /// In a fleet: the largest `clock_skew` (seconds) its nodes published.
    fleet_skew: AtomicU64,
}

/// Parts of the device table, each behind its own lock. With 100,000
/// devices tracked the whole sweep takes milliseconds (benches/README.md);
/// one part's share is tens of microseconds.
const TABLE_PARTS: usize = 64;

impl Default for Devices {
    fn default() -> Self {
        Devices {
            map: DashMap::with_shard_amount(TABLE_PARTS),
            daily_audio: AtomicBool::new(false),
            revoked_devices: RwLock::default(),
            revoked_tokens: RwLock::default(),
            revoked_made: Mutex::default(),
            forgotten_through: AtomicU64::new(0),
            token_hold: AtomicU64::new(u64::MAX),
            token_skew: AtomicU64::new(0),
            fleet_hold: AtomicU64::new(u64::MAX),
            fleet_ttl: AtomicU64::new(0),
            fleet_skew: AtomicU64::new(0),
        }
    }
}

/// A stream's place under its device's limits; released when dropped.
#[derive(Debug)]
pub struct DevicePermit {
    state: Arc<DeviceState>,
    /// The limits the stream runs under (from its token's tier).
    pub limits: DeviceLimits,
    /// In a fleet: the stream's count in the shared store.
    pub fleet: Option<crate::core::cluster::FleetHold>,
}

impl Drop for DevicePermit {
    fn drop(&mut self) {
        self.state.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl DevicePermit {
    /// Counts `ms` more audio for the device today. Returns false once the
    /// day's allowance is exceeded.
    pub fn add_audio(&self, ms: u64, now: SystemTime) -> bool {
        let total = self.state.add_audio_ms(ms, utc_day(now));
        let cap = self.limits.audio_seconds_per_day;
        cap == 0 || total <= cap * 1000
    }

    /// In a fleet: the shared store had `total_ms` of the device's audio
    /// on `day` when it admitted this stream.
    pub fn learn_fleet_audio(&self, day: u64, total_ms: u64) {
        self.state.learn_fleet_audio(day, total_ms);
    }
}

impl Devices {
    /// Checks a new stream of `claims` against revocations and `limits`;
    /// on success the stream counts against the device until the permit drops.
    pub fn admit(
        &self,
        claims: &Claims,
        limits: &DeviceLimits,
        now: SystemTime,
    ) -> Result<DevicePermit, Refused> {
        if self.is_revoked(claims) {
            return Err(Devices::revoked_refusal());
        }
        let state = self.state(&claims.device_id);
        let day = utc_day(now);
        if limits.audio_seconds_per_day > 0
            && state.audio_ms_on(day) >= limits.audio_seconds_per_day * 1000
        {
            return Err(Refused {
                limit: Limit::DailyAudio,
                message: format!(
                    "Device limit reached: {} audio seconds per day.",
                    limits.audio_seconds_per_day
                ),
            });
        }
        let max = limits.max_concurrent_streams;
        if max > 0
            && state
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_err()
        {
            return Err(Refused {
                limit: Limit::Concurrent,
                message: format!("Device limit reached: {max} concurrent streams."),
            });
        }
        if max == 0 {
            state.live.fetch_add(1, Ordering::AcqRel);
        }
        let permit = DevicePermit {
            state,
            limits: limits.clone(),
            fleet: None,
        };
        let per_minute = limits.streams_per_minute;
        if per_minute > 0 {
            let mut bucket = permit
                .state
                .bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let now_i = Instant::now();
            let (tokens, last) = *bucket;
            let refill =
                now_i.saturating_duration_since(last).as_secs_f64() * per_minute as f64 / 60.0;
            let tokens = (tokens.min(per_minute as f64) + refill).min(per_minute as f64);
            if tokens < 1.0 {
                *bucket = (tokens, now_i);
                drop(bucket);
                return Err(Refused {
                    limit: Limit::Rate,
                    message: format!("Device limit reached: {per_minute} new streams per minute."),
                });
            }
            *bucket = (tokens - 1.0, now_i);
        }
        Ok(permit)
    }

    fn state(&self, device: &str) -> Arc<DeviceState> {
        if let Some(s) = self.map.get(device) {
            return Arc::clone(&s);
        }
        let entry = self
            .map
            .entry(device.to_string())
            .or_insert_with(|| Arc::new(DeviceState::new(Instant::now())));
        Arc::clone(&entry)
    }

    /// Counts a stream the shared store already admitted (no check here).
    pub fn hold(&self, claims: &Claims, limits: &DeviceLimits) -> DevicePermit {
        let state = self.state(&claims.device_id);
        state.live.fetch_add(1, Ordering::AcqRel);
        DevicePermit {
            state,
            limits: limits.clone(),
            fleet: None,
        }
    }

    /// Devices whose audio the shared store should hear about: a live
    /// stream, or audio it does not have yet; with `all`, every device with
    /// audio on `day` (the store lost its totals).
    pub fn fleet_audio_pending(&self, day: u64, all: bool) -> Vec<(String, Arc<DeviceState>)> {
        self.map
            .iter()
            .filter(|e| {
                e.live.load(Ordering::Relaxed) > 0
                    || e.unreported_audio(day).1 > 0
                    || (all && e.known_fleet_audio(day) > 0)
            })
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect()
    }

    /// Counts `ms` of audio `device` streamed on `day` elsewhere: before
    /// this process started, or in another process on the state directory
    /// (the usage ledger's figures), so a restart does not start its day
    /// at 0. Only raises what is known.
    pub fn seed_daily_audio(&self, device: &str, day: u64, ms: u64) {
        let state = self
            .map
            .entry(device.to_string())
            .or_insert_with(|| Arc::new(DeviceState::new(Instant::now())))
            .clone();
        state.raise_others(day, |_| ms);
    }

    /// Whether a daily audio allowance is configured.
    pub fn daily_audio(&self) -> bool {
        self.daily_audio.load(Ordering::Relaxed)
    }

    /// Says whether a daily audio allowance is configured (at start and at
    /// each reload). Without one, a device's audio today is not kept once
    /// its streams end. A reload that adds an allowance counts, for a device
    /// forgotten before it, the audio from the reload on (as after a restart,
    /// the day's audio lives in memory).
    pub fn set_daily_audio(&self, configured: bool) {
        self.daily_audio.store(configured, Ordering::Relaxed);
    }

    /// Forgets every device no limit needs (bounded memory): one with no
    /// stream (nothing holds its state but the map), a full new-stream
    /// bucket (a minute since its last stream opened refills any bucket),
    /// and no audio today that counts: none, or no daily allowance
    /// configured. In a fleet (`fleet`), audio the shared store has not
    /// heard of yet keeps the device until it is sent. A forgotten device
    /// starts again as a new one would: no stream, a full bucket, no audio.
    pub fn sweep(&self, now: SystemTime, fleet: bool) {
        let day = utc_day(now);
        let daily_audio = self.daily_audio.load(Ordering::Relaxed);
        let now_i = Instant::now();
        self.map.retain(|_, s| {
            // A permit, or an open or a fleet flush under way, holds a
            // clone; none can take one without the lock of the device's
            // part, which this holds.
            if Arc::strong_count(s) > 1 || s.live.load(Ordering::Relaxed) > 0 {
                return true;
            }
            let (tokens, last) = *s.bucket.lock().unwrap_or_else(|e| e.into_inner());
            if tokens != f64::MAX && now_i.saturating_duration_since(last) < BUCKET_REFILL {
                return true;
            }
            if fleet && s.unreported_audio(day).1 > 0 {
                return true;
            }
            daily_audio && s.audio_ms_on(day) > 0
        });
    }

    /// Devices tracked now.
    pub fn tracked(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Shards add a device's audio at midnight UTC while one of them rolls
    /// its counter to the new day: no audio of the new day is lost, and
    /// none of the old day's is counted in it (which would cut a stream
    /// near yesterday's allowance, or refuse an open, just after midnight).
    #[test]
    fn audio_added_across_midnight_counts_on_the_new_day_only() {
        const THREADS: u64 = 4;
        const DAYS: u64 = 100_000;
        let state = Arc::new(DeviceState::new(Instant::now()));
        let barrier = Arc::new(std::sync::Barrier::new(THREADS as usize));
        let wrong = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (state, barrier, wrong) = (state.clone(), barrier.clone(), wrong.clone());
                std::thread::spawn(move || {
                    for day in 1..=DAYS {
                        barrier.wait();
                        // Each day starts with yesterday's THREADS × 1,000 ms.
                        let total = state.add_audio_ms(1_000, day);
                        if total > THREADS * 1_000 {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                        barrier.wait();
                        if state.audio_ms_on(day) != THREADS * 1_000 {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(wrong.load(Ordering::Relaxed), 0, "of {DAYS} days");
    }

    fn claims(device: &str, token: &str) -> Claims {
        Claims {
            device_id: device.into(),
            issued_at: 0,
            expires_at: u64::MAX,
            token_id: token.into(),
            key_id: "k".into(),
            tier: None,
            pools: vec!["default".into()],
        }
    }

    /// The sweep runs on the admin thread while shards open streams: a
    /// device's state is never forgotten while a stream holds it, so a
    /// device's one allowed stream stays its one stream.
    #[test]
    fn a_sweep_beside_opens_never_forgets_a_held_device() {
        let d = Devices::default();
        let limits = DeviceLimits {
            max_concurrent_streams: 1,
            ..DeviceLimits::default()
        };
        let c = claims("busy", "t1");
        let sweeping = AtomicBool::new(true);
        let twice = std::thread::scope(|s| {
            s.spawn(|| {
                while sweeping.load(Ordering::Relaxed) {
                    d.sweep(SystemTime::now(), false);
                }
            });
            // Counted, not asserted here: a panic would leave the sweeper
            // running and the scope waiting for it.
            let mut twice = 0;
            for _ in 0..200_000 {
                let held = d.admit(&c, &limits, SystemTime::now());
                // A state swept away under `held` would admit this one.
                if held.is_err() || d.admit(&c, &limits, SystemTime::now()).is_ok() {
                    twice += 1;
                }
            }
            sweeping.store(false, Ordering::Relaxed);
            twice
        });
        assert_eq!(twice, 0, "the device's one stream was admitted twice");
        d.sweep(SystemTime::now(), false);
        assert_eq!(
            d.tracked(),
            0,
            "with no stream left, the device is forgotten"
        );
    }

    #[test]
    fn concurrent_limit_holds_and_frees() {
        let d = Devices::default();
        let lim = DeviceLimits {
            max_concurrent_streams: 2,
            ..Default::default()
        };
        let now = SystemTime::now();
        let a = d.admit(&claims("dev", "t1"), &lim, now).unwrap();
        let _b = d.admit(&claims("dev", "t2"), &lim, now).unwrap();
        assert_eq!(
            d.admit(&claims("dev", "t3"), &lim, now).unwrap_err().limit,
            Limit::Concurrent
        );
        assert!(
            d.admit(&claims("other", "t4"), &lim, now).is_ok(),
            "limits are per device"
        );
        drop(a);
        assert!(d.admit(&claims("dev", "t5"), &lim, now).is_ok());
    }

    #[test]
    fn rate_limit_is_a_token_bucket() {
        let d = Devices::default();
        let lim = DeviceLimits {
            streams_per_minute: 3,
            ..Default::default()
        };
        let now = SystemTime::now();
        for _ in 0..3 {
            drop(d.admit(&claims("dev", "t"), &lim, now).unwrap());
        }
        let e = d.admit(&claims("dev", "t"), &lim, now).unwrap_err();
        assert_eq!(e.limit, Limit::Rate);
        assert!(e.message.contains("3 new streams per minute"));
        // One token comes back every 20 s; fake the passage of time.
        d.map.get("dev").unwrap().bucket.lock().unwrap().1 -= Duration::from_secs(21);
        assert!(d.admit(&claims("dev", "t"), &lim, now).is_ok());
    }

    #[test]
    fn daily_audio_counts_and_rolls_over() {
        let d = Devices::default();
        let lim = DeviceLimits {
            audio_seconds_per_day: 10,
            ..Default::default()
        };
        let day1 = UNIX_EPOCH + Duration::from_secs(86_400 * 20_000 + 100);
        let p = d.admit(&claims("dev", "t"), &lim, day1).unwrap();
        assert!(p.add_audio(6_000, day1));
        assert!(!p.add_audio(5_000, day1), "11 s > 10 s");
        drop(p);
        assert_eq!(
            d.admit(&claims("dev", "t"), &lim, day1).unwrap_err().limit,
            Limit::DailyAudio
        );
        let day2 = day1 + Duration::from_secs(86_400);
        let p = d.admit(&claims("dev", "t"), &lim, day2).expect("a new day");
        assert!(p.add_audio(1_000, day2));
    }

    #[test]
    fn revocation_by_device_or_token() {
        let d = Devices::default();
        let lim = DeviceLimits::default();
        let now = SystemTime::now();
        d.revoke_device("lost-phone");
        d.revoke_token("abcd");
        assert_eq!(
            d.admit(&claims("lost-phone", "x"), &lim, now)
                .unwrap_err()
                .limit,
            Limit::Revoked
        );
        assert_eq!(
            d.admit(&claims("fine", "abcd"), &lim, now)
                .unwrap_err()
                .limit,
            Limit::Revoked
        );
        assert!(d.admit(&claims("fine", "other"), &lim, now).is_ok());
        assert!(d.unrevoke(Some("lost-phone"), None));
        assert!(d.admit(&claims("lost-phone", "x"), &lim, now).is_ok());
        d.sweep(now, false);
        assert_eq!(d.tracked(), 0, "no live stream, no audio today");
    }

    /// A token id revocation is kept the longest token lifetime plus the
    /// clock skew, then let go; tokens issued before it was made stay
    /// refused even when a longer lifetime is allowed later.
    #[test]
    fn a_token_id_revocation_expires_after_the_longest_lifetime() {
        let d = Devices::default();
        d.set_token_lifetime(Duration::from_secs(3600), Duration::from_secs(30));
        let at = 1_700_000_000;
        d.revoke_token_at("abcd", at, None);
        d.revoke_token("fleet-kept");
        assert_eq!(
            d.revoked_token_times(),
            vec![("abcd".into(), at, 30, at + 3630)]
        );
        let is = |id: &str, issued: u64| {
            let mut c = claims("dev", id);
            c.issued_at = issued;
            d.is_revoked(&c)
        };
        // A lower skew later does not shorten it: a token issued before
        // it, by a clock 30 s ahead, is valid until at + 3630.
        d.set_token_lifetime(Duration::from_secs(3600), Duration::ZERO);
        assert_eq!(d.revoked_token_times()[0].3, at + 3630);
        assert_eq!(d.expire_revoked_tokens(at + 3629), 0);
        assert!(is("abcd", at));
        assert_eq!(d.expire_revoked_tokens(at + 3630), 1);
        assert_eq!(d.revoked().1, vec!["fleet-kept".to_string()]);
        // Issued at the revocation (by a clock the skew ahead): expired
        // under a lifetime of an hour, and refused under any longer one.
        assert!(is("abcd", at + 30));
        assert!(is("other", at + 30));
        // Issued after it: only the fleet's revocation still refuses.
        assert!(!is("abcd", at + 31));
        assert!(is("fleet-kept", at + 31));
        assert_eq!(d.forgotten_through(), at + 30);
    }

    /// One new device per stream, as relay-load makes them: with no daily
    /// allowance configured, the map holds the devices with a live stream,
    /// not every device that streamed today.
    #[test]
    fn sweep_forgets_devices_no_limit_needs() {
        let d = Devices::default();
        let lim = DeviceLimits::default();
        let now = SystemTime::now();
        let live: Vec<_> = (0..3)
            .map(|i| {
                d.admit(&claims(&format!("live-{i}"), "t"), &lim, now)
                    .unwrap()
            })
            .collect();
        for i in 0..1000 {
            let p = d
                .admit(&claims(&format!("dev-{i}"), "t"), &lim, now)
                .unwrap();
            assert!(p.add_audio(20_000, now));
        }
        assert_eq!(d.tracked(), 1003);
        d.sweep(now, false);
        assert_eq!(d.tracked(), 3, "only the devices with a live stream");
        drop(live);
        d.sweep(now, false);
        assert_eq!(d.tracked(), 0);
    }

    #[test]
    fn sweep_keeps_what_a_limit_needs() {
        let d = Devices::default();
        let now = SystemTime::now();
        // A daily allowance: the day's audio outlives the streams.
        d.set_daily_audio(true);
        let daily = DeviceLimits {
            audio_seconds_per_day: 10,
            ..Default::default()
        };
        let p = d.admit(&claims("talker", "t"), &daily, now).unwrap();
        assert!(!p.add_audio(11_000, now));
        drop(p);
        d.sweep(now, false);
        assert_eq!(
            d.admit(&claims("talker", "t"), &daily, now)
                .unwrap_err()
                .limit,
            Limit::DailyAudio,
            "kept across the sweep"
        );
        d.set_daily_audio(false);
        d.sweep(now, false);
        assert_eq!(d.tracked(), 0, "no allowance configured: nothing to keep");

        // A new-stream bucket still refilling, even with no audio at all.
        let rate = DeviceLimits {
            streams_per_minute: 2,
            ..Default::default()
        };
        for _ in 0..2 {
            drop(d.admit(&claims("opener", "t"), &rate, now).unwrap());
        }
        d.sweep(now, false);
        assert_eq!(
            d.admit(&claims("opener", "t"), &rate, now)
                .unwrap_err()
                .limit,
            Limit::Rate,
            "the bucket is not refilled by forgetting it"
        );
        // A minute on, the bucket is full again: the same as a new device.
        d.map.get("opener").unwrap().bucket.lock().unwrap().1 -= Duration::from_secs(61);
        d.sweep(now, false);
        assert_eq!(d.tracked(), 0);
        assert!(d.admit(&claims("opener", "t"), &rate, now).is_ok());

        // In a fleet, audio the shared store has not heard of stays until sent.
        let d = Devices::default();
        let lim = DeviceLimits::default();
        let p = d.admit(&claims("fleet-dev", "t"), &lim, now).unwrap();
        assert!(p.add_audio(5_000, now));
        drop(p);
        d.sweep(now, true);
        assert_eq!(d.tracked(), 1, "unsent audio");
        let pending = d.fleet_audio_pending(utc_day(now), false);
        assert_eq!(pending.len(), 1);
        pending[0].1.set_fleet_audio(utc_day(now), 5_000, 5_000);
        drop(pending);
        d.sweep(now, true);
        assert_eq!(d.tracked(), 0, "sent");
    }
}
