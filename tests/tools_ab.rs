//! `tools/ab.sh` as an engineer runs it, on a machine where other things
//! run: in a private network and mount namespace (`unshare`), with its
//! temp directory (`TMPDIR`, where `mktemp` puts the script's work) a
//! fresh tmpfs on /mnt, so the test sees only what the script leaves, and
//! ports taken only by the test itself. Not /tmp itself: a checkout under
//! /tmp (the script, the binaries) would vanish under it. One churn round
//! of the debug relay.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tools/ab.sh -w churn -r 1` on the debug relay inside a private
/// namespace (its files under a directory named for `tag`), after
/// `before` (a shell snippet); prints `left: ...` with
/// what its temp directory holds once the script has ended.
fn ab(tag: &str, before: &str) -> Output {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        assert!(
            bin_dir.join(tool).exists(),
            "{tool} is not built beside the relay: cargo build -p {tool}"
        );
    }
    // ab.sh takes fake-soniox and relay-load from $CARGO_TARGET_DIR/release.
    let target =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("ab-{tag}-{}", std::process::id()));
    let release = target.join("release");
    std::fs::create_dir_all(&release).unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        let _ = std::fs::remove_file(release.join(tool));
        std::os::unix::fs::symlink(bin_dir.join(tool), release.join(tool)).unwrap();
    }
    let script = format!(
        "set -e; ip link set lo up; mount -t tmpfs tmpfs /mnt; export TMPDIR=/mnt; {before}\n\
         rc=0; bash {ab} -w churn -r 1 {dir} || rc=$?\n\
         echo \"left: $(ls -A /mnt)\"; jobs -p | xargs -r kill; exit $rc",
        ab = repo().join("tools/ab.sh").display(),
        dir = bin_dir.display(),
    );
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let out = Command::new("timeout")
        .args(["--kill-after=10", "240", "unshare"])
        .arg(if root { "-mn" } else { "-rmn" })
        .args(["bash", "-c", &script])
        .env("CARGO_TARGET_DIR", &target)
        .env("RUST_LOG", "warn")
        .output()
        .expect("timeout, unshare and bash run");
    let _ = std::fs::remove_dir_all(&target);
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The row of round 1 in ab.sh's table: `| 1 | DIR | cycles/s | failed | ...`.
fn failed_of_round_one(out: &str) -> Option<u64> {
    out.lines()
        .find(|l| l.starts_with("| 1 |"))
        .and_then(|l| l.split('|').nth(4))
        .and_then(|v| v.trim().parse().ok())
}

/// Another process already on the ports ab.sh used to take (17400 to
/// 17403, as another engineer's ab.sh would be): the run still works, on
/// ports free at its start. Before, fake-soniox could not listen, the
/// relay exited 4 on its admin port, and the script died with no row.
#[test]
fn ab_sh_runs_beside_another_ab_sh() {
    let out = ab(
        "ports",
        "python3 -c 'import socket, time\n\
         socks = []\n\
         for p in range(17400, 17420):\n    s = socket.socket(); s.bind((\"127.0.0.1\", p)); s.listen(); socks.append(s)\n\
         time.sleep(200)' > /dev/null 2>&1 &\n\
         sleep 0.5");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert_eq!(failed_of_round_one(&all), Some(0), "{all}");
}

/// ab.sh leaves nothing in its temp directory (`$TMPDIR`, /tmp by
/// default): its work directory (configs, logs, the relay's state) goes
/// when it ends. Before, every run left an /tmp/ab.XXXXXX behind, named
/// nowhere in its output.
#[test]
fn ab_sh_leaves_no_work_dir_behind() {
    let out = ab("left", "");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let left = all
        .lines()
        .find_map(|l| l.strip_prefix("left:"))
        .unwrap_or_else(|| panic!("no left: line\n{all}"));
    assert_eq!(left.trim(), "", "{all}");
}

/// The processes whose command line names `dir`.
fn processes_naming(dir: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(dir)
                .then_some(pid)
        })
        .collect()
}

/// SIGINT (or SIGTERM) to the script alone, as `kill -INT` or a
/// supervisor sends it, ends the run there: exit 130, its relay-load,
/// relay and fake-soniox ended, its work directory gone. Before, bash
/// went on after its foreground `sleep` (a child the signal did not
/// reach) and ran every round to the end, exit 0.
#[test]
fn sigint_to_ab_sh_ends_the_run() {
    use std::time::{Duration, Instant};
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ab-sigint-{}", std::process::id()));
    let release = target.join("release");
    let tmp = target.join("tmp");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        std::os::unix::fs::symlink(bin_dir.join(tool), release.join(tool)).unwrap();
    }
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    // `exec`: the script is the process signalled, its SIGINT not
    // ignored as a background job's would be.
    let script = format!(
        "ip link set lo up; exec bash {ab} -w churn -r 3 {dir}",
        ab = repo().join("tools/ab.sh").display(),
        dir = bin_dir.display(),
    );
    let mut child = Command::new("unshare")
        .arg(if root { "-n" } else { "-rn" })
        .args(["bash", "-c", &script])
        .env("CARGO_TARGET_DIR", &target)
        .env("TMPDIR", &tmp)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("unshare and bash run");
    let tmp_s = tmp.display().to_string();
    let sweep = || {
        for pid in processes_naming(&tmp_s) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    };
    // Once a round's relay-load runs.
    let t0 = Instant::now();
    while processes_naming(&tmp_s).len() < 2 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(500));
    let left = processes_naming(&tmp_s);
    sweep();
    let files: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&target);
    let status = status.expect("ab.sh ended within 60 s of SIGINT");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(files.is_empty(), "left in TMPDIR: {files:?}");
}

