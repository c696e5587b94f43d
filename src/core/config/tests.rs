//! Unit tests for the config loader. Each test uses its own environment
//! variable names, so tests running in parallel do not disturb each other.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

const TOKEN_SECRET: &str = "tok-secret-0123456789-0123456789-abcdef";
const KEY_A: &str = "soniox-key-AAAA-1111";
const KEY_B: &str = "soniox-key-BBBB-2222";

/// A fresh directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "clio-relay-config-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Sets `CLIO_T_<tag>_{TOKEN,A,B}` and returns their names.
fn env(tag: &str) -> (String, String, String) {
    let names = (
        format!("CLIO_T_{tag}_TOKEN"),
        format!("CLIO_T_{tag}_A"),
        format!("CLIO_T_{tag}_B"),
    );
    std::env::set_var(&names.0, TOKEN_SECRET);
    std::env::set_var(&names.1, KEY_A);
    std::env::set_var(&names.2, KEY_B);
    names
}

/// A minimal valid file for `tag`, plus `extra` appended.
fn minimal(tag: &str, extra: &str) -> String {
    let (tok, a, _) = env(tag);
    format!(
        "[tokens]\nsecret_env = \"{tok}\"\n\n[[account]]\nid = \"a\"\nkey_env = \"{a}\"\n{extra}"
    )
}

fn problems(text: &str) -> Vec<String> {
    match Config::from_toml_str(text, Path::new("/nonexistent")) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => {
            assert_no_secrets(&e.to_string());
            assert_no_secrets(&format!("{e:?}"));
            e.problems
        }
    }
}

fn assert_has(problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "no problem contains {needle:?}: {problems:#?}"
    );
}

fn assert_no_secrets(shown: &str) {
    for s in [
        TOKEN_SECRET,
        KEY_A,
        KEY_B,
        "tok-secret",
        "soniox-key",
        "file-secret",
    ] {
        assert!(!shown.contains(s), "secret {s:?} leaked in:\n{shown}");
    }
}

#[test]
fn full_valid_file() {
    let (tok, a, b) = env("FULL");
    let dir = temp_dir("full");
    let ca = dir.join("ca.pem");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&ca, ca_params.self_signed(&ca_key).unwrap().pem()).unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19464"
shards = 3
max_streams = 500

[upstream]
url = "ws://127.0.0.1:9000/transcribe-websocket"
auth = "config"
ca_file = "ca.pem"
connect_timeout = "750ms"

[tokens]
secret_env = "{tok}"
previous_secret_env = "{b}"
default_ttl = "10m"
max_ttl = "2h"
clock_skew = "5s"

[limits]
handshake_timeout = "3s"
max_header_bytes = 4096
max_frame_bytes = 65536
max_first_message_bytes = 4096
idle_timeout = "1m"
finalize_wait = "5s"
max_unauthenticated = 10
max_unauthenticated_per_address = 2

[[account]]
id = "prod-1"
key_env = "{a}"
region = "us-east"
enabled = true
max_concurrent_streams = 100

[[account]]
id = "prod_2.b"
key_env = "{b}"
enabled = false
"#
    );
    // The previous secret must itself be long enough.
    std::env::set_var(&b, "previous-0123456789-0123456789-0123");
    let c = Config::from_toml_str(&text, &dir).unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:18080".parse().unwrap());
    assert_eq!(c.server.admin_listen, "127.0.0.1:19464".parse().unwrap());
    assert_eq!((c.server.shards, c.server.shard_count()), (3, 3));
    assert_eq!(c.server.max_streams_if_set(), Some(500));
    assert_eq!(c.upstream.url, "ws://127.0.0.1:9000/transcribe-websocket");
    assert_eq!(c.upstream.auth, AuthMode::Config);
    assert_eq!(c.upstream.ca_file.as_deref(), Some(ca.as_path()));
    assert_eq!(c.upstream.connect_timeout, Duration::from_millis(750));
    assert_eq!(c.tokens.secret.expose(), TOKEN_SECRET);
    assert!(c.tokens.previous_secret.is_some());
    assert_eq!(c.tokens.default_ttl, Duration::from_secs(600));
    assert_eq!(c.tokens.max_ttl, Duration::from_secs(7200));
    assert_eq!(c.tokens.clock_skew, Duration::from_secs(5));
    assert_eq!(
        c.limits,
        LimitsConfig {
            handshake_timeout: Duration::from_secs(3),
            max_header_bytes: 4096,
            max_frame_bytes: 65536,
            max_first_message_bytes: 4096,
            idle_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(10),
            socket_buffer: 256 << 10,
            drain_timeout: Duration::from_secs(30),
            finalize_wait: Duration::from_secs(5),
            max_unauthenticated: 10,
            max_unauthenticated_per_address: 2,
        }
    );
    assert_eq!(c.accounts.len(), 2);
    let a0 = &c.accounts[0];
    assert_eq!(
        (a0.id.as_str(), a0.key.expose(), a0.region.as_str()),
        ("prod-1", KEY_A, "us-east")
    );
    assert!(a0.enabled);
    assert_eq!(a0.max_concurrent_streams, 100);
    let a1 = &c.accounts[1];
    assert_eq!(
        (a1.id.as_str(), a1.region.as_str(), a1.enabled),
        ("prod_2.b", "", false)
    );
    assert_eq!(a1.max_concurrent_streams, 10);
    assert!(c.validate().is_ok());
    assert_eq!(
        c.upstream.endpoint().unwrap(),
        WsEndpoint {
            tls: false,
            host: "127.0.0.1".into(),
            port: 9000,
            path: "/transcribe-websocket".into()
        }
    );
}

