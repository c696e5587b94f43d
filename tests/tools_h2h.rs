//! `tools/head-to-head.sh` beside another engineer's run: in a private
//! network namespace (`unshare -n`), with another process on the port the
//! script used to take for fake-soniox (17300). The direct path's churn on
//! the debug binaries (`H2H_BIN`), no perf, no nginx or node; and the
//! run's summary line, which the script reads from relay-load's JSON.
//! The floor proxy (`tools/head-to-head/floor-proxy.c`, built by the
//! script) carries the same churn, and the table gives it a column. The
//! run pins its peers (`H2H_PIN_PEERS=1`), and the summary says so.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Another process listening on 127.0.0.1:17300, where the script's
/// fake-soniox used to listen: the run still measures its own
/// fake-soniox. Before, fake-soniox could not listen and exited, the
/// script took the other process's port for its own and measured it:
/// 0 cycles/s, 0 failed streams, exit 0.
#[test]
fn head_to_head_runs_beside_another_on_its_old_ports() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        assert!(
            bin_dir.join(tool).exists(),
            "{tool} is not built beside the relay: cargo build -p {tool}"
        );
    }
    let work =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("h2h-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let script = format!(
        "set -e; ip link set lo up\n\
         python3 -c 'import socket, time; s = socket.socket(); s.bind((\"127.0.0.1\", 17300)); s.listen(); time.sleep(120)' &\n\
         for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/17300) 2>/dev/null && break; sleep 0.1; done\n\
         rc=0; bash {h2h} --quick || rc=$?\n\
         jobs -p | xargs -r kill; exit $rc",
        h2h = repo.join("tools/head-to-head.sh").display(),
    );
    // Pinning needs a core for each peer.
    let pin = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let out = Command::new("timeout")
        .args(["--kill-after=10", "300", "unshare"])
        .arg(if root { "-n" } else { "-rn" })
        .args(["bash", "-c", &script])
        .current_dir(&repo)
        .env("H2H_BIN", bin_dir)
        .env("H2H_WORK", &work)
        .env("H2H_PROXIES", "direct floor")
        .env("H2H_WORKLOADS", "W3")
        .env("H2H_PERF", "0")
        .env("H2H_PIN_PEERS", if pin { "1" } else { "0" })
        .env("RUST_LOG", "warn")
        .output()
        .expect("timeout, unshare and bash run");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read(work.join("direct-W3.json")).unwrap_or_default();
    let floor = std::fs::read(work.join("floor-W3.json")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&work);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let json: serde_json::Value =
        serde_json::from_slice(&report).unwrap_or_else(|e| panic!("direct-W3.json: {e}\n{all}"));
    assert!(
        json["streams_ok"].as_u64() > Some(0),
        "no churn cycle measured: {json}\n{all}"
    );
    // Through the floor proxy: cycles, none failed (a proxy that lost a
    // connection's bytes would fail its stream), and its column.
    let floor: serde_json::Value =
        serde_json::from_slice(&floor).unwrap_or_else(|e| panic!("floor-W3.json: {e}\n{all}"));
    assert!(
        floor["streams_ok"].as_u64() > Some(0) && floor["streams_failed"] == 0,
        "the floor proxy's churn: {floor}\n{all}"
    );
    assert!(
        all.lines()
            .any(|l| l.starts_with("| workload · metric | direct | floor proxy |")),
        "no floor proxy column: {all}"
    );
    if pin {
        assert!(
            all.contains("peers pinned: relay-load on core 0, fake-soniox on core")
                && all.contains("- Peers pinned (`H2H_PIN_PEERS=1`)"),
            "the pinned peers are not said: {all}"
        );
    }
    // The run's one-line summary, read from relay-load's JSON: a churn
    // run's has cycles/s, and no idle streams held (an idle run's measure).
    let summary = all
        .lines()
        .find(|l| l.starts_with("  frames/s "))
        .unwrap_or_else(|| panic!("no summary line of the run: {all}"));
    assert!(
        summary.contains(" cycles/s ") && !summary.contains("held"),
        "{summary}"
    );
}

