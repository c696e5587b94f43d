//! What `clio-relay` says about itself: `-V`, `--help`, and the command
//! line mistakes a new user makes first. (`relay-load` and `fake-soniox`
//! test their own in `tools/*/tests/cli.rs`.)

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

#[test]
fn names_itself_in_its_version() {
    let o = run(RELAY, &["-V"]);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("clio-relay {}", env!("CARGO_PKG_VERSION"))
    );
    let help = text(&run(RELAY, &["--help"]));
    assert!(help.contains("Usage: clio-relay"), "{help}");
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
fn mint_token_refuses_a_pool_its_secret_is_not_bound_to() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-pools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    const SECRET: &str = "dev-secret-for-the-cli-test-0123456789";
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let config = dir.join("dev.toml");
    std::fs::write(
        &config,
        "[tokens]\nsecret_file = \"secret\"\npools = [\"dev\"]\n\n\
         [pool.dev]\nurl = \"ws://127.0.0.1:7301/transcribe-websocket\"\n\
         [pool.prod]\nurl = \"wss://stt-rt.soniox.com/transcribe-websocket\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let mint = |pool: &str| {
        run(
            RELAY,
            &[
                "mint-token",
                "--config",
                config,
                "--device",
                "phone-1",
                "--pool",
                pool,
            ],
        )
    };
    let o = mint("prod");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
    assert!(
        text(&o).contains("binds the token secret to pools dev: it cannot mint a token for prod"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains(SECRET));
    let o = mint("dev");
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("clio1."));
    std::fs::remove_dir_all(&dir).ok();
}