/// `server.proxy_protocol_from`: networks or addresses, checked like
/// `server.allow`; none by default; one that is every address is warned
/// about.
#[test]
fn proxy_protocol_from_is_a_list_of_networks() {
    let c = Config::from_toml_str(&minimal("PPF", ""), Path::new(".")).unwrap();
    assert!(c.server.proxy_protocol_from.is_empty());
    let c = Config::from_toml_str(
        &minimal(
            "PPF",
            "[server]\nproxy_protocol_from = [\"10.0.0.5/32\", \"fd00::7\"]\n",
        ),
        Path::new("."),
    )
    .unwrap();
    assert_eq!(
        c.server.proxy_protocol_from,
        vec![
            "10.0.0.5/32".parse::<ipnet::IpNet>().unwrap(),
            "fd00::7/128".parse().unwrap()
        ]
    );
    assert!(
        !c.warnings()
            .iter()
            .any(|w| w.contains("proxy_protocol_from")),
        "{:?}",
        c.warnings()
    );
    let p = problems(&minimal(
        "PPF",
        "[server]\nproxy_protocol_from = [\"10.0.0.5/33\"]\n",
    ));
    assert_has(
        &p,
        "server.proxy_protocol_from[0]: invalid network \"10.0.0.5/33\"",
    );
    let c = Config::from_toml_str(
        &minimal("PPF", "[server]\nproxy_protocol_from = [\"0.0.0.0/0\"]\n"),
        Path::new("."),
    )
    .unwrap();
    assert!(
        c.warnings()
            .iter()
            .any(|w| w.starts_with("server.proxy_protocol_from: 0.0.0.0/0 is every address")),
        "{:?}",
        c.warnings()
    );
}

/// A network written with host bits (`10.1.2.3/8`) is all of its
/// network: each list of networks warns of one, naming the one address
/// and the network it could have meant; a network or an address alone
/// is not warned about.
#[test]
fn a_network_with_host_bits_is_warned_about() {
    let c = Config::from_toml_str(
        &minimal(
            "HOSTBITS",
            "[server]\nallow = [\"10.1.2.3/8\", \"10.0.0.0/8\", \"192.168.1.7\"]\n\
             proxy_protocol_from = [\"fd00::7/64\"]\n[admin]\nallow = [\"172.16.5.1/12\"]\n",
        ),
        Path::new("."),
    )
    .unwrap();
    let w: Vec<_> = c
        .warnings()
        .into_iter()
        .filter(|w| w.contains("host bits"))
        .collect();
    assert_eq!(w.len(), 3, "{w:?}");
    assert_eq!(
        w[0],
        "server.allow: 10.1.2.3/8 has host bits set, so it stands for all of 10.0.0.0/8; \
         write 10.1.2.3/32 for that one address, or 10.0.0.0/8 for the network"
    );
    assert!(
        w[1].starts_with(
            "admin.allow: 172.16.5.1/12 has host bits set, so it stands for all of 172.16.0.0/12"
        ),
        "{w:?}"
    );
    assert!(w[2].starts_with("server.proxy_protocol_from: fd00::7/64 has host bits set, so it stands for all of fd00::/64; write fd00::7/128"), "{w:?}");
}

#[test]
fn defaults() {
    let c = Config::from_toml_str(&minimal("DEF", ""), Path::new(".")).unwrap();
    assert_eq!(c.server, ServerConfig::default());
    assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.server.admin_listen, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(c.server.max_streams, 9000);
    assert_eq!(c.server.max_streams_if_set(), None, "left at its default");
    assert!(c.server.shard_count() >= 1);
    assert_eq!(c.upstream, UpstreamConfig::default());
    assert_eq!(
        c.upstream.url,
        "wss://stt-rt.soniox.com/transcribe-websocket"
    );
    assert_eq!(c.upstream.auth, AuthMode::Header);
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.tokens.default_ttl, Duration::from_secs(15 * 60));
    assert_eq!(c.tokens.max_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(c.tokens.clock_skew, Duration::from_secs(30));
    assert!(c.tokens.previous_secret.is_none());
    assert_eq!(c.limits, LimitsConfig::default());
    assert_eq!(c.failover.replay_bytes, 128 * 1024);
    let set = minimal("FOV", "[failover]\nreplay_bytes = 0\n");
    let f = Config::from_toml_str(&set, Path::new(".")).unwrap();
    assert_eq!(f.failover.replay_bytes, 0);
    assert_eq!(
        c.failover.resume_memory,
        c.server.max_streams as usize * (256 << 10)
    );
    let set = minimal("FOV", "[server]\nmax_streams = 10\n");
    let f = Config::from_toml_str(&set, Path::new(".")).unwrap();
    assert_eq!(
        f.failover.resume_memory,
        10 * 256 * 1024,
        "follows max_streams"
    );
    let set = minimal("FOV", "[failover]\nresume_memory = 5000000\n");
    let f = Config::from_toml_str(&set, Path::new(".")).unwrap();
    assert_eq!(f.failover.resume_memory, 5_000_000);
    assert_eq!(c.limits.max_frame_bytes, 1024 * 1024);
    assert_eq!(c.limits.max_first_message_bytes, 64 * 1024);
    let a = &c.accounts[0];
    assert_eq!(
        (a.region.as_str(), a.enabled, a.max_concurrent_streams),
        ("", true, 10)
    );
}

#[test]
fn example_parses() {
    std::env::set_var("CLIO_RELAY_TOKEN_SECRET", TOKEN_SECRET);
    std::env::set_var("SONIOX_PROD_ACCOUNT_01", KEY_A);
    std::env::set_var("SONIOX_PROD_ACCOUNT_02", KEY_B);
    let c = Config::from_toml_str(example_config(), Path::new(".")).unwrap();
    println!("{}", c.summary());
    assert_eq!(c.accounts.len(), 2);
    assert_eq!(c.accounts[0].id, "prod-account-1");
    assert_eq!(c.accounts[0].max_concurrent_streams, 100);
    // The file on disk is the same text.
    let on_disk = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), example_config());
    let c2 = Config::load(&on_disk).unwrap();
    assert_eq!(c2.summary(), c.summary());
}