/// `H2H_PIN_PEERS` other than 0 or 1 ends the run before anything starts,
/// saying what it takes.
#[test]
fn head_to_head_pin_peers_takes_0_or_1() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(repo.join("tools/head-to-head.sh"))
        .current_dir(&repo)
        .env("H2H_PIN_PEERS", "yes")
        .output()
        .expect("bash runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("H2H_PIN_PEERS is 0 or 1 (got 'yes')"), "{err}");
}

/// nginx named in `H2H_PROXIES`, not installed, and not installable
/// (here an `apt-get` that fails, on a `PATH` of links to every other
/// program): the run ends before anything starts, saying nginx is
/// missing and how to go on. Before, it went on to "nginx: command not
/// found" and "nginx config refused", a config that was never the fault.
#[test]
fn head_to_head_says_nginx_is_missing_when_it_cannot_be_installed() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shim =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("h2h-path-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&shim);
    std::fs::create_dir_all(&shim).unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if name == "nginx" || name == "apt-get" || shim.join(&name).exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(entry.path(), shim.join(&name));
        }
    }
    let apt = shim.join("apt-get");
    std::fs::write(
        &apt,
        "#!/bin/sh\necho \"E: Unable to locate package\" >&2\nexit 100\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&apt, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    let out = Command::new("timeout")
        .args(["--kill-after=10", "120", "bash"])
        .arg(repo.join("tools/head-to-head.sh"))
        .arg("--quick")
        .current_dir(&repo)
        .env("PATH", &shim)
        .env("H2H_BIN", bin_dir)
        .env("H2H_PROXIES", "direct nginx")
        .env("H2H_WORKLOADS", "W3")
        .env("H2H_PERF", "0")
        .output()
        .expect("timeout and bash run");
    let _ = std::fs::remove_dir_all(&shim);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: nginx is missing and could not be installed")
            && err.contains("leave nginx out of H2H_PROXIES"),
        "{err}"
    );
    assert!(!err.contains("work dir:"), "it started: {err}");
}

/// A proxy that exits in the middle of a workload (here the relay,
/// killed 4 s into its run by the wrapper that started it) ends the run
/// (exit 1), saying which proxy and workload. Before, its CPU after the
/// run read as 0 ticks and the table showed a negative CPU per cycle
/// (-0.021 ms) beside 50,738 failed streams, as a measure, exit 0.
#[test]
fn a_proxy_that_exits_mid_run_ends_the_run_saying_so() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    let tmp =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("h2h-dies-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        std::os::unix::fs::symlink(bin_dir.join(tool), bin.join(tool)).unwrap();
    }
    let relay = bin_dir.join("clio-relay");
    let wrapper = bin.join("clio-relay");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\n[ \"$1\" = run ] || exec {r} \"$@\"\n{r} \"$@\" & relay=$!\n\
             sleep 4\nkill -KILL $relay\nexit 137\n",
            r = relay.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("timeout")
        .args(["--kill-after=10", "120", "bash"])
        .arg(repo.join("tools/head-to-head.sh"))
        .arg("--quick")
        .current_dir(&repo)
        .env("H2H_BIN", &bin)
        .env("H2H_WORK", tmp.join("work"))
        .env("H2H_PROXIES", "clio")
        .env("H2H_WORKLOADS", "W3")
        .env("H2H_PERF", "0")
        .env("RUST_LOG", "warn")
        .output()
        .expect("timeout and bash run");
    let _ = std::fs::remove_dir_all(&tmp);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("error: clio exited during W3 (relay-load exit "),
        "{all}"
    );
    assert!(!all.contains("| W3 CPU ms / cycle |"), "{all}");
}

