//! What an accept loop does when `accept` fails, so that no listener dies of
//! a transient error and running out of file descriptors is said plainly.
//!
//! - Every failure is counted; it is logged at most once per [`LOG_EVERY`],
//!   with the count since the last line (running out of descriptors made
//!   about 200 lines a second before).
//! - The loop waits before the next try: not at all after a connection
//!   aborted before it was accepted, and from [`BACKOFF_START`] doubling up
//!   to [`BACKOFF_MAX`] while resources (descriptors, buffers, memory) are
//!   short. Nothing ends the loop.
//! - [`Spare`] keeps descriptors in reserve: freeing one lets a listener take
//!   one connection while the process is at its file limit, to answer it
//!   (the admin port) or to tell the client why (503 on the client port).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a run of failures is logged at most.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// The first wait after a resource error.
pub const BACKOFF_START: Duration = Duration::from_millis(20);
/// The longest wait between tries while the errors go on.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Whether `e` says the process or the system is out of file descriptors
/// (EMFILE, ENFILE).
pub fn is_file_limit(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE)
    )
}

mod libc_errno {
    pub const EMFILE: i32 = nix::errno::Errno::EMFILE as i32;
    pub const ENFILE: i32 = nix::errno::Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = nix::errno::Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = nix::errno::Errno::ENOMEM as i32;
}

/// Where the relay ran into its file limit, for `clio_relay_file_limit_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// Accepting a client connection.
    ClientAccept,
    /// Accepting an admin connection.
    AdminAccept,
    /// Opening a stream's upstream connection.
    UpstreamConnect,
}

impl At {
    /// Every place, in label order.
    pub const ALL: [At; 3] = [At::ClientAccept, At::AdminAccept, At::UpstreamConnect];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            At::ClientAccept => "client_accept",
            At::AdminAccept => "admin_accept",
            At::UpstreamConnect => "upstream_connect",
        }
    }
}

/// Process-wide counts of accept errors and file-limit hits (shared by
/// every thread; touched only when something fails).
#[derive(Debug, Default)]
pub struct Faults {
    file_limit: [AtomicU64; 3],
    accept_errors: [AtomicU64; 2],
}

impl Faults {
    /// Counts one time the relay hit its file limit at `at`.
    pub fn file_limit(&self, at: At) {
        self.file_limit[at as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Times the relay hit its file limit at `at`.
    pub fn file_limit_count(&self, at: At) -> u64 {
        self.file_limit[at as usize].load(Ordering::Relaxed)
    }

    /// Accept errors on the client port (`admin == false`) or the admin port.
    pub fn accept_error_count(&self, admin: bool) -> u64 {
        self.accept_errors[admin as usize].load(Ordering::Relaxed)
    }

    /// The Prometheus text of these counters.
    pub fn render(&self, out: &mut String) {
        use crate::core::metrics::text::{family, Kind};
        let mut f = family(
            out,
            "clio_relay_file_limit_total",
            Kind::Counter,
            "Times the relay was at its file-descriptor limit, by where.",
        );
        for at in At::ALL {
            f.sample(&[("at", at.label())], self.file_limit_count(at));
        }
        let mut f = family(
            out,
            "clio_relay_accept_errors_total",
            Kind::Counter,
            "Failed accepts, by listener; the listener goes on.",
        );
        for (listener, admin) in [("client", false), ("admin", true)] {
            f.sample(&[("listener", listener)], self.accept_error_count(admin));
        }
    }
}

/// A run of failures on one thread: counted, logged once per [`LOG_EVERY`].
#[derive(Debug)]
pub struct Rate {
    what: &'static str,
    /// Failures since the last log line.
    unlogged: Cell<u64>,
    last_log: Cell<Option<Instant>>,
}

impl Rate {
    /// A rate-limited log of failures called `what` (the log message).
    pub fn new(what: &'static str) -> Rate {
        Rate {
            what,
            unlogged: Cell::new(0),
            last_log: Cell::new(None),
        }
    }

    /// Counts one failure, and logs it (with the count since the last line)
    /// if the last line is older than [`LOG_EVERY`].
    pub fn hit(&self, place: &str, error: &dyn std::fmt::Display) {
        self.unlogged.set(self.unlogged.get() + 1);
        let now = Instant::now();
        if self
            .last_log
            .get()
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                place,
                %error,
                count = self.unlogged.get(),
                per = ?LOG_EVERY,
                "{}",
                self.what
            );
            self.unlogged.set(0);
            self.last_log.set(Some(now));
        }
    }
}

