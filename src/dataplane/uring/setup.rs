//! Why an io_uring could not be set up, in words an operator can act on.
//!
//! A shard's executor, its data-plane ring and the admin thread's executor
//! each set up io_uring at start. That fails on the host's limits, not on
//! anything the relay was given, and the kernel's word alone ("Cannot
//! allocate memory", "Operation not permitted") names neither the limit
//! nor the setting to change; glommio's own check of the locked-memory
//! limit reports two bare numbers.

use std::io;

/// Locked memory each glommio executor pins (its io_uring buffers),
/// measured as `VmPin` in `/proc/PID/status`: a relay pins this once for
/// its admin thread and once per shard.
pub const PINNED_PER_EXECUTOR: u64 = 192 * 1024;

/// `e`, from setting up an io_uring, with what to do about it; any other
/// error as it is.
pub fn setup_failed(e: io::Error) -> io::Error {
    let what = match e.raw_os_error() {
        Some(libc::ENOMEM) if !locked_limit_binds() => memory_refused(&e),
        Some(libc::ENOMEM) => locked_memory(&e),
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "io_uring is not allowed here: {e}. Check `sysctl kernel.io_uring_disabled` \
             (0 allows it) and the seccomp profile (Docker's default refuses io_uring: \
             run with one that allows io_uring_setup, io_uring_enter and \
             io_uring_register)"
        ),
        Some(libc::ENOSYS) => format!(
            "io_uring could not be set up: {e}. The relay needs Linux 6.1 or later \
             (`uname -r`) built with io_uring (CONFIG_IO_URING); on such a kernel, a \
             seccomp profile refuses it (a container runtime's answers ENOSYS for calls it \
             does not know: run with one that allows io_uring_setup, io_uring_enter and \
             io_uring_register)"
        ),
        Some(libc::EINVAL) => format!(
            "io_uring could not be set up: {e}. The relay needs Linux 6.1 or later \
             (`uname -r`) for the rings it sets up"
        ),
        _ => return e,
    };
    io::Error::new(e.kind(), what)
}

/// Refuses to start, with what to change, when the host refuses io_uring
/// (a seccomp profile, `kernel.io_uring_disabled`, a kernel without it):
/// makes the three calls every executor makes (`io_uring_setup`,
/// `io_uring_register`, `io_uring_enter`) on a small ring of its own,
/// before any executor starts. Left to the first shard, glommio panics in
/// its thread and blames the kernel's age.
pub fn check_io_uring() -> io::Result<()> {
    on_a_thread_of_its_own(|| {
        let ring = io_uring::IoUring::new(2)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        ring.submit()?;
        Ok(())
    })
    .map_err(setup_failed)
}

/// Runs `f`, which sets up an io_uring ring and closes it, on a thread
/// that ends with it. A thread that has used a ring is sent the ring's
/// exit work when the ring is closed (task work, raised as a signal a
/// moment later), and a blocking socket call with a timeout on that thread
/// then fails with EINTR: run on the caller's thread, the checks below
/// broke the demo's and the tests' clients (a read of a live stream
/// failed "Interrupted system call") whenever they ran on a thread that
/// later waited on a socket. A thread that ends takes its io_uring
/// context with it.
fn on_a_thread_of_its_own<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name("clio-uring-check".into())
        .spawn(f)?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the io_uring check panicked")))
}

/// Why a glommio executor thread (a shard's or the admin thread's) ended
/// before it listened, from its result, explained as [`setup_failed`] does.
pub fn executor_failed(who: &str, ended: glommio::Result<(), ()>) -> io::Error {
    let e = match ended {
        Ok(()) => return io::Error::other(format!("the {who} thread ended before listening")),
        Err(e) => setup_failed(io::Error::from(e)),
    };
    io::Error::new(e.kind(), format!("the {who} thread did not start: {e}"))
}

/// The lowest locked-memory limit glommio starts an executor with (its
/// `Reactor::new` refuses a lower one, in words that name no setting).
pub const GLOMMIO_MIN_LOCKED_MEMORY: u64 = 512 * 1024;