#[test]
fn unknown_keys_are_errors() {
    let p = problems(&minimal("UNK1", "\n[server]\nfoo = 1\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_has(&p, "unknown field `foo`");
    assert_has(&p, "in [server]");
    let p = problems(&minimal("UNK2", "bogus = true\n"));
    assert_has(&p, "unknown field `bogus`");
    assert_has(&p, "account[0]");
    let p = problems(&format!("{}\n[nope]\n", minimal("UNK3", "")));
    assert_has(&p, "unknown field `nope` in the top level");
    // An inline secret is an unknown key, and the message does not echo it.
    let p = problems(&minimal("UNK4", &format!("key = \"{KEY_B}\"\n")));
    assert_has(&p, "unknown field `key`");
}

#[test]
fn a_duration_written_as_a_number_is_shown_how_to_write_it() {
    // serde alone said "invalid type: integer `30`, expected a string",
    // which does not say the key is a duration.
    for (section, key) in [
        ("limits", "idle_timeout"),
        ("limits", "drain_timeout"),
        ("limits", "finalize_wait"),
        ("upstream", "connect_timeout"),
        ("admin", "health_interval"),
        ("failover", "resume_audio"),
    ] {
        let p = problems(&minimal("DUR", &format!("\n[{section}]\n{key} = 30\n")));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_has(
            &p,
            &format!("{section}.{key}: invalid type: integer `30`, expected a duration as a string with its unit, such as \"30s\""),
        );
    }
    let c = Config::from_toml_str(
        &minimal("DUR", "\n[limits]\nidle_timeout = \"45s\"\n"),
        Path::new("/nonexistent"),
    );
    assert_eq!(c.unwrap().limits.idle_timeout, Duration::from_secs(45));
}

#[test]
fn an_upstream_ca_file_without_a_pem_certificate_is_refused() {
    // check-config said such a file was valid; the start then stopped
    // with exit 1, which systemd retries, instead of 3.
    let dir = temp_dir("ca-file");
    std::fs::write(dir.join("ca.der"), [0x30, 0x82, 0x01, 0x0a, 0x02, 0x01]).unwrap();
    std::fs::write(dir.join("empty.pem"), "").unwrap();
    for file in ["ca.der", "empty.pem"] {
        let text = minimal("CAF", &format!("\n[upstream]\nca_file = \"{file}\"\n"));
        let e = Config::from_toml_str(&text, &dir).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0].starts_with("upstream.ca_file ")
                && e.problems[0].contains(file)
                && e.problems[0].ends_with("no certificate found"),
            "{e}"
        );
    }
}

#[test]
fn toml_syntax_and_type_errors() {
    let p = problems("[server\nlisten = 1");
    assert_eq!(p.len(), 1);
    let p = problems(&minimal("TYPE", "\n[server]\nmax_streams = \"many\"\n"));
    assert_eq!(p.len(), 1);
    assert_has(&p, "server.max_streams: invalid type");
    let p = problems(&minimal("NEG", "\n[server]\nshards = -1\n"));
    assert_has(&p, "server.shards: ");
}

#[test]
fn many_problems_in_one_pass() {
    let (tok, a, _) = env("MANY");
    let text = format!(
        r#"
[server]
listen = "nowhere"
shards = 2000
max_streams = 0

[upstream]
url = "https://example.com/"
auth = "magic"
ca_file = "/definitely/not/here.pem"

[tokens]
secret_env = "{tok}"
default_ttl = "15x"
max_ttl = "1h"
clock_skew = "soon"

[limits]
max_frame_bytes = 0
idle_timeout = "0s"

[[account]]
id = "prod-1"
key_env = "{a}"
max_concurrent_streams = 0

[[account]]
id = "prod-1"
key_env = "CLIO_T_MANY_UNSET_X"

[[account]]
id = "bad id!"
key_env = "{a}"
key_file = "k"

[[account]]
id = ""
"#
    );
    let p = problems(&text);
    for needle in [
        "server.listen: invalid socket address \"nowhere\"",
        "server.shards: 2000 is more than 1024",
        "server.max_streams: must be at least 1",
        "upstream.url: \"https://example.com/\" must start with ws:// or wss://",
        "upstream.auth: must be \"header\" or \"config\"",
        "upstream.ca_file: /definitely/not/here.pem does not exist",
        "tokens.default_ttl: invalid duration \"15x\"",
        "tokens.clock_skew: invalid duration \"soon\"",
        "limits.max_frame_bytes: must be more than 0",
        "limits.idle_timeout: must be more than 0",
        "account \"prod-1\".max_concurrent_streams: must be at least 1",
        "account[1].id: duplicate id \"prod-1\"",
        "account \"prod-1\": key_env CLIO_T_MANY_UNSET_X is not set",
        "account[2].id: \"bad id!\" must be 1-64 characters of",
        "account[2]: set only one of key_env or key_file",
        "account[3]: set one of key_env or key_file",
        "account[3].id: is empty",
    ] {
        assert_has(&p, needle);
    }
    // Every line names a key: no line starts with a bare message.
    for line in &p {
        assert!(line.contains(": "), "{line}");
    }
}

