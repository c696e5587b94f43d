//! What `fake-soniox` says about itself: `-V` and `--help`.
//!
//! Also why the workspace's `cargo test` builds this binary: a package's
//! binaries are built when it has integration tests, and the relay's own
//! tests run it from the same target directory.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_fake-soniox");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn names_itself_in_its_version() {
    let o = Command::new(BIN).arg("-V").output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("fake-soniox {}", env!("CARGO_PKG_VERSION"))
    );
    let help = text(&Command::new(BIN).arg("--help").output().unwrap());
    assert!(help.contains("Usage: fake-soniox"), "{help}");
}

#[test]
fn help_points_at_what_a_user_has() {
    let t = text(&Command::new(BIN).arg("--help").output().unwrap());
    assert!(!t.contains("clio_relay::"), "{t}");
    assert!(t.contains("README.md"), "{t}");
}