/// Refuses to start, with what to change, when the locked-memory limit is
/// under what glommio needs; checked before any executor starts.
pub fn check_locked_memory() -> io::Result<()> {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft < GLOMMIO_MIN_LOCKED_MEMORY => Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            locked_memory(&"too little locked memory"),
        )),
        _ => Ok(()),
    }
}

/// Bytes a kernel that counts io_uring's rings as locked memory counts for
/// a ring of `sq` submissions and `cq` completions: the rings (a 192-byte
/// header, 16 bytes a completion, 4 a submission's index) and the
/// submissions (64 bytes each), each rounded up to whole pages.
fn ring_bytes(sq: u64, cq: u64) -> u64 {
    const PAGE: u64 = 4096;
    (192 + 16 * cq + 4 * sq).div_ceil(PAGE) * PAGE + (64 * sq).div_ceil(PAGE) * PAGE
}

/// Locked memory a shard takes on a kernel that counts io_uring's rings
/// against the limit (Linux 6.18 does): glommio's three rings (main,
/// latency, poll) of `RING_DEPTH` submissions and twice as many
/// completions, the data-plane ring, and the registered buffers.
fn locked_per_shard() -> u64 {
    let depth = crate::dataplane::shard::RING_DEPTH as u64;
    3 * ring_bytes(depth, 2 * depth)
        + ring_bytes(u64::from(super::SQ_ENTRIES), u64::from(super::CQ_ENTRIES))
        + PINNED_PER_EXECUTOR
}

/// The admin thread's: glommio's three rings at its default depth (128)
/// and the registered buffers; with room for the small rings the start's
/// checks and glommio's probe set up, which the kernel releases only
/// after a moment.
fn locked_admin() -> u64 {
    3 * ring_bytes(128, 256) + PINNED_PER_EXECUTOR + 64 * 1024
}

/// Whether this kernel counts a new ring's memory against this process's
/// locked-memory limit: a small ring is set up under a limit of 0 for the
/// moment (the process's other threads lock nothing then). No, when it
/// holds CAP_IPC_LOCK or the kernel counts only registered buffers (which
/// glommio does without when the limit is short).
fn rings_counted() -> bool {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // With CAP_IPC_LOCK nothing counts, and the limit is not lowered under
    // another thread's start (tests run relays side by side as root).
    if has_ipc_lock() {
        return false;
    }
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) else {
        return false;
    };
    if setrlimit(Resource::RLIMIT_MEMLOCK, 0, hard).is_err() {
        return false;
    }
    let refused = on_a_thread_of_its_own(|| io_uring::IoUring::new(1).map(drop))
        .is_err_and(|e| e.raw_os_error() == Some(libc::ENOMEM));
    let _ = setrlimit(Resource::RLIMIT_MEMLOCK, soft, hard);
    refused
}

/// Whether this process holds CAP_IPC_LOCK (bit 14 of `CapEff`), which
/// the kernel's locked-memory accounting passes over.
fn has_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let caps = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(caps.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

/// Whether the locked-memory limit can be why a ring's memory was
/// refused: not with CAP_IPC_LOCK (root) or an unlimited limit.
fn locked_limit_binds() -> bool {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let unlimited = matches!(
        getrlimit(Resource::RLIMIT_MEMLOCK),
        Ok((soft, _)) if soft == RLIM_INFINITY
    );
    !unlimited && !has_ipc_lock()
}

/// A ring's memory refused (`cause`) where the locked-memory limit does
/// not bind: the memory cgroup (a container's or a pod's memory limit,
/// systemd's `MemoryMax=`) or the host is short of it.
fn memory_refused(cause: &dyn std::fmt::Display) -> String {
    format!(
        "io_uring could not be set up: {cause}. The locked-memory limit does not bind \
         this process (CAP_IPC_LOCK, or unlimited), so the kernel could not give the \
         rings their memory: about {:.1} MiB for each shard and {} KiB for the admin \
         thread, charged to the service's memory cgroup. Raise its memory limit \
         (MemoryMax= in a systemd unit, `--memory` for `docker run`, a pod's memory \
         limit) or lower server.shards; see `free`",
        locked_per_shard() as f64 / (1024.0 * 1024.0),
        locked_admin() / 1024,
    )
}

/// Refuses to start, with what it needs and what to change, when the
/// locked-memory limit cannot hold `shards` shards' rings and the admin
/// thread's on a kernel that counts them (see `locked_per_shard`);
/// checked before any executor starts. Left to the executors, a shard
/// fails after glommio's WARNs, and the figures of the buffers alone
/// said the limit was enough.
pub fn check_locked_memory_for(shards: usize) -> io::Result<()> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_MEMLOCK) else {
        return Ok(());
    };
    let need = locked_admin() + shards as u64 * locked_per_shard();
    if soft == RLIM_INFINITY || soft >= need || !rings_counted() {
        return Ok(());
    }
    const MIB: f64 = 1024.0 * 1024.0;
    Err(io::Error::new(
        io::ErrorKind::OutOfMemory,
        locked_memory(&format!(
            "{shards} shard{} need about {:.1} MiB of locked memory here, as this kernel \
             counts io_uring's rings against the limit",
            if shards == 1 { "" } else { "s" },
            need as f64 / MIB
        )),
    ))
}

