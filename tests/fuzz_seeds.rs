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