/// A wrong argument ends ab.sh before anything starts, with a line that
/// says what is wrong and exit 2, as an unknown workload does. Before,
/// `-n abc` started fake-soniox and a relay and ended in a Python
/// traceback (exit 1), `-r 0` printed an empty table and exited 0, and an
/// unknown option printed the help and exited 0.
#[test]
fn ab_sh_refuses_wrong_arguments_before_it_starts() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    for (args, says) in [
        (
            &["-n", "abc"][..],
            "ab: -n needs a number of streams, 1 or more (got 'abc')",
        ),
        (
            &["-r", "0"][..],
            "ab: -r needs a number of rounds, 1 or more (got '0')",
        ),
        (&["-x"][..], "ab: usage: bash tools/ab.sh"),
    ] {
        let out = Command::new("timeout")
            .args(["--kill-after=10", "120", "bash"])
            .arg(repo().join("tools/ab.sh"))
            .args(["-w", "churn"])
            .args(args)
            .arg(bin_dir)
            .output()
            .expect("timeout and bash run");
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {all}");
        assert!(all.contains(says), "{args:?}: {all}");
        assert!(!all.contains("| round |"), "{args:?} ran a round: {all}");
    }
}

/// `--help`, as every other tool takes it (relay-load, fake-soniox,
/// head-to-head.sh, soak.sh, fuzz.sh), printed the help: it was
/// "illegal option -- -" and exit 2, since getopts knows only `-h`.
#[test]
fn ab_sh_help_is_taken_long_too() {
    for flag in ["-h", "--help"] {
        let out = Command::new("timeout")
            .args(["--kill-after=10", "60", "bash"])
            .arg(repo().join("tools/ab.sh"))
            .arg(flag)
            .output()
            .expect("timeout and bash run");
        let all = text(&out);
        assert_eq!(out.status.code(), Some(0), "{flag}: {all}");
        assert!(
            all.contains("Same-session A/B of clio-relay builds")
                && all.contains("bash tools/ab.sh [-w idle|churn|realtime|flood]"),
            "{flag}: {all}"
        );
        assert!(!all.contains("illegal option"), "{flag}: {all}");
    }
}

/// A build whose relay does not start (here one that says why and exits
/// 1), and one whose relay dies in the middle of the run (killed 3 s in):
/// each ends the run (exit 1) naming the build, the round and the end of
/// the relay's log, with nothing of the run left running. Before, the
/// script died on "awk: cannot open /proc/PID/status" (exit 2), the
/// relay's reason unsaid.
#[test]
fn a_relay_that_does_not_start_or_dies_is_named() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    let target =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("ab-gone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    let release = target.join("release");
    std::fs::create_dir_all(&release).unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        std::os::unix::fs::symlink(bin_dir.join(tool), release.join(tool)).unwrap();
    }
    let builds = [
        (
            "refuses",
            "#!/bin/sh\necho 'the build refuses its config' >&2\nexit 1\n".to_string(),
            "did not start listening on 127.0.0.1:",
            "the build refuses its config",
        ),
        (
            "dies",
            format!(
                "#!/bin/bash\n{} \"$@\" & relay=$!\nsleep 3\nkill -KILL $relay\n\
                 echo 'the relay was killed' >&2\nexit 137\n",
                bin_dir.join("clio-relay").display()
            ),
            "exited during the run",
            "the relay was killed",
        ),
    ];
    for (name, script, said, log) in builds {
        let dir = target.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let relay = dir.join("clio-relay");
        std::fs::write(&relay, script).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&relay, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new("timeout")
            .args(["--kill-after=10", "120", "bash"])
            .arg(repo().join("tools/ab.sh"))
            .args(["-w", "churn", "-r", "1"])
            .arg(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .env("RUST_LOG", "warn")
            .output()
            .expect("timeout and bash run");
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {all}");
        let head = format!("ab: {}/clio-relay {said}", dir.display());
        assert!(
            all.contains(&head) && all.contains("(round 1, ") && all.contains(log),
            "{name}: {all}"
        );
        assert!(!all.contains("awk:"), "{name}: {all}");
        let left = processes_naming(&target.display().to_string());
        assert!(left.is_empty(), "{name}: still running: {left:?}\n{all}");
    }
    let _ = std::fs::remove_dir_all(&target);
}

/// relay-load that cannot run (here more idle streams than the file
/// limit allows) is said with relay-load's own reason, exit 1. Before,
/// its stderr was dropped with the work dir and a Python traceback
/// (JSONDecodeError, reading the empty report) stood in for it.
#[test]
fn relay_load_that_cannot_run_is_said_with_its_reason() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    let target =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("ab-nofd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    let release = target.join("release");
    std::fs::create_dir_all(&release).unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        std::os::unix::fs::symlink(bin_dir.join(tool), release.join(tool)).unwrap();
    }
    // The hard limit is what relay-load can raise its own to.
    let out = Command::new("sh")
        .args([
            "-c",
            "ulimit -n 4096 && exec timeout --kill-after=10 120 bash \"$@\"",
            "sh",
        ])
        .arg(repo().join("tools/ab.sh"))
        .args(["-w", "idle", "-n", "5000", "-r", "1"])
        .arg(bin_dir)
        .env("CARGO_TARGET_DIR", &target)
        .env("RUST_LOG", "warn")
        .output()
        .expect("sh, timeout and bash run");
    let left = processes_naming(&target.display().to_string());
    let _ = std::fs::remove_dir_all(&target);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("ab: relay-load printed no report (round 1, ")
            && all.contains("5000 streams need 5064 file descriptors; the limit is 4096"),
        "{all}"
    );
    assert!(!all.contains("Traceback"), "{all}");
    assert!(left.is_empty(), "still running: {left:?}\n{all}");
}
