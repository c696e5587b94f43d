//! Every shell block in README.md and clients/README.md runs as written on
//! a fresh copy of the repository.
//!
//! Each ```sh block is marked on the line before it:
//! `<!-- readme-test: run -->`, `<!-- readme-test: run against a relay -->`
//! for a block that talks to a running relay (the text before it says what
//! that relay has; [`RELAY_PRELUDE`] starts one like it first), or
//! `<!-- readme-test: skip: why -->` for the few that need root, systemd,
//! or are `cargo test` itself. An unmarked block fails the test, so a new
//! block is either run here or says why not.
//!
//! A block runs with `bash -euo pipefail` in a copy of the repository's
//! files (tracked and new, not ignored: no `target/`, no state), inside a
//! private network namespace (`unshare -n`) so that the recipes' fixed
//! ports (8080, 9464, 7300) are free whatever else runs on the machine.
//! `cargo build --release` there links the binaries `cargo test` built
//! into `target/release/` instead of building them again. Background jobs
//! a block leaves are stopped when it ends.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Debug)]
struct Block {
    file: &'static str,
    line: usize,
    run: bool,
    /// Runs after [`RELAY_PRELUDE`].
    relay: bool,
    text: String,
}

/// What a `run against a relay` block finds, as the README describes it:
/// `clio-relay` on the PATH; a relay running from `relay.toml`, with
/// accounts `prod-1` and `prod-2`, its admin port on 127.0.0.1:9464 and the
/// admin token from `CLIO_RELAY_ADMIN_TOKEN`, also in `$ADMIN`; new keys in
/// `prod-3.key` and `new-key.txt`.
const RELAY_PRELUDE: &str = r#"
export PATH="$BIN_DIR:$PATH"
export CLIO_RELAY_TOKEN_SECRET=$(openssl rand -hex 32) CLIO_RELAY_ADMIN_TOKEN=$(openssl rand -hex 16)
export CLIO_RELAY_MASTER_KEY=$(openssl rand -hex 32) ADMIN=$CLIO_RELAY_ADMIN_TOKEN
export SONIOX_PROD_ACCOUNT_01=readme-key-1 SONIOX_PROD_ACCOUNT_02=readme-key-2
echo readme-key-3 > prod-3.key
echo readme-key-4 > new-key.txt
cat > relay.toml <<'EOF'
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9464"
[upstream]
url = "ws://127.0.0.1:7300/transcribe-websocket"
[tokens]
secret_env = "CLIO_RELAY_TOKEN_SECRET"
[admin]
token_env = "CLIO_RELAY_ADMIN_TOKEN"
master_key_env = "CLIO_RELAY_MASTER_KEY"
state_dir = "state"
health_interval = "0s"
[[account]]
id = "prod-1"
key_env = "SONIOX_PROD_ACCOUNT_01"
[[account]]
id = "prod-2"
key_env = "SONIOX_PROD_ACCOUNT_02"
EOF
clio-relay run --config relay.toml 2> relay.log &
curl -sS -o /dev/null --retry 30 --retry-connrefused --retry-delay 1 127.0.0.1:9464/healthz
"#;

/// The ```sh blocks of `file` (relative to the repository), with their markers.
fn blocks(file: &'static str) -> Vec<Block> {
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```sh" {
            i += 1;
            continue;
        }
        let marker = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim())
            .unwrap_or("");
        let relay = marker == "<!-- readme-test: run against a relay -->";
        let run = if marker == "<!-- readme-test: run -->" || relay {
            true
        } else if marker.starts_with("<!-- readme-test: skip: ") && marker.ends_with("-->") {
            false
        } else {
            panic!(
                "{file}:{}: a ```sh block without a readme-test marker on the line before it \
                 (<!-- readme-test: run --> or <!-- readme-test: skip: why -->)",
                i + 1
            );
        };
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].trim_end() == "```")
            .unwrap_or_else(|| panic!("{file}:{}: unclosed block", i + 1));
        out.push(Block {
            file,
            line: i + 1,
            run,
            relay,
            text: lines[i + 1..end].join("\n"),
        });
        i = end + 1;
    }
    out
}

/// A copy of the repository's files as a fresh clone has them.
fn fresh_copy(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clio-readme-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(repo())
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git ls-files failed");
    for name in out.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).unwrap();
        let from = repo().join(name);
        if !from.is_file() {
            continue; // deleted in the working tree
        }
        let to = dir.join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    dir
}