#[test]
fn ttl_relations() {
    let p = problems(&minimal("TTL1", "").replacen(
        "\n\n[[account]]",
        "\ndefault_ttl = \"2h\"\nmax_ttl = \"1h\"\n\n[[account]]",
        1,
    ));
    assert_eq!(
        p,
        vec!["tokens.default_ttl: 2h is longer than tokens.max_ttl 1h".to_string()]
    );
    // A bad duration does not also produce a follow-on relation complaint.
    let p = problems(&minimal("TTL2", "").replacen(
        "\n\n[[account]]",
        "\ndefault_ttl = \"2h\"\nmax_ttl = \"1 fortnight\"\n\n[[account]]",
        1,
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_has(&p, "tokens.max_ttl: invalid duration");
}

#[test]
fn no_accounts_no_tokens() {
    let p = problems("");
    assert_has(&p, "tokens: missing [tokens] section");
    assert_has(&p, "account: at least one [[account]] is needed");
}

#[test]
fn token_secret_rules() {
    let short = "CLIO_T_TOOSHORT_SECRET";
    std::env::set_var(short, "too-short-secret");
    let (_, a, _) = env("SHORT");
    let p = problems(&format!(
        "[tokens]\nsecret_env = \"{short}\"\n[[account]]\nid = \"a\"\nkey_env = \"{a}\"\n"
    ));
    assert_eq!(
        p,
        vec!["tokens.secret: is 16 bytes; a token secret needs at least 32".to_string()]
    );
    assert!(!p[0].contains("too-short-secret"));

    let empty = "CLIO_T_EMPTYVAL_SECRET";
    std::env::set_var(empty, "");
    let p = problems(&format!(
        "[tokens]\nsecret_env = \"{empty}\"\n[[account]]\nid = \"a\"\nkey_env = \"{a}\"\n"
    ));
    assert_eq!(p, vec![format!("tokens: secret_env {empty} is empty")]);

    let p = problems(&format!(
        "[tokens]\nsecret_env = \"{empty}\"\nsecret_file = \"x\"\n[[account]]\nid = \"a\"\nkey_env = \"{a}\"\n"
    ));
    assert_has(&p, "tokens: set only one of secret_env or secret_file");

    let p = problems(&format!(
        "[tokens]\n[[account]]\nid = \"a\"\nkey_env = \"{a}\"\n"
    ));
    assert_has(&p, "tokens: set one of secret_env or secret_file");

    let p = problems(&minimal("PREV", "").replacen(
        "\n\n[[account]]",
        &format!("\nprevious_secret_env = \"{short}\"\n\n[[account]]"),
        1,
    ));
    assert_has(&p, "tokens.previous_secret: is 16 bytes");
}

#[test]
fn file_secrets() {
    let dir = temp_dir("files");
    std::fs::write(
        dir.join("token"),
        "file-secret-token-0123456789-0123456789\n",
    )
    .unwrap();
    std::fs::write(dir.join("key"), "file-secret-key\r\n").unwrap();
    std::fs::write(dir.join("empty"), "\n").unwrap();
    let abs_key = dir.join("key");
    let text = format!(
        r#"
[tokens]
secret_file = "token"
[[account]]
id = "rel"
key_file = "key"
[[account]]
id = "abs"
key_file = "{}"
"#,
        abs_key.display()
    );
    let c = Config::from_toml_str(&text, &dir).unwrap();
    assert_eq!(
        c.tokens.secret.expose(),
        "file-secret-token-0123456789-0123456789"
    );
    assert_eq!(c.accounts[0].key.expose(), "file-secret-key");
    assert_eq!(c.accounts[1].key.expose(), "file-secret-key");

    // Config::load resolves relative paths against the file's directory.
    std::fs::write(dir.join("relay.toml"), &text).unwrap();
    let c = Config::load(&dir.join("relay.toml")).unwrap();
    assert_eq!(c.accounts[0].key.expose(), "file-secret-key");

    let p = problems(&format!(
        "[tokens]\nsecret_file = \"{}\"\n[[account]]\nid = \"a\"\nkey_file = \"{}\"\n",
        dir.join("empty").display(),
        dir.join("missing").display()
    ));
    assert_has(&p, "tokens: secret_file");
    assert_has(&p, "empty");
    assert_has(&p, "account \"a\": key_file");
    assert_has(&p, "missing");
}

#[test]
fn missing_config_file() {
    let err = Config::load(Path::new("/definitely/not/here/relay.toml")).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(
        err.problems[0],
        "cannot read the config file: No such file or directory (os error 2)"
    );
}

#[test]
fn secrets_never_shown() {
    let (tok, a, b) = env("SHOW");
    let text = format!(
        "[tokens]\nsecret_env = \"{tok}\"\nprevious_secret_env = \"{tok}\"\n\
         [[account]]\nid = \"a\"\nkey_env = \"{a}\"\n[[account]]\nid = \"b\"\nkey_env = \"{b}\"\n"
    );
    let c = Config::from_toml_str(&text, Path::new(".")).unwrap();
    let summary = c.summary();
    assert_no_secrets(&summary);
    assert_no_secrets(&format!("{c:?}"));
    assert_no_secrets(&format!("{c:#?}"));
    assert!(
        summary.contains(&c.accounts[0].key.fingerprint()),
        "{summary}"
    );
    assert!(
        summary.contains(&crate::core::token::key_id(&c.tokens.secret)),
        "{summary}"
    );
    assert!(
        summary.contains("a: region -, enabled, max_concurrent_streams 10"),
        "{summary}"
    );
    // Errors caused by the values of secrets do not quote them either.
    let mut bad = c.clone();
    bad.tokens.secret = Secret::new("soniox-key-short");
    let e = bad.validate().unwrap_err();
    assert_no_secrets(&e.to_string());
    assert_no_secrets(&format!("{e:?}"));
}

#[test]
fn validate_built_config() {
    let c = Config {
        server: ServerConfig::default(),
        upstream: UpstreamConfig::default(),
        tokens: TokensConfig::new(Secret::new(TOKEN_SECRET)),
        limits: LimitsConfig::default(),
        accounts: vec![AccountConfig::new("a", Secret::new(KEY_A))],
        admin: AdminConfig::default(),
        devices: Default::default(),
        usage: Default::default(),
        failover: Default::default(),
        tls: None,
        cluster: None,
        pools: Vec::new(),
        secret_files: Vec::new(),
    };
    assert!(c.validate().is_ok());
    let mut bad = c.clone();
    bad.accounts.push(AccountConfig::new("a", Secret::new("")));
    bad.server.admin_listen = bad.server.listen;
    let p = bad.validate().unwrap_err().problems;
    assert_has(&p, "account \"a\".key: is empty");
    assert_has(&p, "account[1].id: duplicate id \"a\"");
    assert_has(&p, "server.admin_listen: is the same as server.listen");
    // A key goes in an HTTP header: no spaces, line breaks or non-ASCII.
    let mut spaced = c.clone();
    spaced.accounts[0].key = Secret::new("key with\r\nbreak");
    let p = spaced.validate().unwrap_err().problems;
    assert_has(&p, "account \"a\".key: has spaces");
    // And at most 4096 bytes, said without the key.
    let mut long = c.clone();
    long.accounts[0].key = Secret::new("k".repeat(4097));
    let p = long.validate().unwrap_err().problems;
    assert_has(&p, "account \"a\".key: is longer than 4096 bytes (4097)");
    assert!(p.iter().all(|l| !l.contains("kkkk")), "{p:?}");
    long.accounts[0].key = Secret::new("k".repeat(4096));
    assert!(long.validate().is_ok());
}

#[test]
fn ws_urls() {
    let ok = |u: &str| parse_ws_url(u).unwrap();
    assert_eq!(
        ok("wss://stt-rt.soniox.com/transcribe-websocket"),
        WsEndpoint {
            tls: true,
            host: "stt-rt.soniox.com".into(),
            port: 443,
            path: "/transcribe-websocket".into()
        }
    );
    assert_eq!(ok("ws://h").path, "/");
    assert_eq!(ok("ws://h").port, 80);
    assert_eq!(ok("ws://h?x=1").path, "/?x=1");
    let v6 = ok("ws://[::1]:9000/p");
    assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
    for bad in [
        "http://h/",
        "wss://",
        "wss:///path",
        "ws://:80/",
        "ws://h:0/",
        "ws://h:99999/",
        "ws://h:x/",
        "ws://user:pw@h/",
        "ws://[::1/",
        "ws://h/#frag",
    ] {
        assert!(parse_ws_url(bad).is_err(), "{bad}");
    }
}

/// A URL refused for its credentials, or for anything else, never repeats
/// them: not in the message, not in `Debug`, nor in the config's error.
#[test]
fn a_refused_url_never_repeats_its_credentials() {
    for (url, shown) in [
        (
            "ws://user:s3cret-pw@h/p",
            "\"ws://***@h/p\" must not contain credentials",
        ),
        (
            "https://user:s3cret-pw@h/",
            "\"https://***@h/\" must start with ws:// or wss://",
        ),
        (
            "wss://a@b:s3cret-pw@h:1/",
            "\"wss://***@h:1/\" must not contain credentials",
        ),
    ] {
        let e = parse_ws_url(url).unwrap_err();
        assert_eq!(e.to_string(), shown);
        assert!(!format!("{e:?}").contains("s3cret-pw"));
    }
    let text = minimal(
        "URLCRED",
        "[upstream]\nurl = \"wss://key:s3cret-pw@stt.example/ws\"\n",
    );
    let e = Config::from_toml_str(&text, Path::new(".")).unwrap_err();
    let shown = format!("{e}\n{e:?}");
    assert!(shown.contains("must not contain credentials"), "{shown}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
    assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
    assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
    assert!(parse_duration("15x")
        .unwrap_err()
        .to_string()
        .starts_with("invalid duration \"15x\""));
    assert!(parse_duration("").is_err());
    assert!(parse_duration("5").is_err());
}

#[test]
fn show_parse_messages() {
    // Not an assertion of exact wording (that is toml's), only of shape.
    for (tag, extra) in [
        ("SHOW1", "\n[server]\nfoo = 1\n"),
        ("SHOW2", "bogus = true\n"),
        ("SHOW3", "max_concurrent_streams = -3\n"),
        ("SHOW4", "\n[nope]\n"),
        ("SHOW5", "\n[server]\nlisten = \n"),
    ] {
        let p = problems(&minimal(tag, extra));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("(line "), "{p:?}");
        println!("{}", p[0]);
    }
}

/// A config of `accounts` and nothing else set (no file, every section
/// its default), for the checks that look at the whole config.
fn bare_config(accounts: Vec<AccountConfig>) -> Config {
    Config {
        server: ServerConfig::default(),
        upstream: UpstreamConfig::default(),
        tokens: TokensConfig::new(Secret::new(TOKEN_SECRET)),
        limits: LimitsConfig::default(),
        accounts,
        admin: AdminConfig::default(),
        devices: Default::default(),
        usage: Default::default(),
        failover: Default::default(),
        tls: None,
        cluster: None,
        pools: Vec::new(),
        secret_files: Vec::new(),
    }
}

#[test]
fn warnings() {
    let mut c = bare_config(vec![
        AccountConfig::new("a", Secret::new(KEY_A)),
        AccountConfig::new("b", Secret::new(KEY_A)),
    ]);
    c.server.max_streams = 15;
    c.server.max_streams_set = true;
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("account \"b\": has the same key as account \"a\""),
        "{w:?}"
    );
    c.server.max_streams = 25;
    c.accounts[1].key = Secret::new(KEY_B);
    c.tokens.previous_secret = Some(c.tokens.secret.clone());
    let w = c.warnings();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("server.max_streams: 25 is more than"),
        "{w:?}"
    );
    assert!(w[1].starts_with("tokens.previous_secret"), "{w:?}");
    for a in &mut c.accounts {
        a.enabled = false;
    }
    let w = c.warnings();
    assert!(w[0].starts_with("account: no account is enabled"), "{w:?}");
    let summary = c.summary();
    assert!(
        summary.contains("\nwarning: account: no account is enabled"),
        "{summary}"
    );
    assert_no_secrets(&summary);
}

