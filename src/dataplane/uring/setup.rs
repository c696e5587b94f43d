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
    let ring = io_uring::IoUring::new(2).map_err(setup_failed)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(setup_failed)?;
    ring.submit().map_err(setup_failed)?;
    Ok(())
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
         pins about {} KiB for its admin thread and as much for each shard, which a \
         process without CAP_IPC_LOCK counts against it together with its user's \
         other processes. Raise it: LimitMEMLOCK=64M in a systemd unit (the shipped \
         one has it), `ulimit -l 65536` in a shell, `--ulimit memlock=67108864` for \
         `docker run`. With a limit that high, this error means the host could not \
         give the rings their memory: see `free` and the service's memory cgroup",
        GLOMMIO_MIN_LOCKED_MEMORY / 1024,
        PINNED_PER_EXECUTOR / 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_setup_failure_names_what_to_change() {
        let memory = setup_failed(io::Error::from_raw_os_error(libc::ENOMEM)).to_string();
        assert!(memory.contains("LimitMEMLOCK="), "{memory}");
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
