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

/// What fake-soniox cannot start on is named: the address it could not
/// listen on (another process holds it), the TLS file it could not read.
/// Before: "fake-soniox: IO error occurred: Address already in use (os
/// error 98)" and "fake-soniox: I/O error: No such file or directory (os
/// error 2)", naming neither.
#[test]
fn a_start_error_names_the_address_or_the_file() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = Command::new(BIN)
        .args(["--listen", &addr])
        .output()
        .unwrap();
    let all = text(&o);
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(all.contains(&format!("--listen {addr}: ")), "{all}");
    let missing = "/nonexistent/fake-soniox-cert.pem";
    let o = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--tls-cert", missing])
        .args(["--tls-key", "/nonexistent/fake-soniox-key.pem"])
        .output()
        .unwrap();
    let all = text(&o);
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(all.contains(&format!("--tls-cert {missing}: ")), "{all}");
}