#[test]
fn warns_when_runtime_changes_would_not_persist() {
    let mut c = bare_config(vec![AccountConfig::new("a", Secret::new(KEY_A))]);
    c.server.max_streams = 10;
    // No admin token: no runtime changes are possible, nothing to warn about.
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    c.admin.token = Some(Secret::new("admin-token-0123456789"));
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("admin.master_key: not set"), "{w:?}");
    assert!(c.summary().contains("\nwarning: admin.master_key: not set"));
    c.admin.master_key = Some(Secret::new("00".repeat(32)));
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    // In a fleet, account changes are refused without one.
    c.admin.master_key = None;
    c.cluster = Some(crate::core::config::ClusterConfig {
        redis_url: "redis://127.0.0.1:6379/0".into(),
        ca: None,
        username: None,
        password: None,
        node_id: "n1".into(),
        lease_ttl: Duration::from_secs(15),
        on_store_down: crate::core::config::StoreDown::Local,
        timeout: Duration::from_millis(250),
    });
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("admin.master_key: not set, so in this fleet the admin API refuses"),
        "{w:?}"
    );
    // The summary says which node this is and where its fleet is.
    let summary = c.summary();
    assert!(
        summary.contains(
            "\ncluster: redis://127.0.0.1:6379/0, node_id n1, lease_ttl 15s, timeout 250ms, \
             on_store_down local\n"
        ),
        "{summary}"
    );
}

#[test]
fn warns_when_the_drain_outlasts_the_units_stop_timeout() {
    let mut c = bare_config(vec![AccountConfig::new("a", Secret::new(KEY_A))]);
    c.server.max_streams = 10;
    c.limits.drain_timeout = Duration::from_secs(72);
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    c.limits.drain_timeout = Duration::from_secs(80);
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("limits.drain_timeout: 80 s, plus up to 18 s")
            && w[0].contains("TimeoutStopSec above 98 s"),
        "{w:?}"
    );
    // A longer finalize wait lengthens the drain's end by as much.
    c.limits.drain_timeout = Duration::from_secs(60);
    c.limits.finalize_wait = Duration::from_secs(23);
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("limits.drain_timeout: 60 s, plus up to 38 s")
            && w[0].contains("TimeoutStopSec above 98 s"),
        "{w:?}"
    );
}

