//! What `clio-relay` says about itself: `-V`, `--help`, and the command
//! line mistakes a new user makes first.

use crate::util::*;

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
    // What it says check-config exits with is what it does.
    assert!(t.contains("exit 3 with one line per problem"), "{t}");
    // Every exit status is listed, the one systemd does not retry with
    // both its causes (each_kind_of_failure_has_its_own_exit_status and
    // a_wrong_master_key_exits_3 check the statuses themselves).
    for status in 0..=6 {
        assert!(t.contains(&format!("\n  {status}  ")), "{status}:\n{t}");
    }
    assert!(
        t.contains("or its master key does not open the key store"),
        "{t}"
    );
    let bad = std::env::temp_dir().join(format!("clio-relay-help-{}.toml", std::process::id()));
    std::fs::write(
        &bad,
        "[server]
listen = 7
",
    )
    .unwrap();
    let o = run(RELAY, &["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    std::fs::remove_file(bad).ok();
}

#[test]
fn demo_refuses_a_config_file_it_would_ignore() {
    let o = run(RELAY, &["demo", "--config", "config/example.toml"]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(t.contains("demo reads no config file"), "{t}");
}

/// `demo --help` listed `-c, --config <FILE>`, a global flag, though demo
/// reads no config file (and refuses one). Each command that reads a
/// config now takes --config itself, and demo's help lists only what demo
/// takes. Every way of giving --config that the docs, units and scripts
/// use still works: after the command or before it, after `keys` or
/// after its action.
#[test]
fn demo_help_lists_only_what_demo_takes() {
    let t = text(&run(RELAY, &["demo", "--help"]));
    assert!(!t.contains("--config") && !t.contains("-c,"), "{t}");
    for flag in ["--clients", "--seconds", "--fast"] {
        assert!(t.contains(flag), "{flag}: {t}");
    }
    for sub in [
        &["run"][..],
        &["check-config"],
        &["mint-token"],
        &["keys"],
        &["keys", "list"],
        &["keys", "rotate"],
    ] {
        let t = text(&run(RELAY, &[sub, &["--help"]].concat()));
        assert!(t.contains("-c, --config <FILE>"), "{sub:?}: {t}");
    }
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-config-at-{}", std::process::id()));
    let admin = free_port().to_string();
    let config = relay_config(&dir, "127.0.0.1:0", &admin);
    let c = config.as_str();
    for args in [
        &["check-config", "--config", c][..],
        &["check-config", "-c", c],
        &["--config", c, "check-config"],
        &["-c", c, "check-config"],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("configuration is valid"), "{args:?}");
    }
    for args in [
        &["mint-token", "--config", c, "--device", "d"][..],
        &["--config", c, "mint-token", "--device", "d"],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("clio1."));
    }
    // Nothing listens on the admin port: exit 5 naming this config.
    for args in [
        &["keys", "--config", c, "list"][..],
        &["keys", "list", "--config", c],
        &["--config", c, "keys", "list"],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(&format!("is {c} the config it runs")),
            "{args:?}: {}",
            text(&o)
        );
    }
    // A client port taken: the file was read, whichever way it came.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = relay_config(
        &dir.join("busy"),
        &taken.local_addr().unwrap().to_string(),
        "127.0.0.1:0",
    );
    let b = busy.as_str();
    for args in [
        &["run", "--config", b][..],
        &["--config", b, "run"],
        &["--config", b],
    ] {
        let o = relay_run_args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(4), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("already in use"), "{args:?}");
    }
    drop(taken);
    for args in [&["demo", "--config", c][..], &["--config", c, "demo"]] {
        let o = run(RELAY, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("demo reads no config file"), "{args:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--config` given more than once: for one file (the same path, or the
/// same file by another path, as a wrapper that adds its own and an
/// operator who adds it again) it is taken; for different files it is
/// refused, exit 2, naming each, since which one was meant is a guess.
/// Before, the same path before and after the command was refused ("given
/// twice"), the same path twice in one place was refused by clap ("cannot
/// be used multiple times"), and `keys --config A list --config B` ran
/// with B without a word.
#[test]
fn config_given_more_than_once_is_taken_for_one_file_refused_for_two() {
    let dir = std::env::temp_dir().join(format!(
        "clio-relay-cli-config-twice-{}",
        std::process::id()
    ));
    let admin = free_port().to_string();
    let config = relay_config(&dir, "127.0.0.1:0", &admin);
    let c = config.as_str();
    let by_another_path = dir.join(".").join("relay.toml");
    let c2 = by_another_path.to_str().unwrap();
    for args in [
        &["--config", c, "check-config", "--config", c][..],
        &["check-config", "-c", c, "--config", c],
        &["-c", c, "--config", c, "check-config"],
        &["-c", c, "check-config", "-c", c2],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("configuration is valid"), "{args:?}");
    }
    let o = run_env(&["-c", c, "mint-token", "-c", c, "--device", "d"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Nothing listens on the admin port: exit 5 naming this config.
    for args in [
        &["keys", "--config", c, "list", "--config", c][..],
        &["--config", c, "keys", "list", "-c", c2],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("the config it runs"),
            "{args:?}: {}",
            text(&o)
        );
    }
    // Two files, each valid: which is meant is not guessed.
    let other = relay_config(&dir.join("other"), "127.0.0.1:0", &admin);
    let b = other.as_str();
    for args in [
        &["--config", c, "check-config", "--config", b][..],
        &["check-config", "-c", c, "-c", b],
        &["-c", c, "-c", c2, "-c", b],
        &["keys", "--config", c, "list", "--config", b],
        &["--config", b, "keys", "list", "--config", c],
        &["-c", c, "run", "-c", b],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let said = text(&o);
        assert!(
            said.contains("--config is given more than once, for different files")
                && said.contains(c)
                && said.contains(b),
            "{args:?}: {said}"
        );
        assert!(!said.contains("configuration is valid"), "{args:?}: {said}");
    }
    std::fs::remove_dir_all(&dir).ok();
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
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
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

/// A `--ttl` over `tokens.max_ttl` is refused (exit 2) with what to do:
/// a shorter --ttl, or a longer max_ttl in the file. Before, the line
/// said only that it was longer ("--ttl 2days is longer than
/// tokens.max_ttl 1day"), not that the relay would refuse such a token
/// nor where the bound is set.
#[test]
fn a_ttl_over_max_ttl_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-ttl-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let o = run_env(&[
        "mint-token",
        "--config",
        &config,
        "--device",
        "phone-1",
        "--ttl",
        "48h",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
    assert!(
        text(&o).contains("is longer than tokens.max_ttl 1day")
            && text(&o).contains("give a --ttl of at most 1day")
            && text(&o).contains(&format!("or raise tokens.max_ttl in {config}")),
        "{}",
        text(&o)
    );
    let o = run_env(&[
        "mint-token",
        "--config",
        &config,
        "--device",
        "phone-1",
        "--ttl",
        "24h",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_dir_all(&dir).ok();
}

/// `keys add` and `keys rotate` with neither --key-file nor --key-env
/// read the key from standard input. On a terminal that read waited
/// without a word, as if the command hung; it now says what it waits for
/// and the flags that give the key instead. From a pipe or a file
/// (`< new-key.txt`, README's example) it says nothing. The terminal is a
/// pseudo-terminal python3's `pty` makes; no relay listens at the
/// file's admin address, so the command ends with exit 5 after the read.
#[test]
fn a_key_read_from_a_terminal_is_asked_for() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("clio-relay-key-tty-{}", std::process::id()));
    let admin = free_port().to_string();
    let config = relay_config(&dir, "127.0.0.1:0", &admin);
    let asks = "reading the new key from standard input: paste it, then Enter and Ctrl-D";
    // On a terminal: the prompt, then the key typed and Ctrl-D.
    let script = r#"
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out = b""
end = time.time() + 20
while time.time() < end and b"Ctrl-D" not in out:
    if select.select([fd], [], [], 0.2)[0]:
        try:
            d = os.read(fd, 4096)
        except OSError:
            break
        if not d:
            break
        out += d
os.write(fd, b"cli-tty-key-0123\n")
time.sleep(0.2)
os.write(fd, b"\x04")
while True:
    try:
        d = os.read(fd, 4096)
    except OSError:
        break
    if not d:
        break
    out += d
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let o = match Command::new("python3")
        .args([
            "-c", script, RELAY, "keys", "--config", &config, "rotate", "a",
        ])
        .envs(RELAY_ENV)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: python3 not runnable ({e})");
            return;
        }
    };
    let t = text(&o);
    assert_eq!(o.status.code(), Some(5), "{t}");
    assert!(t.contains(asks), "{t}");
    // From a pipe: no prompt.
    let mut child = Command::new(RELAY)
        .args(["keys", "--config", &config, "rotate", "a"])
        .envs(RELAY_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"cli-tty-key-0123\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(5), "{t}");
    assert!(!t.contains("reading the new key"), "{t}");
    std::fs::remove_dir_all(&dir).ok();
}
