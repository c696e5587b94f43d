//! `clio-relay run`: a relay as a process. Signals (SIGHUP reloads,
//! SIGTERM drains, SIGINT stops), systemd's notifications and watchdog,
//! and what the host refuses it once it runs (a thread limit). The relay
//! itself, started and driven through [`RelayHandle`], is `cli::server`.

use std::sync::Arc;

use crate::cli::server::{start_joining, RelayHandle};
use crate::core::config::Config;

/// `e`, which stopped the start: when a thread was refused (EAGAIN from
/// `clone`: a pids limit such as systemd's `TasksMax=`, a container's
/// `--pids-limit` or `ulimit -u`, which counts the user's threads), with
/// what the relay needs and what to change; else `e` as it is. Without
/// this, "Resource temporarily unavailable" alone.
fn thread_limit_at_start(e: std::io::Error, shards: usize) -> std::io::Error {
    let refused = e.raw_os_error() == Some(libc::EAGAIN)
        || e.to_string().contains("Resource temporarily unavailable");
    if !refused {
        return e;
    }
    std::io::Error::new(
        e.kind(),
        format!(
            "a thread could not be started: {e}. The host limits the relay's threads: \
             {shards} shard{} run 2 threads each, and the relay about 8 more (its admin \
             port, log, watchdog, fleet, name lookups). Raise the limit: TasksMax= in a \
             systemd unit, `--pids-limit` for `docker run` (a pod's pids limit on \
             Kubernetes), `ulimit -u` (counted with the user's other processes); or \
             lower server.shards",
            if shards == 1 { "" } else { "s" },
        ),
    )
}

/// The next of the blocked signals in `set`, waiting at most `limit`.
fn wait_signal(
    set: &nix::sys::signal::SigSet,
    limit: std::time::Duration,
) -> Option<nix::sys::signal::Signal> {
    let ts = libc::timespec {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_nsec: limit.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid signal set and timeout; no siginfo is asked for.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    nix::sys::signal::Signal::try_from(n).ok()
}

/// Re-reads the config file at `path` and applies it to `relay`, logging
/// what changed, what needs a restart and what was refused (SIGHUP). The
/// new `limits.drain_timeout` when the reload was applied.
fn reload_from(path: &std::path::Path, relay: &RelayHandle) -> Option<std::time::Duration> {
    let new = match Config::load(path) {
        Ok(new) => new,
        Err(e) => {
            for p in &e.problems {
                tracing::error!(config = %path.display(), problem = %p, "SIGHUP: reload refused, the running configuration is kept");
            }
            if e.unset_env {
                tracing::warn!(
                    "SIGHUP: a running relay reads its environment only when it starts: \
                     a variable set since takes a restart; a *_file is read again at \
                     each reload (an account's key also changes with `clio-relay keys rotate`)"
                );
            }
            return None;
        }
    };
    let changes = match relay.reload(&new) {
        Ok(changes) => changes,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: reload failed");
            return None;
        }
    };
    let refused = changes.iter().any(|c| c.starts_with("refused: "));
    if !refused {
        let warnings = new.warnings_besides_accounts();
        for w in relay.account_warnings().into_iter().chain(warnings) {
            tracing::warn!(warning = %w, "SIGHUP: config valid, but probably not meant");
        }
    }
    for c in changes {
        if let Some(why) = c.strip_prefix("refused: ") {
            tracing::error!(config = %path.display(), problem = %why, "SIGHUP: reload refused, the running configuration is kept");
        } else if c.starts_with("unchanged: ") {
            tracing::warn!(change = %c, "SIGHUP: needs a restart");
        } else {
            tracing::info!(change = %c, "SIGHUP: reloaded");
        }
    }
    (!refused).then_some(new.limits.drain_timeout)
}