/// The locked-memory limit's part in a failed setup (`cause`), and how to
/// raise it.
fn locked_memory(cause: &dyn std::fmt::Display) -> String {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let limit = match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == RLIM_INFINITY => "unlimited".to_string(),
        Ok((soft, _)) => format!("{} KiB", soft / 1024),
        Err(_) => "unknown".to_string(),
    };
    format!(
        "io_uring could not be set up: {cause}. The locked-memory limit \
         (`ulimit -l`) is {limit}: glommio needs at least {} KiB, and clio-relay \
         about {:.1} MiB for each shard and {} KiB for its admin thread on a kernel \
         that counts io_uring's rings against it ({} KiB each where only the \
         registered buffers count), which a process without CAP_IPC_LOCK counts \
         together with its user's other processes. Raise it: LimitMEMLOCK=256M in a \
         systemd unit (the shipped one has it), `ulimit -l 262144` in a shell, \
         `--ulimit memlock=268435456` for `docker run`; or lower server.shards. With \
         a limit that high, this error means the host could not give the rings \
         their memory: see `free` and the service's memory cgroup",
        GLOMMIO_MIN_LOCKED_MEMORY / 1024,
        locked_per_shard() as f64 / (1024.0 * 1024.0),
        locked_admin() / 1024,
        PINNED_PER_EXECUTOR / 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check's ring is set up and closed on a thread of its own: the
    /// caller's blocking socket reads with a timeout time out, and are not
    /// interrupted by the closed ring's exit work (EINTR), as they were
    /// when the check ran on the caller's thread.
    #[test]
    fn the_check_leaves_the_calling_thread_nothing_to_interrupt() {
        use std::io::Read as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        for _ in 0..5 {
            check_io_uring().unwrap();
            let mut buf = [0u8; 16];
            match client.read(&mut buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                other => panic!("a read with nothing to read: {other:?}"),
            }
        }
    }

    #[test]
    fn each_setup_failure_names_what_to_change() {
        let memory = setup_failed(io::Error::from_raw_os_error(libc::ENOMEM)).to_string();
        // The limit to raise: the locked-memory one where it binds (not
        // as root), else the memory cgroup's.
        let limit = if locked_limit_binds() {
            "LimitMEMLOCK="
        } else {
            "MemoryMax="
        };
        assert!(memory.contains(limit), "{memory}");
        assert!(memory.contains("Cannot allocate memory"), "{memory}");
        let denied = setup_failed(io::Error::from_raw_os_error(libc::EPERM)).to_string();
        assert!(denied.contains("io_uring_disabled"), "{denied}");
        let old = setup_failed(io::Error::from_raw_os_error(libc::ENOSYS)).to_string();
        assert!(old.contains("Linux 6.1"), "{old}");
        // Anything else is left as it was.
        let other = setup_failed(io::Error::from_raw_os_error(libc::EADDRINUSE));
        assert_eq!(other.raw_os_error(), Some(libc::EADDRINUSE));
        let ended = executor_failed(
            "shard",
            Err(glommio::GlommioError::IoError(
                io::Error::from_raw_os_error(libc::ENOMEM),
            )),
        )
        .to_string();
        assert!(
            ended.starts_with("the shard thread did not start: io_uring"),
            "{ended}"
        );
    }
}