#[test]
fn a_key_pasted_as_env_name_is_not_echoed() {
    let (tok, _, _) = env("PASTE");
    for pasted in [
        "sk-live-0123456789abcdef",
        "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718",
        "lowercase_name_but_maybe_a_key",
    ] {
        let text = format!(
            "[tokens]\nsecret_env = \"{tok}\"\n[[account]]\nid = \"a\"\nkey_env = \"{pasted}\"\n"
        );
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(!p[0].contains(pasted), "{p:?}");
        assert!(p[0].starts_with("account \"a\": "), "{p:?}");
    }
}

/// The same mistake with a `*_file` key: the file is not found, and the
/// message names the key, not the value. A path that looks like one
/// (`secrets/k1`, `prod.key`, a short name) is still shown.
#[test]
fn a_key_pasted_as_file_name_is_not_echoed() {
    let (tok, _, _) = env("PASTEF");
    for pasted in [
        "sk-live-0123456789abcdef",
        "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718",
    ] {
        let text = format!(
            "[tokens]\nsecret_env = \"{tok}\"\n[[account]]\nid = \"a\"\nkey_file = \"{pasted}\"\n"
        );
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(!p[0].contains(pasted), "{p:?}");
        assert!(p[0].contains("key_file"), "{p:?}");
    }
    for path in ["secrets/k1", "prod-3.key", "k1"] {
        let text = format!(
            "[tokens]\nsecret_env = \"{tok}\"\n[[account]]\nid = \"a\"\nkey_file = \"{path}\"\n"
        );
        let p = problems(&text);
        assert!(p[0].contains(path), "{p:?}");
    }
}

#[test]
fn a_disabled_account_does_not_need_its_key() {
    let (tok, a, _) = env("DISKEY");
    let dir = temp_dir("diskey");
    let text = format!(
        "[tokens]\nsecret_env = \"{tok}\"\n\
         [[account]]\nid = \"on\"\nkey_env = \"{a}\"\n\
         [[account]]\nid = \"off-env\"\nkey_env = \"CLIO_T_DISKEY_UNSET\"\nenabled = false\n\
         [[account]]\nid = \"off-file\"\nkey_file = \"absent-key\"\nenabled = false\n"
    );
    let c = Config::from_toml_str(&text, &dir).unwrap();
    assert_eq!(c.accounts.len(), 3);
    assert!(c.accounts[0].has_key());
    assert!(!c.accounts[1].has_key() && !c.accounts[2].has_key());
    let w = c.warnings();
    assert!(
        w.iter().any(
            |w| w.starts_with("account \"off-env\": disabled and its key is not there")
                && w.contains("set CLIO_T_DISKEY_UNSET and restart")
        ),
        "{w:?}"
    );
    assert!(
        w.iter().any(|w| w.starts_with("account \"off-file\"")),
        "{w:?}"
    );
    assert!(c
        .summary()
        .contains("off-env: region -, disabled, max_concurrent_streams 10, no key (not loaded)"));
    // The relay leaves them out; the enabled one is there.
    let set = crate::control::accounts::Accounts::from_config(
        &c.accounts,
        &["default".to_string()],
        std::time::Instant::now(),
    );
    let ids: Vec<&str> = set.entries().iter().map(|e| e.state.id.as_str()).collect();
    assert_eq!(ids, ["on"]);
    // An enabled account still needs its key, and the error names it by id.
    let p = problems(&text.replace(
        "enabled = false\n[[account]]\nid = \"off-file\"",
        "[[account]]\nid = \"off-file\"",
    ));
    assert_eq!(
        p,
        ["account \"off-env\": key_env CLIO_T_DISKEY_UNSET is not set"],
        "{p:?}"
    );
    // A disabled account with a broken key setting is still an error.
    let p = problems(&text.replace(
        "key_file = \"absent-key\"",
        "key_file = \"absent-key\"\nkey_env = \"X\"",
    ));
    assert_has(
        &p,
        "account \"off-file\": set only one of key_env or key_file",
    );
}

#[test]
fn pools_and_their_endpoints() {
    let (tok, a, b) = env("POOLS");
    let text = format!(
        r#"
[upstream]
url = "wss://stt-rt.soniox.com/transcribe-websocket"

[tokens]
secret_env = "{tok}"
pools = ["prod-eu", "default"]

[pool.prod-eu]
url = "wss://stt-rt.eu.soniox.com/transcribe-websocket"

[pool.dev]
url = "ws://127.0.0.1:7301/transcribe-websocket"
rest_url = "http://127.0.0.1:7301"

[[account]]
id = "us-1"
key_env = "{a}"

[[account]]
id = "eu-1"
key_env = "{b}"
pool = "prod-eu"
region = "eu"
"#
    );
    let c = Config::from_toml_str(&text, Path::new("/")).unwrap();
    assert_eq!(c.pool_names(), ["default", "dev", "prod-eu"]);
    let pools = c.all_pools();
    assert_eq!(pools[0].url, c.upstream.url);
    assert_eq!(pools[1].rest_url.as_deref(), Some("http://127.0.0.1:7301"));
    assert_eq!(
        pools[2].url,
        "wss://stt-rt.eu.soniox.com/transcribe-websocket"
    );
    assert_eq!(c.accounts[0].pool, DEFAULT_POOL);
    assert_eq!(c.accounts[1].pool, "prod-eu");
    assert_eq!(
        c.tokens.pools.as_deref(),
        Some(&["prod-eu".to_string(), "default".to_string()][..])
    );
    assert_eq!(c.tokens.known_pools, ["default", "dev", "prod-eu"]);
    let summary = c.summary();
    assert!(
        summary.contains("pool prod-eu: wss://stt-rt.eu.soniox.com"),
        "{summary}"
    );
    assert!(
        summary.contains("eu-1: pool prod-eu, region eu"),
        "{summary}"
    );
    assert!(summary.contains("(pools prod-eu, default)"), "{summary}");
}

