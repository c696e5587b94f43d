//! The two small pieces of the systemd protocol the relay speaks, written
//! by hand (no libsystemd):
//!
//! - **sd_notify** ([`Notifier`]): `READY=1` once every shard listens,
//!   `STATUS=` lines, `WATCHDOG=1` keep-alives, `RELOADING=1` around SIGHUP
//!   and `STOPPING=1` on SIGTERM, as datagrams to `$NOTIFY_SOCKET`. Without
//!   that variable (not under systemd, or `Type=simple`) every call is a no-op.
//! - **Socket activation** ([`listen_fds`]): the listening sockets systemd
//!   passes as fds 3, 4, … (`$LISTEN_PID`, `$LISTEN_FDS`, `$LISTEN_FDNAMES`),
//!   picked by their `FileDescriptorName=` (`client`, `admin`).
//!
//! See `systemd/clio-relay.service` and `systemd/clio-relay.socket`, and the
//! README's "Running under systemd" runbook.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The environment variable naming systemd's notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The `FileDescriptorName=` of the client port's socket.
pub const CLIENT_FD_NAME: &str = "client";

/// The `FileDescriptorName=` of the admin port's socket.
pub const ADMIN_FD_NAME: &str = "admin";

// ---------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------

/// An sd_notify client. [`Notifier::from_env`] reads `$NOTIFY_SOCKET` once
/// (a path, or `@name` for an abstract socket); each call sends one datagram.
/// When the variable is unset, every call is a no-op that returns `Ok`.
///
/// Cheap to clone (one shared socket), `Send` and `Sync`: the main thread,
/// the watchdog thread and the admin thread may all hold one. The sender is
/// the process itself, so `NotifyAccess=main` accepts messages from any of
/// its threads.
///
/// `$NOTIFY_SOCKET` is left in the environment: nothing the relay starts
/// should talk to systemd, and it starts nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Target>>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: UnixAddr,
    /// `$NOTIFY_SOCKET` as read, for messages.
    name: String,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, or a disabled one when it is
    /// unset or unusable (the reason is logged).
    pub fn from_env() -> Notifier {
        match std::env::var_os(NOTIFY_SOCKET) {
            None => Notifier::disabled(),
            Some(v) => match v.to_str().map(Notifier::for_socket) {
                Some(Ok(n)) => n,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "NOTIFY_SOCKET unusable; not notifying systemd");
                    Notifier::disabled()
                }
                None => {
                    tracing::warn!("NOTIFY_SOCKET is not UTF-8; not notifying systemd");
                    Notifier::disabled()
                }
            },
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { inner: None }
    }

    /// A notifier for this socket: an absolute path, or `@name` for a
    /// socket in the abstract namespace.
    pub fn for_socket(socket: &str) -> io::Result<Notifier> {
        let addr = if let Some(name) = socket.strip_prefix('@') {
            UnixAddr::from_abstract_name(name.as_bytes())?
        } else if socket.starts_with('/') {
            UnixAddr::from_pathname(socket)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={socket:?}: neither an absolute path nor @abstract"),
            ));
        };
        // Non-blocking: a reader that stopped reading fills the socket's
        // queue, and a send must then fail (logged), not hang the thread
        // that sends (the watchdog's, or a drain's `STOPPING=1`).
        let sender = UnixDatagram::unbound()?;
        sender.set_nonblocking(true)?;
        Ok(Notifier {
            inner: Some(Arc::new(Target {
                socket: sender,
                addr,
                name: socket.to_string(),
            })),
        })
    }

    /// Whether messages go anywhere (`$NOTIFY_SOCKET` was set).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Sends `state` as one datagram: newline-separated `KEY=VALUE`
    /// assignments, e.g. `"READY=1\nSTATUS=listening"`. `Ok` when disabled.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let Some(t) = &self.inner else {
            return Ok(());
        };
        let n = t.socket.send_to_addr(state.as_bytes(), &t.addr)?;
        if n != state.len() {
            return Err(io::Error::other(format!(
                "{}: short datagram ({n} of {} bytes)",
                t.name,
                state.len()
            )));
        }
        Ok(())
    }

    /// `READY=1`: call once every shard and the admin port listen.
    pub fn ready(&self) {
        self.log("READY=1");
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (systemd 253+ needs it to
    /// match the reload with the `ExecReload=` job): call on SIGHUP before
    /// re-reading the config, and call [`Notifier::ready`] when done, whether
    /// the reload was applied or refused.
    pub fn reloading(&self) {
        self.log(&reloading_message(monotonic_usec()));
    }

    /// `STOPPING=1`: call on SIGTERM/SIGINT, before draining.
    pub fn stopping(&self) {
        self.log("STOPPING=1");
    }

    /// `STATUS=text`, the line `systemctl status` shows. Newlines in `text`
    /// become spaces (a newline would start a new assignment).
    pub fn status(&self, text: &str) {
        self.log(&status_message(text));
    }

    /// `WATCHDOG=1`: the keep-alive behind `WatchdogSec=`.
    pub fn watchdog(&self) {
        self.log("WATCHDOG=1");
    }

    /// `EXTEND_TIMEOUT_USEC=`: asks for `more` time than the unit's start,
    /// reload or stop timeout allows (e.g. while a long drain goes on).
    pub fn extend_timeout(&self, more: Duration) {
        self.log(&format!("EXTEND_TIMEOUT_USEC={}", more.as_micros()));
    }

    fn log(&self, state: &str) {
        if let Err(e) = self.send(state) {
            let first = state.lines().next().unwrap_or_default();
            tracing::warn!(error = %e, state = first, "sd_notify failed");
        }
    }

    /// The watchdog keep-alive interval: half of `$WATCHDOG_USEC`, as
    /// systemd recommends, when `WatchdogSec=` is set for this process
    /// (`$WATCHDOG_PID` unset or our pid). `None` without a watchdog.
    pub fn watchdog_interval() -> Option<Duration> {
        watchdog_interval_from(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }
}

fn reloading_message(usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

fn status_message(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("STATUS={one_line}")
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares
/// `MONOTONIC_USEC=` with.
pub fn monotonic_usec() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000,
        Err(_) => 0,
    }
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(our_pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// What a watchdog tick found: a status line, or why the relay is not
/// alive (shown in systemd's status and logged; never holds a secret).
pub type Tick = Result<String, Box<dyn std::error::Error + Send + Sync>>;

/// A thread that, every `every`, calls a check and reports to systemd: on
/// `Ok(status)` it sends `WATCHDOG=1` and `STATUS=status`; on `Err(why)` it
/// sends only `STATUS=watchdog: why` and logs it, so that systemd, seeing no
/// keep-alive within `WatchdogSec=`, kills and restarts the relay.
/// Stopped (and joined) by [`Watchdog::stop`] or on drop.
///
/// The check is given how long it may take: all the time systemd allows
/// before it would kill ([`check_limit`]), so a thread that is slow to
/// answer, not hung, keeps the relay alive. A shorter, fixed limit would
/// kill a relay under heavy load: with keep-alives every `WatchdogSec/2`,
/// one check that fails leaves the next too late.
#[derive(Debug)]
pub struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    join: Option<JoinHandle<()>>,
}

/// How long a watchdog check started at `now` may take, when the last
/// keep-alive went at `last_ok` and keep-alives are due every `every`
/// (half of `WatchdogSec=`): until a tenth of `every` before systemd's
/// deadline (`last_ok + 2 * every`), and never less than that tenth, so
/// that a check past the deadline still runs and reports.
pub fn check_limit(last_ok: Instant, now: Instant, every: Duration) -> Duration {
    let margin = every / 10;
    (last_ok + every * 2)
        .saturating_duration_since(now + margin)
        .max(margin)
}

impl Watchdog {
    /// Starts the loop. `every` is usually [`Notifier::watchdog_interval`],
    /// or a few seconds for status updates alone when there is no watchdog
    /// (then `WATCHDOG=1` is still sent and systemd ignores it). The first
    /// tick runs at once; then one every `every`, counted from when the
    /// last one began, not ended. `check` gets the time it may take
    /// ([`check_limit`]).
    pub fn spawn<F>(notifier: Notifier, every: Duration, mut check: F) -> io::Result<Watchdog>
    where
        F: FnMut(Duration) -> Tick + Send + 'static,
    {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let join = std::thread::Builder::new()
            .name("clio-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                // systemd's timer runs from the start (READY=1 came just before).
                let mut last_ok = Instant::now();
                let mut next = last_ok;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !*stopped {
                    drop(stopped);
                    let began = Instant::now();
                    match check(check_limit(last_ok, began, every)) {
                        Ok(status) => {
                            notifier.log(&format!("WATCHDOG=1\n{}", status_message(&status)));
                            last_ok = Instant::now();
                        }
                        Err(why) => {
                            tracing::error!(reason = %why, "watchdog: not alive; no keep-alive sent");
                            notifier.status(&format!("watchdog: {why}"));
                        }
                    }
                    // The next tick: `every` after this one began, or at
                    // once if this one took longer.
                    next = (next + every).max(began);
                    stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while !*stopped {
                        let left = next.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        stopped = cv
                            .wait_timeout(stopped, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            })?;
        Ok(Watchdog {
            stop,
            join: Some(join),
        })
    }

    /// Ends the loop and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.halt();
    }
}

// ---------------------------------------------------------------------------
// Socket activation
// ---------------------------------------------------------------------------

/// The listening sockets systemd passed (socket activation), by role.
///
/// Roles come from `FileDescriptorName=` (`client`, `admin`); sockets with
/// other names fill the roles still free in order: the first is the client
/// port, the second the admin port. A role with no socket is `None`: the
/// relay binds that port itself, from the config.
///
/// Every fd is a listening TCP socket, close-on-exec and non-blocking (so
/// glommio's first, direct `accept` never blocks a shard, even when several
/// shards share the socket through `try_clone`).
#[derive(Debug, Default)]
pub struct Activated {
    /// The client WebSocket port.
    pub client: Option<OwnedFd>,
    /// The admin port.
    pub admin: Option<OwnedFd>,
}

impl Activated {
    /// Whether systemd passed no socket for either role.
    pub fn is_empty(&self) -> bool {
        self.client.is_none() && self.admin.is_none()
    }

    /// One line for each passed socket bound elsewhere than the config
    /// file's address for its role (`listen`, `admin_listen`).
    ///
    /// The relay serves on what systemd passed and never binds the
    /// file's address then, so a socket unit left behind when the file
    /// changed (or the other way round) goes unseen: clients and
    /// balancers sent to the file's address find nothing, and `clio-relay
    /// keys`, which reads `server.admin_listen`, cannot reach the relay.
    /// Port 0 in the file matches any port; `0.0.0.0` and `[::]` match
    /// each other (a `ListenStream=` with a port alone binds `[::]`,
    /// which takes IPv4 too).
    pub fn address_mismatches(&self, listen: SocketAddr, admin_listen: SocketAddr) -> Vec<String> {
        let same = |passed: SocketAddr, file: SocketAddr| {
            let ip = passed.ip() == file.ip()
                || (passed.ip().is_unspecified() && file.ip().is_unspecified());
            ip && (file.port() == 0 || passed.port() == file.port())
        };
        let roles = [
            (&self.client, listen, "server.listen", "clio-relay.socket"),
            (
                &self.admin,
                admin_listen,
                "server.admin_listen",
                "clio-relay-admin.socket",
            ),
        ];
        let mut out = Vec::new();
        for (fd, file, key, unit) in roles {
            let Some(passed) = fd.as_ref().and_then(|fd| local_addr(fd).ok()) else {
                continue;
            };
            if !same(passed, file) {
                out.push(format!(
                    "{key} is {file}, but systemd passed the socket on {passed} and the relay \
                     serves there, not on {file}; what reads {key} (clients, the balancer's \
                     checks, `clio-relay keys`) looks in the wrong place: make {unit}'s \
                     ListenStream= and {key} the same address"
                ));
            }
        }
        out
    }
}

/// Takes the sockets systemd passed, if it passed any to this process
/// (`$LISTEN_PID` is our pid). Either way `$LISTEN_PID`, `$LISTEN_FDS` and
/// `$LISTEN_FDNAMES` are removed from the environment, so nothing started
/// later inherits them and a second call returns nothing.
///
/// Call it once, early in `main`/`run::run`, before other threads start
/// (it edits the environment). Errors: a malformed `$LISTEN_FDS`, or a
/// passed fd that is not a listening TCP socket (e.g. a `ListenDatagram=`).
pub fn listen_fds() -> io::Result<Activated> {
    let var = |k: &str| std::env::var(k).ok();
    let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    // SAFETY: the variables were just removed, so the fds they describe are
    // taken at most once per process; `activated_from` checks each is open.
    unsafe {
        activated_from(
            std::process::id(),
            pid.as_deref(),
            fds.as_deref(),
            names.as_deref(),
            LISTEN_FDS_START,
        )
    }
}

/// The parsing behind [`listen_fds`], with the environment and the first fd
/// passed in.
///
/// # Safety
/// When `pid_env` equals `our_pid`, the fds `first_fd ..` that `fds_env`
/// counts are taken over (and closed on drop or error): nothing else may own them.
pub(crate) unsafe fn activated_from(
    our_pid: u32,
    pid_env: Option<&str>,
    fds_env: Option<&str>,
    names_env: Option<&str>,
    first_fd: RawFd,
) -> io::Result<Activated> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let Some(pid) = pid_env else {
        return Ok(Activated::default());
    };
    if pid.trim().parse::<u32>().ok() != Some(our_pid) {
        // Meant for another process (e.g. inherited): not ours to take.
        return Ok(Activated::default());
    }
    let Some(n) = fds_env else {
        return Ok(Activated::default());
    };
    let n: RawFd = n
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| bad(format!("LISTEN_FDS={n:?} is not a count of fds")))?;
    // Own every fd first, so that all are closed if one is refused.
    let mut fds = Vec::with_capacity(n as usize);
    for fd in first_fd..first_fd + n {
        nix::fcntl::fcntl(fd, nix::fcntl::F_GETFD)
            .map_err(|e| bad(format!("LISTEN_FDS: fd {fd} is not open ({e})")))?;
        // SAFETY: open, and ours by the caller's promise.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let mut names: Vec<&str> = names_env
        .map(|s| s.split(':').collect())
        .unwrap_or_default();
    if names.len() != fds.len() {
        if names_env.is_some() {
            tracing::warn!(
                names = names_env.unwrap_or_default(),
                fds = n,
                "LISTEN_FDNAMES does not match LISTEN_FDS; names ignored"
            );
        }
        names = vec![""; fds.len()];
    }
    let mut out = Activated::default();
    let mut unnamed = Vec::new();
    for (fd, name) in fds.into_iter().zip(names) {
        prepare(&fd).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("LISTEN_FDS: fd {} ({name:?}): {e}", fd.as_raw_fd()),
            )
        })?;
        let slot = match name {
            CLIENT_FD_NAME => &mut out.client,
            ADMIN_FD_NAME => &mut out.admin,
            _ => {
                unnamed.push((name, fd));
                continue;
            }
        };
        if slot.is_some() {
            return Err(bad(format!(
                "LISTEN_FDNAMES: two sockets are named {name:?}"
            )));
        }
        *slot = Some(fd);
    }
    for (name, fd) in unnamed {
        if out.client.is_none() {
            out.client = Some(fd);
        } else if out.admin.is_none() {
            out.admin = Some(fd);
        } else {
            tracing::warn!(
                fd = fd.as_raw_fd(),
                name,
                "socket activation: an extra socket, closed"
            );
        }
    }
    Ok(out)
}

/// Checks `fd` is a listening TCP socket; makes it close-on-exec and
/// non-blocking.
fn prepare(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    let ty = getsockopt(fd, sockopt::SockType).map_err(io::Error::from)?;
    if ty != SockType::Stream {
        return Err(invalid("not a stream socket (use ListenStream=)"));
    }
    if !getsockopt(fd, sockopt::AcceptConn).map_err(io::Error::from)? {
        return Err(invalid("not listening"));
    }
    local_addr(fd)?;
    let raw = fd.as_raw_fd();
    let fdflags = FdFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFD)?);
    fcntl(raw, FcntlArg::F_SETFD(fdflags | FdFlag::FD_CLOEXEC))?;
    let flags = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    fcntl(raw, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// The IP address and port a socket is bound to (for logs: which port
/// systemd gave us). An error for a non-IP socket.
pub fn local_addr(fd: &impl AsFd) -> io::Result<SocketAddr> {
    socket2::SockRef::from(fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP (TCP) socket"))
}

#[cfg(test)]
mod tests;