/// Runs the relay from the config file at `path` until SIGTERM or SIGINT.
///
/// - Under systemd: takes the listening sockets it passed (socket
///   activation), sends READY=1 once everything listens, STATUS= with live
///   streams and WATCHDOG=1 while every shard answers, RELOADING=1 around
///   SIGHUP, STOPPING=1 on SIGTERM/SIGINT.
/// - SIGHUP re-reads the file and applies it live; an invalid file is
///   refused with its problems logged, and the running configuration kept.
///   A SIGTERM or SIGINT during a reload (one waiting for an admin thread
///   inside a slow disk write) is taken at once; a SIGHUP during one reads
///   the file again once it is done.
/// - SIGTERM drains (see [`RelayHandle::drain`]); SIGINT stops at once,
///   during a drain too. A second SIGTERM, or a SIGHUP, during a drain
///   is logged and changes nothing.
/// - `join_client_port`: see [`start_joining`].
pub fn run(path: &std::path::Path, join_client_port: bool) -> Result<(), crate::cli::CliError> {
    use crate::cli::systemd::{Notifier, Watchdog};
    use nix::sys::signal::{SigSet, Signal};
    let notify = Notifier::from_env();
    // Before any thread starts: the sockets systemd passed, and the signal
    // mask every thread inherits (only this thread receives them).
    let sockets = crate::cli::systemd::listen_fds()?;
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block().map_err(std::io::Error::from)?;
    // A write past the process's file-size limit (`ulimit -f`, systemd's
    // `LimitFSIZE=`) then fails with EFBIG like any failed write (the key
    // store's 500, the usage ledger kept in memory), instead of SIGXFSZ
    // ending the relay and every live stream with it.
    // SAFETY: SIG_IGN installs no handler, so no code runs in signal
    // context; it is set before any thread starts.
    unsafe { nix::sys::signal::signal(Signal::SIGXFSZ, nix::sys::signal::SigHandler::SigIgn) }
        .map_err(std::io::Error::from)?;
    let cfg = Config::load(path).map_err(|e| crate::cli::config_error(path, &e))?;
    // What check-config would warn about: the journal is where an operator
    // who never ran it looks. What the accounts' limits say is said of the
    // account set the relay runs (the key store's changes, or the fleet's,
    // merged in), once it runs.
    for w in cfg.warnings_besides_accounts() {
        tracing::warn!(warning = %w, "config: valid, but probably not meant");
    }
    if !sockets.is_empty() {
        tracing::info!(
            client = sockets.client.is_some(),
            admin = sockets.admin.is_some(),
            "using sockets passed by systemd"
        );
        for w in sockets.address_mismatches(cfg.server.listen, cfg.server.admin_listen) {
            tracing::warn!(warning = %w, "socket activation: not the config file's address");
        }
    }
    let mut drain_timeout = cfg.limits.drain_timeout;
    let shards = cfg.server.shard_count();
    let relay = Arc::new(
        start_joining(&cfg, sockets, join_client_port)
            .map_err(|e| crate::dataplane::accept::file_limit_at_start(e, shards))
            .map_err(|e| thread_limit_at_start(e, shards))?,
    );
    for w in relay.account_warnings() {
        tracing::warn!(warning = %w, "config: valid, but probably not meant");
    }
    notify.ready();
    let watchdog = {
        let relay = relay.clone();
        let every = Notifier::watchdog_interval().unwrap_or(std::time::Duration::from_secs(5));
        Watchdog::spawn(notify.clone(), every, move |limit| {
            let alive = relay.alive(limit)?;
            let streams = format!("{} live streams", relay.process.live_streams());
            Ok(match alive.admin_on_disk {
                None => streams,
                Some(wait) => {
                    tracing::warn!(
                        waited_s = wait.as_secs(),
                        "watchdog: the admin thread waits on a disk write (a reload or the \
                         stop's flush) and takes no message from this thread until it ends; \
                         the streams go on and the relay is kept alive: a restart would cut \
                         them and meet the same disk"
                    );
                    format!(
                        "{streams}; admin thread waiting on the disk for {} s",
                        wait.as_secs()
                    )
                }
            })
        })
        .map_err(|e| thread_limit_at_start(e, shards))?
    };
    // A reload a stop did not wait for: the relay's usage is saved at the
    // end (`RelayHandle::shutdown`) only once it lets go of the relay.
    let mut unfinished_reload = None;
    let signal = loop {
        match set.wait().map_err(std::io::Error::from)? {
            Signal::SIGHUP => {
                notify.reloading();
                // On a thread of its own, so that this one still takes
                // signals: the admin thread applies the reload, which
                // waits for its writes (key dates, key store), on a slow
                // disk for seconds, and a SIGTERM or SIGINT must not.
                let mut again = true;
                let mut stop = None;
                while again && stop.is_none() {
                    again = false;
                    let spawned = {
                        let relay = relay.clone();
                        let path = path.to_path_buf();
                        std::thread::Builder::new()
                            .name("reload".into())
                            .spawn(move || reload_from(&path, &relay))
                    };
                    let job = match spawned {
                        Ok(job) => job,
                        Err(e) => {
                            // A thread limit (TasksMax=) stops no relay
                            // at a reload: this thread reloads, as it did
                            // before reloads had their own.
                            tracing::warn!(error = %e, "SIGHUP: no thread for the reload; reloading on the main thread, which takes no signal until it is done");
                            if let Some(t) = reload_from(path, &relay) {
                                drain_timeout = t;
                            }
                            continue;
                        }
                    };
                    while !job.is_finished() {
                        match wait_signal(&set, std::time::Duration::from_millis(200)) {
                            Some(sig @ (Signal::SIGTERM | Signal::SIGINT)) => {
                                tracing::warn!(signal = %sig, "stopping during a reload that waits for the admin thread; the reload may still apply meanwhile");
                                stop = Some(sig);
                                break;
                            }
                            Some(Signal::SIGHUP) => again = true,
                            _ => {}
                        }
                    }
                    if stop.is_some() {
                        unfinished_reload = Some(job);
                    } else if let Ok(Some(t)) = job.join() {
                        drain_timeout = t;
                    }
                }
                if let Some(sig) = stop {
                    break sig;
                }
                notify.ready();
            }
            sig => break sig,
        }
    };
    notify.stopping();
    if signal == Signal::SIGTERM {
        tracing::info!(deadline = ?drain_timeout, live = relay.process.live_streams(), "SIGTERM: draining");
        // On a thread of its own, so that this one still takes signals:
        // SIGINT stops at once, a drain under way too.
        let spawned = {
            let relay = relay.clone();
            std::thread::Builder::new()
                .name("drain".into())
                .spawn(move || relay.drain(drain_timeout))
        };
        let cut = match spawned {
            Ok(drain) => {
                while !drain.is_finished() {
                    match wait_signal(&set, std::time::Duration::from_millis(200)) {
                        Some(Signal::SIGINT) => {
                            tracing::info!("SIGINT while draining: stopping now");
                            relay.process.stop_now();
                        }
                        Some(Signal::SIGTERM) => tracing::info!("SIGTERM: already draining"),
                        Some(Signal::SIGHUP) => {
                            tracing::warn!(
                                "SIGHUP while draining: the configuration is not reloaded"
                            )
                        }
                        _ => {}
                    }
                }
                drain.join().unwrap_or(0)
            }
            Err(e) => {
                // A thread limit (TasksMax=) does not turn a drain into a
                // cut: this thread drains, taking no SIGINT meanwhile.
                tracing::warn!(error = %e, "SIGTERM: no thread for the drain; draining on the main thread, which takes no signal until it is done");
                relay.drain(drain_timeout)
            }
        };
        if relay.process.stopping_now() {
            tracing::info!(live = cut, "stopped during the drain");
        } else {
            tracing::info!(finalized = cut, "drained");
        }
    } else {
        tracing::info!(signal = %signal, "stopping now");
    }
    watchdog.stop();
    if let Some(job) = unfinished_reload {
        let _ = job.join();
    }
    match Arc::try_unwrap(relay) {
        Ok(relay) => relay.shutdown(),
        Err(relay) => drop(relay),
    }
    Ok(())
}