#[test]
fn pool_limits_tighten_the_tiers_and_name_their_pool() {
    use crate::core::devices::Limit;
    let text = format!(
        "{}[devices]\nmax_concurrent_streams = 3\naudio_seconds_per_day = 600\n\
         [devices.tier.pro]\nmax_concurrent_streams = 10\n\
         [pool.default]\nmax_streams = 50\n\
         [pool.dev]\nurl = \"ws://127.0.0.1:7301/x\"\nmax_streams = 2\n\
         [pool.dev.devices]\nmax_concurrent_streams = 1\nstreams_per_minute = 5\n\
         audio_seconds_per_day = 6000\nmax_stream_length = \"10m\"\n\
         [pool.eu]\nurl = \"ws://127.0.0.1:7302/x\"\n",
        minimal("POOLLIM", "")
    );
    let c = Config::from_toml_str(&text, Path::new("/")).unwrap();
    let d = &c.devices;
    assert_eq!(d.pool_max_streams("dev"), 2);
    assert_eq!(d.pool_max_streams("default"), 50);
    assert_eq!(d.pool_max_streams("eu"), 0, "no cap of its own");
    let pools = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // dev tightens; its larger daily audio does not loosen the default's.
    let l = d.limits_in(None, &pools(&["dev"]));
    assert_eq!(
        (
            l.max_concurrent_streams,
            l.streams_per_minute,
            l.audio_seconds_per_day,
            l.max_stream_length
        ),
        (1, 5, 600, Duration::from_secs(600))
    );
    assert_eq!(
        d.limits_in(Some("pro"), &pools(&["eu"])),
        *d.limits(Some("pro"))
    );
    // A token naming several pools runs under the strictest.
    assert_eq!(
        d.limits_in(Some("pro"), &pools(&["eu", "dev"]))
            .max_concurrent_streams,
        1
    );
    let dev = pools(&["eu", "dev"]);
    assert_eq!(d.pool_setting(None, &dev, Limit::Concurrent), Some("dev"));
    assert_eq!(d.pool_setting(None, &dev, Limit::Rate), Some("dev"));
    assert_eq!(
        d.pool_setting(None, &dev, Limit::DailyAudio),
        None,
        "the tier's"
    );
    assert_eq!(
        d.pool_setting(None, &pools(&["eu"]), Limit::Concurrent),
        None
    );
    // A file without pool limits: the tier's limits, whatever the pools.
    let plain = Config::from_toml_str(&minimal("POOLLIM2", ""), Path::new("/")).unwrap();
    assert!(plain.devices.pools.is_empty());
    assert_eq!(
        plain.devices.limits_in(None, &pools(&["default"])),
        plain.devices.default
    );
    // Whether any stream can run under a daily allowance (only then does
    // the devices map keep the day's audio): yes above, no in a plain
    // file, and a pool's allowance alone is enough.
    assert!(d.daily_audio());
    assert!(!plain.devices.daily_audio());
    let pool_only = Config::from_toml_str(
        &format!(
            "{}[pool.dev]\nurl = \"ws://127.0.0.1:7301/x\"\n\
             [pool.dev.devices]\naudio_seconds_per_day = 60\n",
            minimal("POOLLIM5", "")
        ),
        Path::new("/"),
    )
    .unwrap();
    assert!(pool_only.devices.daily_audio());
    let p = problems(&minimal(
        "POOLLIM3",
        "[pool.dev]\nurl = \"ws://x\"\nmax_streams = -1\n[pool.dev.devices]\nburst = 3\n",
    ));
    assert!(!p.is_empty());
    let p = problems(&minimal(
        "POOLLIM4",
        "[pool.dev]\nurl = \"ws://x\"\n[pool.dev.devices]\nmax_stream_length = \"soon\"\n",
    ));
    assert_has(&p, "pool.dev.devices.max_stream_length");
}

#[test]
fn a_file_without_pools_has_the_default_pool_only() {
    let c = Config::from_toml_str(&minimal("NOPOOL", ""), Path::new("/")).unwrap();
    assert!(c.pools.is_empty());
    assert_eq!(
        c.all_pools(),
        [PoolConfig::default_pool(DEFAULT_UPSTREAM_URL)]
    );
    assert_eq!(c.accounts[0].pool, DEFAULT_POOL);
    assert_eq!(c.tokens.pools, None);
    assert!(!c.summary().contains("pool"), "{}", c.summary());
}

#[test]
fn pool_problems_name_their_key() {
    let p = problems(&minimal("POOLBAD", "pool = \"eu\"\n"));
    assert_has(&p, "account \"a\".pool: \"eu\" is not a pool");
    let p = problems(&minimal("POOLBAD2", "[pool.eu]\nrest_url = \"ftp://x\"\n"));
    assert_has(&p, "pool.eu.url: missing");
    assert_has(&p, "pool.eu.rest_url: must start with http://");
    let p = problems(&minimal("POOLBAD3", "[pool.eu]\nurl = \"https://x\"\n"));
    assert_has(&p, "pool.eu.url: \"https://x\" must start with ws://");
    let p = problems(&minimal("POOLBAD4", "[pool.\"e u\"]\nurl = \"ws://x\"\n"));
    assert_has(&p, "pool.e u: pool names are 1-64");
    let p = problems(&format!(
        "[upstream]\nurl = \"ws://a\"\n{}[pool.default]\nurl = \"ws://b\"\n",
        minimal("POOLBAD5", "")
    ));
    assert_has(
        &p,
        "pool.default.url: the default pool's endpoint is upstream.url",
    );
    let (tok, a, _) = env("POOLBAD6");
    let p = problems(&format!(
        "[tokens]\nsecret_env = \"{tok}\"\npools = [\"prod\"]\nprevious_pools = []\n\n\
         [[account]]\nid = \"a\"\nkey_env = \"{a}\"\n"
    ));
    assert_has(
        &p,
        "tokens.pools: \"prod\" is not a pool (the file declares default)",
    );
    assert_has(&p, "tokens.previous_pools: is empty");
    assert_has(
        &p,
        "tokens.previous_pools: binds the previous secret, but there is none",
    );
}

