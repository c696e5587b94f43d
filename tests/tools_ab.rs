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