/// One listener's accept failures: counted, logged at a bounded rate, and
/// the wait before the next try.
#[derive(Debug)]
pub struct AcceptErrors {
    place: &'static str,
    admin: bool,
    log: Rate,
    backoff: Cell<Duration>,
}

impl AcceptErrors {
    /// For the listener named `place` in logs (`admin`: the admin port).
    pub fn new(place: &'static str, admin: bool) -> AcceptErrors {
        AcceptErrors {
            place,
            admin,
            log: Rate::new("accept failed; the listener goes on"),
            backoff: Cell::new(Duration::ZERO),
        }
    }

    /// Counts and (rate-limited) logs a failed accept; returns how long to
    /// wait before the next one.
    pub fn failed(&self, faults: &Faults, e: &io::Error) -> Duration {
        faults.accept_errors[self.admin as usize].fetch_add(1, Ordering::Relaxed);
        if is_file_limit(e) {
            faults.file_limit(if self.admin {
                At::AdminAccept
            } else {
                At::ClientAccept
            });
        }
        self.log.hit(self.place, e);
        let short_of_resources = matches!(
            e.raw_os_error(),
            Some(
                libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM
            )
        );
        let wait = if short_of_resources {
            let prev = self.backoff.get();
            if prev.is_zero() {
                BACKOFF_START
            } else {
                (prev * 2).min(BACKOFF_MAX)
            }
        } else if e.kind() == io::ErrorKind::ConnectionAborted
            || e.kind() == io::ErrorKind::Interrupted
        {
            // That one connection is gone; the next may be fine.
            Duration::ZERO
        } else {
            BACKOFF_START
        };
        self.backoff.set(wait);
        wait
    }

    /// An accept succeeded: the next failure starts the backoff afresh.
    pub fn succeeded(&self) {
        if !self.backoff.get().is_zero() {
            self.backoff.set(Duration::ZERO);
        }
    }
}

/// Descriptors held in reserve (open on `/dev/null`), given up one at a
/// time when the process is at its file limit, and taken back when it can.
#[derive(Debug)]
pub struct Spare {
    fds: RefCell<Vec<OwnedFd>>,
    want: usize,
}

impl Spare {
    /// A reserve of `want` descriptors (as many as can be opened now).
    pub fn new(want: usize) -> Spare {
        let spare = Spare {
            fds: RefCell::new(Vec::with_capacity(want)),
            want,
        };
        spare.refill();
        spare
    }

    /// Gives up one reserved descriptor; false if none is left.
    pub fn release(&self) -> bool {
        self.fds.borrow_mut().pop().is_some()
    }

    /// Takes back what was given up, as far as the file limit allows.
    pub fn refill(&self) {
        let mut fds = self.fds.borrow_mut();
        while fds.len() < self.want {
            match std::fs::File::open("/dev/null") {
                Ok(f) => fds.push(f.into()),
                Err(_) => break,
            }
        }
    }

    /// Descriptors held now.
    pub fn held(&self) -> usize {
        self.fds.borrow().len()
    }
}

/// The process's soft limit on open files, if it can be read.
pub fn file_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Descriptors a relay needs besides its streams' sockets: listeners,
/// io_uring rings and event fds per executor, the reserves, the admin
/// port's connections, health checks and files.
pub fn headroom(shards: usize) -> u64 {
    64 + 16 * shards as u64
}

/// At start, before the shards: raises the soft file limit towards what
/// `max_streams` needs (two sockets a stream, plus [`headroom`]) as far as
/// the hard limit allows. Whether that is enough is said once the shards
/// listen ([`say_file_limit`]).
pub fn check_file_limit(max_streams: u32, shards: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = max_streams as u64 * 2 + headroom(shards);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < need {
        let raised = need.min(hard);
        if raised > soft && setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
            tracing::info!(from = soft, to = raised, "raised the open-file limit");
        }
    }
}

/// Descriptors kept free besides the streams' once the relay runs: the
/// admin port's connections beyond its reserve, health checks and usage
/// reads, name lookups, the key store's and the ledger's files.
const RUNNING_RESERVE: u64 = 32;