/// Runs one block in `dir`; its combined output, or a panic that shows it.
fn run_block(b: &Block, dir: &Path) -> String {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clio-relay"))
        .parent()
        .unwrap();
    let script = format!(
        r#"set -euo pipefail
ip link set lo up
cd "$BLOCK_DIR"
cargo() {{
    if [ "$*" = "build --release" ]; then
        mkdir -p target/release
        for b in clio-relay fake-soniox relay-load; do ln -sf "$BIN_DIR/$b" "target/release/$b"; done
    else
        echo "readme test: only 'cargo build --release' is provided, not: cargo $*" >&2
        return 1
    fi
}}
stop_jobs() {{
    local j
    j=$(jobs -p)
    if [ -n "$j" ]; then kill $j 2>/dev/null || true; wait 2>/dev/null || true; fi
}}
trap stop_jobs EXIT
{}
{}
"#,
        if b.relay { RELAY_PRELUDE } else { "" },
        b.text
    );
    // As root, a plain network namespace; otherwise a user namespace too
    // (where io_uring's locked memory may run short: run the tests as root).
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let unshare = if root { "-n" } else { "-rn" };
    let out = Command::new("timeout")
        .args([
            "--kill-after=10",
            "300",
            "unshare",
            unshare,
            "bash",
            "-c",
            &script,
        ])
        .env("BLOCK_DIR", dir)
        .env("BIN_DIR", bin_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("timeout, unshare and bash run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{}:{}: the block failed ({}):\n{}\n--- output ---\n{text}",
        b.file,
        b.line,
        out.status,
        b.text
    );
    text
}

fn run_all(file: &'static str, tag: &str) -> usize {
    let mut ran = 0;
    for (n, b) in blocks(file).iter().filter(|b| b.run).enumerate() {
        let dir = fresh_copy(&format!("{tag}-{n}"));
        let out = run_block(b, &dir);
        // What each kind of block must show, beyond its exit status.
        if b.text.contains("mint-token") || b.text.contains("mint.py") {
            assert!(
                out.contains("clio1."),
                "{}:{}: no token:\n{out}",
                b.file,
                b.line
            );
        }
        if b.text.contains("check-config") {
            assert!(out.contains("configuration is valid"), "{out}");
        }
        if b.text.contains("-o rtt.svg") {
            let svg = std::fs::read_to_string(dir.join("rtt.svg")).unwrap();
            assert_eq!(svg.matches("<polyline class=\"series\"").count(), 2);
        }
        if b.text.contains("clio-relay keys") {
            // The last `list` shows every change the block made.
            assert!(
                out.contains("prod-3") && out.contains("eu-west"),
                "{}:{}: keys did not show the new account:\n{out}",
                b.file,
                b.line
            );
        }
        if b.text.contains("/admin/usage") {
            // Each answer names the grouping its query asked for.
            let group = if b.text.contains("group_by=device") {
                r#""group_by":"device""#
            } else {
                r#""group_by":"account""#
            };
            assert!(
                out.contains(group) && out.contains(r#""rows":"#),
                "{}:{}: no usage answer:\n{out}",
                b.file,
                b.line
            );
        }
        if b.text.contains("relay-load") {
            assert!(!out.contains("hint:"), "{out}");
        }
        if b.text.contains("--fail-share") {
            // relay-load reports the resumes its clients never saw.
            let resumed: u64 = out
                .lines()
                .find_map(|l| l.strip_prefix("relay failovers the clients never saw: "))
                .and_then(|l| l.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{}:{}: no failover line:\n{out}", b.file, b.line));
            assert!(resumed > 0, "{}:{}: no resume:\n{out}", b.file, b.line);
        }
        let _ = std::fs::remove_dir_all(&dir);
        ran += 1;
    }
    ran
}

#[test]
fn every_sh_block_is_marked() {
    let readme = blocks("README.md");
    assert!(readme.iter().filter(|b| b.run).count() >= 2, "{readme:#?}");
    let clients = blocks("clients/README.md");
    assert!(clients.iter().all(|b| b.run), "{clients:#?}");
}

#[test]
fn readme_blocks_run_as_written() {
    assert!(run_all("README.md", "readme") >= 2);
}

#[test]
fn clients_readme_blocks_run_as_written() {
    assert!(run_all("clients/README.md", "clients") >= 2);
}
