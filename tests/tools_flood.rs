//! `tools/handshake-flood.sh` as an engineer runs it: one short round of
//! the debug relay, with HAProxy and openssl as the script uses them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The debug relay's directory, with fake-soniox and relay-load beside it.
fn bin_dir() -> &'static Path {
    let dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        assert!(
            dir.join(tool).exists(),
            "{tool} is not built beside the relay: cargo build -p {tool}"
        );
    }
    dir
}

/// A round prints its row: the streams' frames all answered, none failed,
/// hellos answered while they streamed; and the script leaves no file in
/// its temp directory, and no process, behind.
#[test]
fn handshake_flood_sh_prints_a_row_and_leaves_nothing() {
    let bin = bin_dir();
    // The script takes fake-soniox and relay-load from
    // $CARGO_TARGET_DIR/release.
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("handshake-flood-{}", std::process::id()));
    let release = target.join("release");
    let tmp = target.join("tmp");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        let _ = std::fs::remove_file(release.join(tool));
        std::os::unix::fs::symlink(bin.join(tool), release.join(tool)).unwrap();
    }
    let out = Command::new("timeout")
        .args(["--kill-after=10", "240", "bash"])
        .arg(repo().join("tools/handshake-flood.sh"))
        .args(["-k", "p256", "-f", "50", "-n", "5", "-d", "8", "-r", "1"])
        .arg(bin)
        .env("CARGO_TARGET_DIR", &target)
        .env("TMPDIR", &tmp)
        .env("RUST_LOG", "warn")
        .output()
        .expect("timeout and bash run");
    let all = text(&out);
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    let _ = std::fs::remove_dir_all(&target);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let row = all
        .lines()
        .find(|l| l.starts_with("| 1 |"))
        .unwrap_or_else(|| panic!("no row: {all}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // | round | build | lost | failed | p50 | p99 | p99.9 | /metrics | answered/s | unanswered | CPU |
    assert_eq!((cells[3], cells[4]), ("0", "0"), "{row}");
    let answered: f64 = cells[9].parse().unwrap_or_else(|_| panic!("{row}"));
    assert!(answered > 0.0, "no hello answered: {row}");
    assert!(left.is_empty(), "left behind: {left:?}");
    let bin = bin.display().to_string();
    let ps = Command::new("pgrep").args(["-f", &bin]).output().unwrap();
    let still: Vec<_> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).ok())
        .filter(|c| c.contains("handshake-flood") || c.contains(".toml"))
        .collect();
    assert!(still.is_empty(), "{still:?}");
}

#[test]
fn handshake_flood_sh_refuses_wrong_arguments_before_it_starts() {
    for (args, says) in [
        (
            &["-k", "rsa1024"][..],
            "handshake-flood: -k takes rsa4096, rsa2048 or p256 (got 'rsa1024')",
        ),
        (
            &["-f", "0"][..],
            "handshake-flood: -f needs a number of hellos a second, 1 or more (got '0')",
        ),
        (
            &["-d", "x"][..],
            "handshake-flood: -d needs the streams' length in whole seconds, 1 or more (got 'x')",
        ),
        (
            &["-x"][..],
            "handshake-flood: usage: bash tools/handshake-flood.sh",
        ),
    ] {
        let out = Command::new("timeout")
            .args(["--kill-after=10", "60", "bash"])
            .arg(repo().join("tools/handshake-flood.sh"))
            .args(args)
            .arg(bin_dir())
            .output()
            .expect("timeout and bash run");
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {all}");
        assert!(all.contains(says), "{args:?}: {all}");
        assert!(!all.contains("| round |"), "{args:?} ran a round: {all}");
    }
}