#[test]
fn the_default_pool_may_be_declared_instead_of_upstream_url() {
    let c = Config::from_toml_str(
        &minimal("POOLDEF", "[pool.default]\nurl = \"ws://127.0.0.1:9/x\"\n"),
        Path::new("/"),
    )
    .unwrap();
    assert_eq!(c.upstream.url, "ws://127.0.0.1:9/x");
    assert_eq!(
        c.all_pools(),
        [PoolConfig::default_pool("ws://127.0.0.1:9/x")]
    );
}

#[test]
fn extra_token_secrets_are_bound_to_their_pools() {
    let (tok, a, b) = env("EXTRA");
    let base = format!(
        "[tokens]\nsecret_env = \"{tok}\"\npools = [\"prod\"]\n\n\
         [[tokens.extra]]\nsecret_env = \"{a}_DEV\"\npools = [\"dev\"]\n\n\
         [pool.prod]\nurl = \"ws://127.0.0.1:9/p\"\n[pool.dev]\nurl = \"ws://127.0.0.1:9/d\"\n\n\
         [[account]]\nid = \"a\"\nkey_env = \"{b}\"\npool = \"prod\"\n"
    );
    std::env::set_var(format!("{a}_DEV"), "dev-token-secret-0123456789-0123456789");
    let c = Config::from_toml_str(&base, Path::new("/")).unwrap();
    assert_eq!(c.tokens.extra.len(), 1);
    assert_eq!(c.tokens.extra[0].pools, ["dev"]);
    let summary = c.summary();
    assert!(
        summary.contains("also verifies, for pools dev only"),
        "{summary}"
    );
    assert!(!summary.contains("dev-token-secret"), "{summary}");
    let p = problems(&base.replace("pools = [\"dev\"]\n", ""));
    assert_has(&p, "tokens.extra[0].pools: missing");
    let p = problems(&base.replace("pools = [\"dev\"]\n", "pools = [\"qa\"]\n"));
    assert_has(&p, "tokens.extra[0].pools: \"qa\" is not a pool");
    let p = problems(&base.replace(
        &format!("secret_env = \"{a}_DEV\""),
        &format!("secret_env = \"{tok}\""),
    ));
    assert_has(&p, "tokens.extra[0]: has the same secret as tokens.secret");
}

/// A master key file may hold the 32 raw bytes of a systemd credential,
/// or 64 hex digits; 32 bytes of hex text are neither.
#[test]
fn a_master_key_file_may_hold_32_raw_bytes() {
    use crate::control::keystore::MasterKey;
    let (tok, a, _) = env("RAWKEY");
    let dir = temp_dir("rawkey");
    let raw: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xa5);
    std::fs::write(dir.join("raw.key"), raw).unwrap();
    let text = |file: &str| {
        format!(
            "[tokens]\nsecret_env = \"{tok}\"\n[admin]\nmaster_key_file = \"{file}\"\n\
             [[account]]\nid = \"a\"\nkey_env = \"{a}\"\n"
        )
    };
    let c = Config::from_toml_str(&text("raw.key"), &dir).unwrap();
    let key = MasterKey::from_hex(c.admin.master_key.as_ref().unwrap().expose()).unwrap();
    assert_eq!(key.check(), MasterKey::from_bytes(raw).check());
    std::fs::write(dir.join("half.key"), "0123456789abcdef0123456789abcdef").unwrap();
    let e = Config::from_toml_str(&text("half.key"), &dir).unwrap_err();
    assert!(e.to_string().contains("must be 64 hex digits"), "{e}");
    assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
    // Raw bytes of another length (a credential of 16 or 64 bytes, or one
    // with a newline added) are neither either, and the message says what
    // is taken, not only that they are not text.
    for len in [16, 33, 64] {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(37) ^ 0xa5)
            .collect();
        std::fs::write(dir.join("raw.key"), &bytes).unwrap();
        let e = Config::from_toml_str(&text("raw.key"), &dir).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.to_string().contains(&format!(
                "{len} bytes that are not text: must be 64 hex digits (`openssl rand -hex 32`), \
                 or a master_key_file of exactly 32 raw bytes"
            )),
            "{len}: {e}"
        );
    }
}

/// A URL the HTTP client would refuse at its first use is refused at load
/// time, without quoting it (credentials in it are a secret).
#[test]
fn http_urls_with_credentials_or_no_host_are_refused_at_load() {
    let p = problems(&minimal(
        "HOOKCRED",
        "[alerts]\nwebhook_url = \"https://ops:hunter2-pw@hooks.example/x\"\n",
    ));
    assert_has(&p, "alerts.webhook_url: must not hold credentials");
    assert!(!p.iter().any(|l| l.contains("hunter2")), "{p:?}");
    let p = problems(&minimal(
        "HOOKHOST",
        "[alerts]\nwebhook_url = \"http:///x\"\n",
    ));
    assert_has(&p, "alerts.webhook_url: has no host");
    let p = problems(&minimal(
        "RESTCRED",
        "[admin]\nrest_url = \"https://u:p@api.example\"\n",
    ));
    assert_has(&p, "admin.rest_url: must not hold credentials");
    // A port the client cannot connect to, or an authority it reads
    // otherwise (an unclosed IPv6 bracket, a fragment that would hide a
    // user info), passed the load and failed at the first alert too.
    for (url, problem) in [
        ("https://hooks.example:99999/s3cret", "has an invalid port"),
        ("https://hooks.example:https/s3cret", "has an invalid port"),
        ("https://[::1/s3cret", "has an unclosed IPv6 address"),
        (
            "https://hooks.example#s3cret@x/",
            "must not have a fragment",
        ),
    ] {
        let p = problems(&minimal(
            "HOOKPORT",
            &format!("[alerts]\nwebhook_url = \"{url}\"\n"),
        ));
        assert_has(&p, &format!("alerts.webhook_url: {problem}"));
        assert!(!p.iter().any(|l| l.contains("s3cret")), "{p:?}");
    }
    let ok = minimal(
        "HOOKOK",
        "[alerts]\nwebhook_url = \"https://hooks.example/T0/B0/secret-in-path?x=1\"\n",
    );
    assert!(Config::from_toml_str(&ok, Path::new("/nonexistent")).is_ok());
}