/// Once every shard listens: warns when `max_streams` streams (two sockets
/// each) do not fit in the open-file limit beside the descriptors the
/// relay holds now (its rings, event fds, listeners and spares, counted in
/// `/proc/self/fd`; [`headroom`] when that cannot be read), a fleet link
/// per shard and `RUNNING_RESERVE`, and says about how many do.
pub fn say_file_limit(max_streams: u32, shards: usize, fleet: bool) {
    use nix::sys::resource::{getrlimit, Resource};
    let Ok((limit, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let open = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or_else(|_| headroom(shards));
    let held = open + RUNNING_RESERVE + if fleet { shards as u64 } else { 0 };
    let fit = limit.saturating_sub(held) / 2;
    if fit < u64::from(max_streams) {
        tracing::warn!(
            file_limit = limit,
            open_now = open,
            needed = u64::from(max_streams) * 2 + held,
            max_streams,
            "server.max_streams x 2 + headroom exceeds the open-file limit: streams past about {fit} will be refused with 503 (raise LimitNOFILE / ulimit -n, or lower server.max_streams)",
        );
    }
}

/// `e`, which stopped the start: when it is the open-file limit (EMFILE),
/// with the limit, what `shards` shards take before any stream (their
/// rings, event fds and listeners; see [`headroom`]) and how to raise it;
/// else `e` as it is. Without this, "Too many open files" alone.
pub fn file_limit_at_start(e: io::Error, shards: usize) -> io::Error {
    use nix::sys::resource::{getrlimit, Resource};
    let emfile =
        e.raw_os_error() == Some(libc::EMFILE) || e.to_string().contains("Too many open files");
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return e;
    };
    if !emfile {
        return e;
    }
    io::Error::new(
        e.kind(),
        format!(
            "{e}: the open-file limit (`ulimit -n`) is {soft}, and {shards} shard{} take \
             about {} descriptors before any stream, two more per stream: raise it \
             (LimitNOFILE=65536 in the shipped systemd unit, `ulimit -n` in a shell, \
             `--ulimit nofile=65536` for `docker run`) or lower server.shards",
            if shards == 1 { "" } else { "s" },
            headroom(shards)
        ),
    )
}

/// The client port's answer to a failed accept: counts and logs it; at the
/// file limit, gives up the shard's spare descriptor to take one waiting
/// client and tell it so (HTTP 503, "relay at its file limit"); then waits
/// the backoff.
pub async fn client_accept_failed(
    shard: &crate::dataplane::shard::Shard,
    listener: &crate::dataplane::uring::RingListener,
    errors: &AcceptErrors,
    spare: &Spare,
    e: io::Error,
) {
    let wait = errors.failed(&shard.process.faults, &e);
    if is_file_limit(&e) && spare.release() {
        // Only a client already waiting: the accept is not left armed.
        if let Some(Ok(socket)) =
            crate::dataplane::io::timeout(Duration::ZERO, listener.accept()).await
        {
            shard
                .metrics
                .stream_rejected(crate::core::metrics::Side::Internal, 503);
            let conn =
                crate::dataplane::io::Duplex::new(crate::dataplane::io::Conn::Plain(socket.into()));
            let answer = crate::dataplane::http::json_error(503, FILE_LIMIT_MESSAGE);
            // Bounded: the loop must get back to accepting.
            let _ = crate::dataplane::io::timeout(Duration::from_millis(200), async {
                if conn.write_all(&answer).await.is_ok() {
                    crate::dataplane::http::close_gracefully(&conn, Duration::from_millis(100))
                        .await;
                }
            })
            .await;
        }
        spare.refill();
    }
    if !wait.is_zero() {
        glommio::timer::Timer::new(wait).await;
    }
}

/// What a client refused at the file limit is told.
pub const FILE_LIMIT_MESSAGE: &str = "relay at its file limit; try again later";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_resource_errors_and_not_on_aborted_connections() {
        let faults = Faults::default();
        let errors = AcceptErrors::new("test", false);
        let emfile = io::Error::from_raw_os_error(libc_errno::EMFILE);
        assert_eq!(errors.failed(&faults, &emfile), BACKOFF_START);
        assert_eq!(errors.failed(&faults, &emfile), BACKOFF_START * 2);
        for _ in 0..20 {
            errors.failed(&faults, &emfile);
        }
        assert_eq!(errors.failed(&faults, &emfile), BACKOFF_MAX);
        let enobufs = io::Error::from_raw_os_error(libc_errno::ENOBUFS);
        assert_eq!(errors.failed(&faults, &enobufs), BACKOFF_MAX);
        errors.succeeded();
        assert_eq!(errors.failed(&faults, &enobufs), BACKOFF_START);
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.failed(&faults, &aborted), Duration::ZERO);
        assert_eq!(faults.file_limit_count(At::ClientAccept), 23);
        assert_eq!(faults.accept_error_count(false), 26);
        assert_eq!(faults.accept_error_count(true), 0);
    }

    #[test]
    fn spare_descriptors_are_given_up_and_taken_back() {
        let spare = Spare::new(3);
        assert_eq!(spare.held(), 3);
        assert!(spare.release());
        assert!(spare.release());
        assert_eq!(spare.held(), 1);
        spare.refill();
        assert_eq!(spare.held(), 3);
    }
}
