//! What the three binaries say about themselves: `-V`, `--help`, and the
//! command line mistakes a new user makes first.

use std::process::{Command, Output};

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const RELAY: &str = env!("CARGO_BIN_EXE_clio-relay");
const LOAD: &str = env!("CARGO_BIN_EXE_relay-load");
const FAKE: &str = env!("CARGO_BIN_EXE_fake-soniox");

#[test]
fn each_binary_names_itself_in_its_version() {
    let version = env!("CARGO_PKG_VERSION");
    for (bin, name) in [
        (RELAY, "clio-relay"),
        (LOAD, "relay-load"),
        (FAKE, "fake-soniox"),
    ] {
        let o = run(bin, &["-V"]);
        assert!(o.status.success());
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            format!("{name} {version}")
        );
        let help = text(&run(bin, &["--help"]));
        assert!(help.contains(&format!("Usage: {name}")), "{help}");
    }
}

#[test]
fn bare_clio_relay_prints_its_help() {
    let o = run(RELAY, &[]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    for word in [
        "Usage: clio-relay",
        "check-config",
        "mint-token",
        "demo",
        "--config",
    ] {
        assert!(t.contains(word), "{word:?} not in:\n{t}");
    }
}

#[test]
fn subcommand_help_says_what_config_is() {
    for sub in ["run", "check-config", "mint-token", "keys", "demo"] {
        let t = text(&run(RELAY, &[sub, "--help"]));
        assert!(!t.contains("implied"), "{sub} --help:\n{t}");
        assert!(t.contains("config file"), "{sub} --help:\n{t}");
    }
    let t = text(&run(RELAY, &["--help"]));
    assert!(t.contains("with no command runs the relay"), "{t}");
}

#[test]
fn demo_refuses_a_config_file_it_would_ignore() {
    let o = run(RELAY, &["demo", "--config", "config/example.toml"]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(t.contains("demo reads no config file"), "{t}");
}

#[test]
fn fake_soniox_help_points_at_what_a_user_has() {
    let t = text(&run(FAKE, &["--help"]));
    assert!(!t.contains("clio_relay::"), "{t}");
    assert!(t.contains("README.md"), "{t}");
}
