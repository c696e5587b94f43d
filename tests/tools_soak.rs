//! `tools/soak.sh`'s options: one given without its value, or with a value
//! that is not one, is named in one line before anything starts (the script
//! ran with bash's own "unbound variable" before, or with a nonsense value).

use std::process::Command;

fn soak(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/soak.sh"))
        .args(args)
        .output()
        .expect("bash runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_option_without_its_value_is_named() {
    for (args, want) in [
        (
            &["--minutes"][..],
            "--minutes needs a whole number of minutes, 1 or more (got '')",
        ),
        (
            &["--minutes", "ten"],
            "--minutes needs a whole number of minutes, 1 or more (got 'ten')",
        ),
        (&["--minutes", "0"], "(got '0')"),
        (&["--streams", "1", "--minutes"], "--minutes needs"),
        (
            &["--streams", "-5"],
            "--streams needs a number of streams, 1 or more (got '-5')",
        ),
        (
            &["--drop-share", "5%"],
            "--drop-share needs a share from 0 to 1, such as 0.05 (got '5%')",
        ),
        (&["--drop-share"], "--drop-share needs"),
    ] {
        let (code, err) = soak(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
}

/// The processes whose command line names `dir`, with their state letter
/// (`T` stopped).
fn processes_naming(dir: &str) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(dir)
        {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .unwrap_or('?');
        out.push((pid, state));
    }
    out
}

/// Ctrl-C while a stalling client is stopped (SIGSTOP, as the script
/// stalls it) ends the run and every process it started. Before, the
/// stopped relay-load outlived the script, stopped for good: the loop that
/// started it died of the Ctrl-C, and the script's cleanup did not know it.
/// SIGINT goes to the script's whole process group, as a terminal's Ctrl-C.
/// (Under a terminal's job control the kernel hangs up a stopped process
/// its group leaves behind; in a session of its own, or with SIGHUP
/// ignored under nohup, nothing did.)
#[test]
fn ctrl_c_leaves_no_stopped_client_behind() {
    use std::time::{Duration, Instant};
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    for tool in ["fake-soniox", "relay-load"] {
        assert!(
            bin_dir.join(tool).exists(),
            "{tool} is not built beside the relay: cargo build -p {tool}"
        );
    }
    let work = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("soak-ctrl-c-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let work_s = work.display().to_string();
    // In a session of its own, as a supervisor or CI starts it: no
    // terminal's job control to hang up a stopped process it leaves.
    let mut child = Command::new("setsid")
        .arg("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/soak.sh"))
        .args(["--minutes", "1", "--streams", "2"])
        .env("SOAK_BIN", bin_dir)
        .env("SOAK_WORK", &work)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setsid and bash run");
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Every process it started, ended whatever the test finds.
    let sweep = |work: &str| {
        for (pid, _) in processes_naming(work) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    };
    let t0 = Instant::now();
    let stalled = loop {
        if processes_naming(&work_s).iter().any(|&(_, s)| s == 'T') {
            break true;
        }
        if t0.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !stalled {
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        sweep(&work_s);
        panic!("no stalled client within 60 s");
    }
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGINT).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // What outlives the script.
    std::thread::sleep(Duration::from_millis(500));
    let left = processes_naming(&work_s);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    sweep(&work_s);
    let _ = std::fs::remove_dir_all(&work);
    let status = status.expect("the script ended within 60 s of Ctrl-C");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(left.is_empty(), "left running: {left:?}");
}
