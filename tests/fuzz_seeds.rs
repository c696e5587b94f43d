//! Every fuzz target's check, run over its seeds in `fuzz/seeds/` and over
//! anything `tools/fuzz.sh` found and saved in `fuzz/artifacts/` (crashes
//! stay failing tests until fixed). Keeps the checks compiling and true
//! between fuzzing runs; the fuzzing itself is `tools/fuzz.sh`.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

fn run(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["seeds", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            // Each input whole, and each prefix of the small ones.
            check(&data);
            if data.len() <= 512 {
                for k in 0..data.len() {
                    check(&data[..k]);
                }
            }
            n += 1;
        }
    }
    assert!(n > 0, "no seeds for {target}");
}

#[test]
fn frame_scanner() {
    run("frame_scanner", checks::frame_scanner);
}

#[test]
fn frame_header() {
    run("frame_header", checks::frame_header);
}

#[test]
fn mask() {
    run("mask", checks::mask);
}

#[test]
fn http_head() {
    run("http_head", checks::http_head);
}

#[test]
fn first_message() {
    run("first_message", checks::first_message);
}

#[test]
fn proxy_header() {
    run("proxy_header", checks::proxy_header);
}

#[test]
fn token() {
    run("token", checks::token);
}

/// `tools/fuzz.sh` refuses a wrong argument before it installs cargo-fuzz
/// or builds anything (minutes of sanitizer builds): a `--runs` or
/// `--seconds` that is not a whole number, one with no value, and a
/// target that does not exist, each with a line saying why and exit 2.
/// Before, `--runs abc mask` built every target and handed `-runs=abc` to
/// libFuzzer, and `nosuchtarget` failed only after the whole build.
#[test]
fn fuzz_sh_refuses_wrong_arguments_before_it_builds() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fuzz.sh");
    for (args, says) in [
        (
            &["--runs", "abc", "mask"][..],
            "fuzz.sh: --runs needs a whole number (got 'abc')",
        ),
        (
            &["--seconds"][..],
            "fuzz.sh: --seconds needs a whole number (got '')",
        ),
        (
            &["nosuchtarget"][..],
            "fuzz.sh: no fuzz target nosuchtarget (targets: ",
        ),
    ] {
        // Bounded: the script as it was went on to build for minutes.
        let out = std::process::Command::new("timeout")
            .args(["--kill-after=5", "30", "bash"])
            .arg(&script)
            .args(args)
            .output()
            .expect("timeout and bash run");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}: {all}");
        assert!(all.contains(says), "{args:?}: {all}");
        assert!(!all.contains("== building"), "{args:?} built: {all}");
    }
}