/// The summary's ratio column is "—" where either value is negative (an
/// added latency below the direct path's own, which a noisy run gives):
/// the added latencies themselves are still shown. Before, clio-relay's
/// 13.9 ms against nginx's -5.32 ms printed as "-2.60×", and two
/// negatives as a positive ratio, each reading as a measure. The work
/// dir holds figures like those of a real `--quick` W3 run that gave
/// them.
#[test]
fn a_ratio_of_a_negative_added_latency_is_not_printed() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("h2h-neg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let write = |name: &str, v: serde_json::Value| {
        std::fs::write(work.join(name), v.to_string()).unwrap();
    };
    write(
        "run.json",
        serde_json::json!({
            "date": "2026-12-07", "quick": 1, "command": "bash tools/head-to-head.sh --quick",
            "nproc": 2, "cpu": "test", "mem_gib": 24, "kernel": "test", "nginx": "1.22.1",
            "node": "", "ws": "", "proxies": "direct clio nginx", "workloads": "W3",
            "perf_workloads": "W1s W1 W2 W3", "perf_note": "H2H_PERF=0", "fresh": 0,
            "pin_peers": 0,
        }),
    );
    // Open-to-result percentiles (ms): direct, clio, nginx.
    for (proxy, p50, p99, p999, cpu) in [
        ("direct", 20.543, 65.663, 95.0, 0),
        ("clio", 34.4, 180.0, 218.6, 372),
        ("nginx", 15.223, 76.735, 92.607, 118),
    ] {
        write(
            &format!("{proxy}-W3.json"),
            serde_json::json!({
                "mode": "churn", "cycles_per_sec": 1000.0, "streams_ok": 5000,
                "streams_failed": 0,
                "connect": {"count": 5000, "p50_ms": p50, "p99_ms": p99, "p999_ms": p999},
            }),
        );
        write(
            &format!("{proxy}-W3.meta.json"),
            serde_json::json!({
                "proxy": proxy, "workload": "W3", "rc": 0, "clk_tck": 100,
                "cpu_ticks_before": 0, "cpu_ticks_after": cpu,
                "user_ticks_before": 0, "user_ticks_after": cpu / 2,
                "fake_cpu_ticks_before": 0, "fake_cpu_ticks_after": 100,
                "rss_kb_before": 30000, "rss_kb_peak": 32000, "rss_kb_held": 32000,
                "streams": 0, "run_ms": 5000, "perf_window_s": "", "perf_cut": 0,
                "perf_from_ms": 0, "perf_to_ms": 0,
            }),
        );
    }
    let out = Command::new("python3")
        .arg(repo.join("tools/head-to-head/summary.py"))
        .arg(&work)
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_dir_all(&work);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    let row = |label: &str| {
        all.lines()
            .find(|l| l.starts_with(&format!("| W3 {label} |")))
            .unwrap_or_else(|| panic!("no row {label}: {all}"))
            .to_string()
    };
    // nginx's p50 and p99.9 are below the direct path's: no ratio.
    assert_eq!(
        row("added open-to-result p50 (ms)"),
        "| W3 added open-to-result p50 (ms) | — | 13.9 | -5.32 | — | — |",
        "{all}"
    );
    assert!(
        row("added open-to-result p99.9 (ms)").ends_with("| -2.39 | — | — |"),
        "{all}"
    );
    // Both positive: the ratio stays.
    assert!(
        row("added open-to-result p99 (ms)").ends_with("| 10.33× |"),
        "{all}"
    );
}

/// relay-load that cannot run a workload (here W4's 9,000 idle streams
/// under a file limit of 4,096) is said with relay-load's own reason in
/// the run's log. Before, the line said only "no JSON (exit 1); see
/// FILE", the reason left in that file.
#[test]
fn relay_load_that_cannot_run_a_workload_is_said_with_its_reason() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    let work =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("h2h-nofd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let out = Command::new("sh")
        .args([
            "-c",
            "ulimit -n 4096 && exec timeout --kill-after=10 120 bash \"$@\"",
            "sh",
        ])
        .arg(repo.join("tools/head-to-head.sh"))
        .current_dir(&repo)
        .env("H2H_BIN", bin_dir)
        .env("H2H_WORK", &work)
        .env("H2H_PROXIES", "direct")
        .env("H2H_WORKLOADS", "W4")
        .env("H2H_PERF", "0")
        .output()
        .expect("sh, timeout and bash run");
    let _ = std::fs::remove_dir_all(&work);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("direct W4: no JSON (exit 1): relay-load: 9000 streams need 9064 file descriptors; the limit is 4096"),
        "{err}"
    );
}
