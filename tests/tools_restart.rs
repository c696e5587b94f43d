//! `tools/restart-time.py` when a run fails: it says why and leaves
//! nothing running. Left running, its fake upstream and relay held the
//! caller's output open (the README test that runs it waited for ever)
//! and their ports. Each run takes its binaries from a directory of its
//! own (links to the debug builds), so that what a run left behind is
//! found by that directory's name among the host's processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The processes whose command line names `dir`: what a run left.
fn left_from(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Runs the script with `args` on binaries linked into a fresh directory
/// (`tools`: which of them); its exit status and output, and what it left.
fn run(tag: &str, tools: &[&str], args: &[&str]) -> (Option<i32>, String, Vec<i32>) {
    let built = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("restart-time-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for t in tools {
        assert!(
            built.join(t).exists(),
            "{t} is not built beside the relay: cargo build -p {t}"
        );
        std::os::unix::fs::symlink(built.join(t), dir.join(t)).unwrap();
    }
    // Output to a file, not a pipe: a process left holding a pipe would
    // keep this test waiting instead of failing it.
    let log = dir.join("out.log");
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/restart-time.py"))
        .args(["--bin", dir.to_str().unwrap()])
        .args(args)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("err.log")).unwrap())
        .stdin(Stdio::null())
        .status()
        .expect("python3 runs");
    let out = std::fs::read_to_string(&log).unwrap_or_default()
        + &std::fs::read_to_string(dir.join("err.log")).unwrap_or_default();
    let left = left_from(&dir);
    for pid in &left {
        // SAFETY: kill has no memory preconditions; the pid is one this
        // test's run started.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_dir_all(&dir);
    (status.code(), out, left)
}

#[test]
fn a_binary_missing_is_named_before_anything_starts() {
    let (code, out, left) = run(
        "missing",
        &["clio-relay", "fake-soniox"],
        &["--streams", "1"],
    );
    assert!(left.is_empty(), "left running: {left:?}\n{out}");
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("no relay-load in"), "{out}");
}

#[test]
fn a_relay_that_does_not_start_leaves_nothing_running() {
    // A drain timeout the relay refuses: it exits 3 at start, after the
    // fake upstream has started.
    let (code, out, left) = run(
        "refused",
        &["clio-relay", "fake-soniox", "relay-load"],
        &["--drain-timeout", "soon"],
    );
    assert!(left.is_empty(), "left running: {left:?}\n{out}");
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("the relay exited (3) before READY=1"), "{out}");
}
