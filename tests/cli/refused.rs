//! What the binary says when it will not start, or will not take its
//! config file: the exit status of each kind of failure, one line per
//! problem of a refused file (a key in the wrong table or misspelt, a
//! value of the wrong type, an unbounded region, a Redis URL the client
//! cannot use, a file that is not there, a wrong master key, a secret
//! file the relay's user may not read), a port another program holds, and
//! an address or a locked-memory limit the host does not give.

use std::process::Command;

use crate::util::*;

#[test]
fn each_kind_of_failure_has_its_own_exit_status() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-exit-{}", std::process::id()));
    // 2: the command line (no --config for a command that needs one).
    let o = run(RELAY, &["check-config"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("--config FILE is required")
            && text(&o).contains("`clio-relay demo` runs without one"),
        "{}",
        text(&o)
    );
    let o = run(RELAY, &["run"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("config/example.toml"), "{}", text(&o));

    // 3: the configuration (a key no section has), for check-config and run.
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:0\"\nno_such_key = 1\n",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    for cmd in ["check-config", "run"] {
        let o = run_env(&[cmd, "--config", bad]);
        assert_eq!(o.status.code(), Some(3), "{cmd}: {}", text(&o));
        assert!(text(&o).contains("no_such_key"), "{cmd}: {}", text(&o));
    }

    // 4: a port taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let config = relay_config(&dir, &listen, "127.0.0.1:0");
    let o = run_env(&["run", "--config", &config]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("already in use"), "{}", text(&o));

    // 5: `keys` with no relay listening on the admin port.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = free.local_addr().unwrap().to_string();
    drop(free);
    let config = relay_config(&dir, "127.0.0.1:0", &admin);
    let o = run_env(&["keys", "--config", &config, "list"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("admin API at"), "{}", text(&o));
    // What to check: that the relay runs with this config.
    assert!(
        text(&o).contains("Connection refused")
            && text(&o).contains("nothing listens there: is the relay running")
            && text(&o).contains(&format!("is {config} the config it runs")),
        "{}",
        text(&o)
    );
    // An admin port 0 (the relay picks one at its start): `keys` cannot
    // know it, and says so instead of trying port 0.
    let config0 = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let o = run_env(&["keys", "--config", &config0, "list"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("server.admin_listen in")
            && text(&o).contains("has port 0")
            && text(&o).contains("give server.admin_listen a port"),
        "{}",
        text(&o)
    );
    for secret in [
        "cli-exit-admin-token",
        "cli-exit-soniox-key",
        "cli-exit-secret",
    ] {
        assert!(!text(&o).contains(secret), "{}", text(&o));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// An account's region is bounded as an id is (empty, or 1-64 of
/// `[A-Za-z0-9._-]`): it goes in every metrics series of the account and
/// in `/v1/config`. A 60,000-character one was taken before.
#[test]
fn an_unbounded_region_is_a_config_error() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-region-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    for (region, ok) in [
        ("eu".to_string(), true),
        ("us-east".into(), true),
        (String::new(), true),
        ("r".repeat(64), true),
        ("r".repeat(65), false),
        ("x".repeat(60_000), false),
        ("eu west".into(), false),
    ] {
        std::fs::write(&config, format!("{base}region = \"{region}\"\n")).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        let out = text(&o);
        if ok {
            assert!(o.status.success(), "{} chars: {out}", region.len());
        } else {
            assert_eq!(o.status.code(), Some(3), "{} chars: {out}", region.len());
            assert!(out.contains("account \"a\".region"), "{out}");
            assert!(out.contains("1-64"), "{out}");
            assert!(out.len() < 2000, "the problem is one short line: {out}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A relay carries at most 64 accounts. A file with more was valid for
/// `check-config`; the start loaded 64 and warned of each other one, and
/// each reload logged every one of them as "kept removed (removed at
/// runtime)", 5,000 lines a reload for a file of 5,000. A disabled
/// account with no key is not loaded, so it does not count.
#[test]
fn more_accounts_than_a_relay_carries_is_a_config_error() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-accounts-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    let accounts = |n: usize| -> String {
        (1..n)
            .map(|i| format!("\n[[account]]\nid = \"x{i}\"\nkey_env = \"CLI_EXIT_KEY\"\n"))
            .collect()
    };
    let keyless = "\n[[account]]\nid = \"later\"\nkey_env = \"CLI_NO_SUCH_KEY\"\nenabled = false\n";
    for (n, extra, ok) in [
        (64, "", true),
        (64, keyless, true),
        (65, "", false),
        (5000, "", false),
    ] {
        std::fs::write(&config, format!("{base}{}{extra}", accounts(n))).unwrap();
        for cmd in ["check-config", "run"] {
            if ok && cmd == "run" {
                continue;
            }
            let o = run_env(&[cmd, "--config", &config]);
            let out = text(&o);
            if ok {
                assert!(o.status.success(), "{n} accounts: {out}");
            } else {
                assert_eq!(o.status.code(), Some(3), "{cmd}, {n} accounts: {out}");
                assert!(
                    out.contains(&format!(
                        "{n} accounts with a key; a relay carries at most 64"
                    )),
                    "{cmd}: {out}"
                );
                assert!(out.len() < 2000, "the problem is one short line: {out}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A price or budget that is no number is refused: TOML's `nan` and `inf`
/// passed the "not negative" check, and a `nan` price made every cost of
/// the account `null` in `/admin/usage` and `NaN` in
/// `clio_relay_cost_month`, a `nan` budget never alerted, and a `nan`
/// `unusual_factor` kept `unusual_usage` silent.
#[test]
fn a_price_budget_or_factor_that_is_no_number_is_a_config_error() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-price-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    for (line, ok, names) in [
        ("price_per_hour = 0.12", true, ""),
        ("monthly_budget = 0", true, ""),
        (
            "price_per_hour = nan",
            false,
            "account \"a\".price_per_hour",
        ),
        (
            "price_per_hour = inf",
            false,
            "account \"a\".price_per_hour",
        ),
        (
            "price_per_hour = -1.0",
            false,
            "account \"a\".price_per_hour",
        ),
        (
            "monthly_budget = nan",
            false,
            "account \"a\".monthly_budget",
        ),
        (
            "monthly_budget = -inf",
            false,
            "account \"a\".monthly_budget",
        ),
        ("[alerts]\nunusual_factor = 2.5", true, ""),
        (
            "[alerts]\nunusual_factor = nan",
            false,
            "alerts.unusual_factor",
        ),
        (
            "[alerts]\nunusual_factor = inf",
            false,
            "alerts.unusual_factor",
        ),
        (
            "[alerts]\nunusual_factor = 0.0",
            false,
            "alerts.unusual_factor",
        ),
    ] {
        std::fs::write(&config, format!("{base}{line}\n")).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        let out = text(&o);
        if ok {
            assert!(o.status.success(), "{line}: {out}");
        } else {
            assert_eq!(o.status.code(), Some(3), "{line}: {out}");
            assert!(out.contains(names), "{line}: {out}");
            assert!(out.contains("a finite number"), "{line}: {out}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A master key that does not open the key store is the configuration's
/// fault: exit 3, which the shipped unit does not restart on
/// (`RestartPreventExitStatus=3`), and the key is never shown.
#[test]
fn a_wrong_master_key_exits_3() {
    use clio_relay::control::keystore::{KeyStore, MasterKey, StoreData};
    let dir = std::env::temp_dir().join(format!("clio-relay-wrong-key-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let right = "ab".repeat(32);
    let wrong = "cd".repeat(32);
    KeyStore::open(&state, MasterKey::from_hex(&right).unwrap())
        .unwrap()
        .save(&mut StoreData::default())
        .unwrap();
    let mut file = std::fs::read_to_string(&config)
        .unwrap()
        .replace(STATE_LINE, "");
    file = file.replace(
        "[admin]\n",
        &format!(
            "[admin]\nstate_dir = \"{}\"\nmaster_key_env = \"CLI_WRONG_MASTER\"\n",
            state.display()
        ),
    );
    std::fs::write(&config, file).unwrap();
    let o = relay_run(&config)
        .env("CLI_WRONG_MASTER", &wrong)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("master key"), "{}", text(&o));
    assert!(!text(&o).contains(&wrong), "{}", text(&o));
    std::fs::remove_dir_all(&dir).ok();
}

/// A file of the state directory that the start must read and that is
/// damaged (a key store cut short, a `revocations.json` half written by
/// hand or restored from a broken backup) stays damaged until someone
/// acts: exit 3, which the shipped unit does not restart on, naming the
/// file and what to do. Both used to exit 1, and the unit restarted the
/// relay every 2 s for ever.
#[test]
fn a_damaged_state_file_exits_3_naming_it() {
    use clio_relay::control::keystore::{KeyStore, MasterKey, StoreData};
    let dir = std::env::temp_dir().join(format!("clio-relay-damaged-state-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let state = dir.join("state");
    let master = "ab".repeat(32);
    let file = std::fs::read_to_string(&config).unwrap().replace(
        "[admin]\n",
        "[admin]\nmaster_key_env = \"CLI_DAMAGED_MASTER\"\n",
    );
    std::fs::write(&config, file).unwrap();
    let start = || {
        relay_run(&config)
            .env("CLI_DAMAGED_MASTER", &master)
            .output()
            .unwrap()
    };

    // A key store cut short.
    std::fs::create_dir_all(&state).unwrap();
    KeyStore::open(&state, MasterKey::from_hex(&master).unwrap())
        .unwrap()
        .save(&mut StoreData::default())
        .unwrap();
    let store = state.join("accounts.store");
    let whole = std::fs::read(&store).unwrap();
    std::fs::write(&store, &whole[..whole.len() / 2]).unwrap();
    let o = start();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("accounts.store"), "{}", text(&o));
    assert!(text(&o).contains("move it aside"), "{}", text(&o));
    assert!(!text(&o).contains(&master), "{}", text(&o));
    std::fs::remove_file(&store).unwrap();

    // A revocation list cut short.
    std::fs::write(state.join("revocations.json"), "{\"devices\":[\"phone-1\"").unwrap();
    let o = start();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("revocations.json"), "{}", text(&o));
    assert!(text(&o).contains("move it aside"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).ok();
}

/// A port held by another program (9464, the admin port's default, is
/// also the OpenTelemetry Prometheus exporter's) was put down to "a
/// running clio-relay" with only "stop it first" to do. The message now
/// also says how to see what holds it and the other way out, and the
/// exit status is still 4.
#[test]
fn a_port_another_program_holds_says_how_to_find_it() {
    let dir = std::env::temp_dir().join(format!("clio-relay-port-held-{}", std::process::id()));
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = other.local_addr().unwrap();
    for (listen, admin, key) in [
        (
            "127.0.0.1:0".to_string(),
            held.to_string(),
            "server.admin_listen",
        ),
        (held.to_string(), "127.0.0.1:0".to_string(), "server.listen"),
    ] {
        let config = relay_config(&dir, &listen, &admin);
        let o = run_env(&["run", "--config", &config]);
        assert_eq!(o.status.code(), Some(4), "{}", text(&o));
        let t = text(&o);
        assert!(
            t.contains(&format!("{key} {held} is already in use"))
                && t.contains(&format!(
                    "if another program holds it (`ss -ltnp 'sport = :{}'` names it), stop it \
                     or choose another {key}",
                    held.port()
                )),
            "{t}"
        );
    }
    drop(other);
    std::fs::remove_dir_all(&dir).ok();
}

/// A key put in the wrong table (`drain_timeout` under `[admin]`, the
/// admin token's `token_env` under `[server]`) was refused with the
/// table's own keys listed, never where the key belongs. The line now
/// names the table(s) that take it; a misspelt key, which no table
/// takes, gets the list as before. Exit 3 either way.
#[test]
fn a_key_in_the_wrong_table_says_where_it_belongs() {
    let dir = std::env::temp_dir().join(format!("clio-relay-wrong-table-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    let check = |from: &str, to: &str| {
        std::fs::write(&config, base.replace(from, to)).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        text(&o)
    };
    let t = check("[admin]\n", "[admin]\ndrain_timeout = \"60s\"\n");
    assert!(
        t.contains(
            "unknown field `drain_timeout` in [admin] (line 13): it is a key of [limits]: \
             move it there; [admin] takes one of `token_env`"
        ),
        "{t}"
    );
    let t = check("[server]\n", "[server]\nmaster_key_env = \"X\"\n");
    assert!(
        t.contains("unknown field `master_key_env` in [server] (line 2): it is a key of [admin]: move it there"),
        "{t}"
    );
    let t = check("shards = 1\n", "shards = 1\nallow_from = []\n");
    assert!(
        t.contains("unknown field `allow_from` in [server] (line 5), expected one of")
            && !t.contains("it is a key of"),
        "{t}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A misspelt key (`listne` in [server]) got the table's keys listed and
/// no more: the line now says which key it probably is, when one is
/// close (an edit or two, by strsim's distance); two or three as close
/// are all said. A key of another table keeps its hint (the test above);
/// when it is also close to one here (`pool` in [tokens], which takes
/// `pools`), the line says both. A key close to none here but to one of
/// another table (`idle_timout` in [server]) is said with its table.
/// Exit 3 each time.
#[test]
fn a_misspelt_key_says_which_key_it_may_be() {
    let dir = std::env::temp_dir().join(format!("clio-relay-misspelt-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    let check = |from: &str, to: &str| {
        std::fs::write(&config, base.replace(from, to)).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        text(&o)
    };
    let t = check("listen = ", "listne = ");
    assert!(
        t.contains(
            "unknown field `listne` in [server] (line 2): did you mean `listen`? \
             [server] takes one of `listen`, `admin_listen`"
        ),
        "{t}"
    );
    let t = check("max_concurrent_streams", "maxconcurrent_streams");
    assert!(
        t.contains(
            "unknown field `maxconcurrent_streams` in account[0] (line 19): did you mean \
             `max_concurrent_streams`?"
        ),
        "{t}"
    );
    // A table's name too.
    let t = check("[upstream]", "[upstrem]");
    assert!(
        t.contains("unknown field `upstrem` in the top level (line 6): did you mean `upstream`?"),
        "{t}"
    );
    // Close to a key here and a key of another table: both said.
    let t = check("[tokens]\n", "[tokens]\npool = [\"default\"]\n");
    assert!(
        t.contains(
            "unknown field `pool` in [tokens] (line 10): did you mean `pools`? (`pool` itself \
             is a key of [[account]]); [tokens] takes one of"
        ),
        "{t}"
    );
    // Two keys as close (idle_timeout, stall_timeout): both said.
    let t = check("[tokens]\n", "[limits]\nll_timeout = \"5s\"\n[tokens]\n");
    assert!(
        t.contains(
            "unknown field `ll_timeout` in [limits] (line 10): did you mean `idle_timeout` or \
             `stall_timeout`? [limits] takes one of"
        ),
        "{t}"
    );
    // Misspelt and in the wrong table: the key, and where it belongs.
    let t = check("shards = 1\n", "shards = 1\nidle_timout = \"30s\"\n");
    assert!(
        t.contains(
            "unknown field `idle_timout` in [server] (line 5): did you mean `idle_timeout` of \
             [limits]? [server] takes one of `listen`"
        ),
        "{t}"
    );
    // Close to a key of two other tables: both.
    let t = check("shards = 1\n", "shards = 1\nca_fil = \"ca.pem\"\n");
    assert!(
        t.contains(
            "unknown field `ca_fil` in [server] (line 5): did you mean `ca_file` of [upstream] \
             or `ca_file` of [cluster]? [server] takes one of"
        ),
        "{t}"
    );
    // Close to nothing anywhere: the table's keys only.
    let t = check("shards = 1\n", "shards = 1\nzzzz = 1\n");
    assert!(
        t.contains("unknown field `zzzz` in [server] (line 5), expected one of")
            && !t.contains("did you mean"),
        "{t}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A value of the wrong type was refused in serde's words, the Rust type
/// that holds the key: `server.shards: invalid type: string "x", expected
/// usize (line 4)`, and "u32", "u64", "f64", "path string", "a sequence",
/// "struct RawServer". An operator does not know them: the line now says
/// what the key takes, still naming the key and its line. Exit 3.
#[test]
fn a_value_of_the_wrong_type_says_what_the_key_takes() {
    let dir = std::env::temp_dir().join(format!("clio-relay-wrong-type-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    for (from, to, said) in [
        (
            "shards = 1\n",
            "shards = \"x\"\n",
            "server.shards: invalid type: string \"x\", expected a whole number (0 or more) (line 4)",
        ),
        (
            "shards = 1\n",
            "shards = 1.5\n",
            "server.shards: invalid type: floating point `1.5`, expected a whole number (0 or more) (line 4)",
        ),
        (
            "shards = 1\n",
            "shards = 1\nmax_streams = -1\n",
            "server.max_streams: invalid value: integer `-1`, expected a whole number from 0 to 4294967295 (line 5)",
        ),
        (
            "max_concurrent_streams = 5\n",
            "max_concurrent_streams = 5\nprice_per_hour = \"0.12\"\n",
            "account[0].price_per_hour: invalid type: string \"0.12\", expected a number (line 20)",
        ),
        (
            "max_concurrent_streams = 5\n",
            "max_concurrent_streams = 5\nenabled = \"yes\"\n",
            "account[0].enabled: invalid type: string \"yes\", expected true or false (line 20)",
        ),
        (
            "max_concurrent_streams = 5\n",
            "max_concurrent_streams = 5\n[alerts]\nerror_min_streams = \"ten\"\n",
            "alerts.error_min_streams: invalid type: string \"ten\", expected a whole number (0 or more) (line 21)",
        ),
        (
            "[admin]\n",
            "[admin]\ntoken_file = 7\n",
            "admin.token_file: invalid type: integer `7`, expected a path in quotes (line 13)",
        ),
        (
            "shards = 1\n",
            "shards = 1\nallow = \"10.0.0.0/8\"\n",
            "server.allow: invalid type: string \"10.0.0.0/8\", expected a list in brackets, such as [\"a\", \"b\"] (line 5)",
        ),
        (
            "shards = 1\n",
            "shards = 1\nallow = [10]\n",
            "server.allow: invalid type: integer `10`, expected a string in quotes (line 5)",
        ),
        (
            "[server]\n",
            "pool = 1\n[server]\n",
            "pool: invalid type: integer `1`, expected [pool.NAME] tables (line 1)",
        ),
    ] {
        std::fs::write(&config, base.replace(from, to)).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{to}: {t}");
        assert!(t.contains(said), "{to}: {t}");
        for rust in ["usize", "u32", "u64", "f64", "path string", "a sequence", "struct Raw"] {
            assert!(!t.contains(rust), "{to}: {rust}: {t}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `[devices]` took its keys through serde's `flatten`, which reads the
/// table as a whole first: a misspelt key in it was "unknown field
/// `max_concurent_streams` in the top level (line 1)", and a wrong value
/// was put on the table before it ("server: invalid value …" on the
/// `[devices]` line). Both now name `[devices]`, the key and its line,
/// as in any other table; exit 3.
#[test]
fn a_mistake_in_devices_names_its_key_and_line() {
    let dir = std::env::temp_dir().join(format!("clio-relay-devices-keys-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    let check = |devices: &str| {
        std::fs::write(&config, format!("{base}\n[devices]\n{devices}")).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        assert_eq!(o.status.code(), Some(3), "{devices}: {}", text(&o));
        text(&o)
    };
    let t = check("max_concurent_streams = 3\n");
    assert!(
        t.contains(
            "unknown field `max_concurent_streams` in [devices] (line 22): did you mean \
             `max_concurrent_streams`?"
        ),
        "{t}"
    );
    let t = check("max_concurrent_streams = 2\nstreams_per_minute = -1\n");
    assert!(
        t.contains(
            "devices.streams_per_minute: invalid value: integer `-1`, expected a whole number \
             from 0 to 4294967295 (line 23)"
        ),
        "{t}"
    );
    let t = check("max_stream_length = 600\n");
    assert!(
        t.contains("devices.max_stream_length: invalid type: integer `600`, expected a duration"),
        "{t}"
    );
    // Written right, the same keys are taken, a tier's too.
    std::fs::write(
        &config,
        format!(
            "{base}\n[devices]\nmax_concurrent_streams = 2\nmax_stream_length = \"10m\"\n\
             [devices.tier.pro]\nmax_concurrent_streams = 4\n"
        ),
    )
    .unwrap();
    let o = run_env(&["check-config", "--config", &config]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    std::fs::remove_dir_all(&dir).ok();
}

/// A `[cluster] redis_url` the Redis client cannot use (a port past
/// 65535, a database that is not a number, a broken IPv6 address) is a
/// configuration mistake: `check-config` names it, and `run` exits 3,
/// which systemd does not restart on, instead of 1 every 2 s. The URL
/// itself is not echoed.
#[test]
fn a_redis_url_the_client_cannot_use_is_a_config_error() {
    let dir = std::env::temp_dir().join(format!("clio-relay-redis-url-{}", std::process::id()));
    for url in [
        "redis://10.0.0.5:99999/0",
        "redis://10.0.0.5:6379/zero",
        "redis://[::1:6379/0",
    ] {
        for cmd in ["check-config", "run"] {
            let o = with_redis_url(&dir, cmd, url);
            assert_eq!(o.status.code(), Some(3), "{cmd} {url}: {}", text(&o));
            assert!(
                text(&o).contains("cluster.redis_url"),
                "{cmd} {url}: {}",
                text(&o)
            );
            assert!(!text(&o).contains(url), "{cmd} {url}: {}", text(&o));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A config file that is not there is named once, with why it cannot be
/// read, by `check-config` and by `run`.
#[test]
fn a_missing_config_file_is_named_once() {
    let path = "/definitely/not/here/relay.toml";
    // `keys` and `mint-token` said only "cannot read the config file: No
    // such file or directory", naming no file.
    for args in [
        &["check-config"][..],
        &["run"],
        &["keys", "list"],
        &["mint-token", "--device", "phone-1"],
    ] {
        let sub = args[0];
        let mut args = args.to_vec();
        args.splice(1..1, ["--config", path]);
        let o = run(RELAY, &args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{sub}: {t}");
        assert_eq!(t.matches(path).count(), 1, "{sub}: {t}");
        assert!(
            t.contains("cannot read the config file: No such file"),
            "{sub}: {t}"
        );
    }
}

/// A listen address the host does not have: the start names it and says
/// so, with exit 1 (a port in use is 4).
#[test]
fn a_listen_address_of_another_host_is_named() {
    let dir = std::env::temp_dir().join(format!("clio-relay-other-host-{}", std::process::id()));
    // 192.0.2.0/24 is TEST-NET-1, never a local address.
    let config = relay_config(&dir, "192.0.2.1:18080", "127.0.0.1:0");
    let o = run_env(&["run", "--config", &config]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("server.listen 192.0.2.1:18080: Cannot assign requested address")
            && text(&o).contains("not an address of this host"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A locked-memory limit under glommio's minimum (64 KiB was Docker's
/// default for years) stopped the start with "shard thread ended before
/// listening" (`run`) or "fake-soniox shard died while starting" (`demo`):
/// no cause, nothing to change. Both now name the limit, its value, what
/// the relay needs and where to raise it, and exit 1.
#[test]
fn a_locked_memory_limit_too_low_names_it_and_how_to_raise_it() {
    let dir = std::env::temp_dir().join(format!("clio-relay-memlock-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    for args in [vec!["run", "--config", config.as_str()], vec!["demo"]] {
        let o = Command::new("sh")
            .args(["-c", "ulimit -l 64 && exec \"$0\" \"$@\""])
            .arg(RELAY)
            .args(&args)
            .envs(RELAY_ENV)
            .output()
            .unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
        assert!(
            t.contains("io_uring could not be set up")
                && t.contains("(`ulimit -l`) is 64 KiB: glommio needs at least 512 KiB")
                && t.contains("LimitMEMLOCK=256M"),
            "{args:?}: {t}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The locked-memory limit was said to need about 192 KiB a shard (and
/// the shipped unit's `LimitMEMLOCK=64M` to cover 64 shards), but a kernel
/// that counts io_uring's rings against it (6.18 here) takes about 1.7 MiB
/// a shard: under the common 8 MiB default, 8 shards failed in a shard's
/// thread after glommio's WARN "registering buffers in the main ring.
/// Skipping", with figures (9 x 192 KiB, under 2 MiB) that said the limit
/// was enough. The start now counts what the shards need before any
/// executor starts, says it, and exits 1; 4 shards, which fit, start.
/// Run as a user without CAP_IPC_LOCK (uid 65534 when the test is root),
/// as the shipped unit's dynamic user is; on a kernel that counts only the
/// buffers, 8 shards fit in 8 MiB and start, and that is all it checks.
#[test]
fn a_locked_memory_limit_too_low_for_the_shards_says_what_they_need() {
    let Some(root) = another_user() else { return };
    let dir =
        std::env::temp_dir().join(format!("clio-relay-memlock-shards-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let text_of = |shards: &str| {
        let cfg = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            cfg.replace("shards = 1\n", &format!("shards = {shards}\n")),
        )
        .unwrap();
        let started = std::env::temp_dir().join(format!(
            "clio-relay-memlock-shards-{}-{shards}.log",
            std::process::id()
        ));
        // Started in the background and stopped once it listens (or
        // has ended): its output goes to a file the test reads.
        let script = format!(
            "ulimit -l 8192 && {drop} \"$0\" run --config \"$1\" >\"$2\" 2>&1 & pid=$!; \
             for i in $(seq 600); do grep -q 'clio-relay listening' \"$2\" && break; \
             kill -0 $pid 2>/dev/null || break; sleep 0.1; done; \
             kill $pid 2>/dev/null; wait $pid; echo \"exit=$?\" >>\"$2\"",
            drop = if root {
                "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all"
            } else {
                ""
            },
        );
        let o = Command::new("sh")
            .args(["-c", &script])
            .arg(RELAY)
            .arg(&config)
            .arg(&started)
            .envs(RELAY_ENV)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let t = std::fs::read_to_string(&started).unwrap();
        std::fs::remove_file(&started).ok();
        std::fs::write(&config, cfg).unwrap();
        t
    };
    let four = text_of("4");
    assert!(
        four.contains("clio-relay listening"),
        "4 shards in 8 MiB: {four}"
    );
    let eight = text_of("8");
    if eight.contains("clio-relay listening") {
        eprintln!("this kernel does not count io_uring's rings as locked memory: not checked");
    } else {
        assert!(eight.contains("exit=1"), "{eight}");
        assert!(
            eight.contains("8 shards need about 13.8 MiB")
                && eight.contains("(`ulimit -l`) is 8192 KiB")
                && eight.contains("LimitMEMLOCK=256M")
                && !eight.contains("registering buffers")
                && !eight.contains("thread did not start"),
            "{eight}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// An open-file limit too low for the shards themselves (each has its
/// rings, event fds and listener before any stream: a container's 1024 and
/// `shards = 0` on a host of 128 CPUs) stopped the start with the bare
/// "Too many open files (os error 24)": no limit, nothing to change. It
/// now names the limit, what the shards take and how to raise it, exit 1.
#[test]
fn an_open_file_limit_too_low_for_the_shards_names_it() {
    let dir = std::env::temp_dir().join(format!("clio-relay-nofile-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let cfg = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, cfg.replace("shards = 1\n", "shards = 8\n")).unwrap();
    let o = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\""])
        .arg(RELAY)
        .args(["run", "--config", config.as_str()])
        .envs(RELAY_ENV)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("Too many open files")
            && t.contains("the open-file limit (`ulimit -n`) is 64")
            && t.contains("8 shards")
            && t.contains("LimitNOFILE="),
        "{t}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A host that will not let the relay start its threads (a pids limit:
/// systemd's `TasksMax=`, a container's `--pids-limit`, `ulimit -u`)
/// stopped the start with the bare "Resource temporarily unavailable (os
/// error 11)", and, a little higher, after "clio-relay listening" (and
/// READY=1) when the watchdog's thread was refused; when the thread
/// refused was an executor's blocking pool's, glommio panicked ("failed
/// to spawn thread") and the start said only "thread panicked". Each now
/// names the limit and what the relay needs, exit 1, without a panic. Run as uid 65533 (the limit
/// counts a user's threads; not 65534, whose locked memory another test
/// counts), so only when the test runs as root.
#[test]
fn a_thread_limit_names_itself_and_what_the_shards_need() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("not checked: needs root and setpriv, to run as a user of its own");
        return;
    }
    let dir = std::env::temp_dir().join(format!("clio-relay-nproc-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let cfg = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, cfg.replace("shards = 1\n", "shards = 2\n")).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    // 2 shards: 2 threads each (the executor's and its blocking pool's),
    // the admin thread's 2, the main thread and the log's, 8 in all; the
    // 9th is the watchdog's. Each limit under it refuses another thread.
    for threads in 3u64..=8 {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65533", "--regid=65533", "--clear-groups", RELAY])
            .args(["run", "--config", config.as_str()])
            .envs(RELAY_ENV);
        // SAFETY: between fork and exec only setrlimit, a system call.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: threads,
                    rlim_max: threads,
                };
                if libc::setrlimit(libc::RLIMIT_NPROC, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let o = cmd.output().unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "ulimit -u {threads}: {t}");
        assert!(!t.contains("panicked"), "ulimit -u {threads}: {t}");
        assert!(
            t.contains("Resource temporarily unavailable")
                && t.contains("a thread could not be started")
                && t.contains("TasksMax=")
                && t.contains("2 shards"),
            "ulimit -u {threads}: {t}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A relay that runs with every thread its limit allows takes a SIGHUP on
/// its main thread when the reload's own thread is refused, and runs on;
/// so does a SIGTERM's drain, which then ends as a drain does (exit 0).
/// Before, the refused thread ended the relay (exit 1): a reload under
/// `TasksMax=` cut every stream, and so did a stop, undrained.
#[test]
fn a_reload_under_a_thread_limit_stops_no_relay() {
    use std::io::{BufRead, BufReader};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("not checked: needs root and setpriv, to run as a user of its own");
        return;
    }
    let dir = std::env::temp_dir().join(format!("clio-relay-nproc-hup-{}", std::process::id()));
    let admin = free_port();
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    // 1 shard: 2 threads, the admin thread's 2, the main thread, the
    // log's and the watchdog's: 7, all the limit allows.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65533", "--regid=65533", "--clear-groups", RELAY])
        .args(["run", "--config", config.as_str()])
        .envs(RELAY_ENV)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only setrlimit, a system call.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 7,
                    rlim_max: 7,
                };
                if libc::setrlimit(libc::RLIMIT_NPROC, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut wait_for = |what: &str, seen: &mut Vec<String>| loop {
        match log.next() {
            Some(Ok(line)) => {
                let found = line.contains(what);
                seen.push(line);
                if found {
                    return;
                }
            }
            _ => panic!("no {what:?} in the log: {seen:#?}"),
        }
    };
    wait_for("clio-relay listening", &mut seen);
    wait_listening(admin, &mut child);
    // SAFETY: a signal to the relay this test started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    wait_for("reloading on the main thread", &mut seen);
    wait_for("SIGHUP: ", &mut seen);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the relay ended: {seen:#?}"
    );
    assert!(std::net::TcpStream::connect(admin).is_ok());
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    wait_for("draining on the main thread", &mut seen);
    wait_for("drained", &mut seen);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {seen:#?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A memory cgroup of its own for a child, limited to `bytes` (cgroup v2,
/// or v1's memory controller), or `None`, said, when this test may not
/// make one (not root, no writable hierarchy).
fn memory_cgroup(bytes: u64) -> Option<std::path::PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not checked: needs root to make a memory cgroup");
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let name = format!("clio-relay-memcg-{}", std::process::id());
    let (dir, limit_file) = if let Some(path) = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    }) {
        (
            std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')),
            "memory.limit_in_bytes",
        )
    } else {
        let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        (
            std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')),
            "memory.max",
        )
    };
    static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = dir.join(format!("{name}-{made}"));
    if std::fs::create_dir(&dir).is_err()
        || std::fs::write(dir.join(limit_file), bytes.to_string()).is_err()
    {
        eprintln!(
            "not checked: no memory cgroup could be made at {}",
            dir.display()
        );
        let _ = std::fs::remove_dir(&dir);
        return None;
    }
    Some(dir)
}

/// Under a memory cgroup too small for the shards' rings (a container's or
/// a pod's memory limit), run by root (CAP_IPC_LOCK: the locked-memory
/// limit does not apply), a shard's ring failed with ENOMEM and the start
/// said the locked-memory limit was 8192 KiB and to raise LimitMEMLOCK,
/// which changes nothing; the memory cgroup came last, after "with a
/// limit that high". It now says the limit does not bind this process
/// and names the memory limit to raise, exit 1. The binary's pages count
/// in the cgroup that first reads them, so a first run after a build may
/// be killed by the cgroup's OOM killer before a ring is refused: it is
/// run again (its pages then count elsewhere), in a new cgroup.
#[test]
fn rings_a_memory_cgroup_cannot_hold_name_the_memory_limit() {
    let dir = std::env::temp_dir().join(format!("clio-relay-memcg-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let cfg = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, cfg.replace("shards = 1\n", "shards = 16\n")).unwrap();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let Some(cgroup) = memory_cgroup(24 << 20) else {
            std::fs::remove_dir_all(&dir).ok();
            return;
        };
        let o = Command::new("sh")
            .args([
                "-c",
                "echo $$ > \"$1\"/cgroup.procs && exec \"$0\" run --config \"$2\"",
            ])
            .arg(RELAY)
            .arg(&cgroup)
            .arg(&config)
            .envs(RELAY_ENV)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir(&cgroup);
        // Killed by a signal: the cgroup's OOM killer, on a first run.
        let killed = o.status.code().is_none();
        runs.push(o);
        if !killed {
            break;
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    let o = runs.last().unwrap();
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("Cannot allocate memory")
            && t.contains("does not bind this process")
            && t.contains("MemoryMax=")
            && !t.contains("LimitMEMLOCK="),
        "{t}"
    );
}

/// A filter that makes the system calls whose numbers are in `calls` (the
/// `io_uring_*` calls, `sched_setaffinity`) fail with `errno`, as a
/// container's seccomp profile does
/// (Docker's default answers EPERM; runc answers ENOSYS for calls its
/// profile does not know), installed between fork and exec: the relay
/// and every thread it starts run under it.
fn refuse_calls(cmd: &mut Command, calls: &'static [libc::c_long], errno: u16) {
    use std::os::unix::process::CommandExt;
    // Classic BPF on `struct seccomp_data`: load the call's number (offset
    // 0), return SECCOMP_RET_ERRNO | errno for those in `calls`, else
    // SECCOMP_RET_ALLOW. The architecture is not looked at: the test's
    // own binary makes the calls, with the numbers `libc` gives it.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut prog = vec![op(LD_W_ABS, 0, 0, 0)];
    for (i, &nr) in calls.iter().enumerate() {
        // On a match, jump over the remaining tests and the ALLOW.
        let to_deny = (calls.len() - i) as u8;
        prog.push(op(JEQ_K, to_deny, 0, nr as u32));
    }
    prog.push(op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW));
    prog.push(op(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | u32::from(errno)));
    // SAFETY: between fork and exec only prctl, a system call, on `prog`,
    // which the closure owns and which outlives both calls.
    unsafe {
        cmd.pre_exec(move || {
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A host that refuses io_uring (Docker's default seccomp profile, a
/// runtime's profile that does not know it, `kernel.io_uring_disabled`)
/// made glommio panic in a shard's thread ("your kernel witnessed Romulus
/// killing Remus (too old!! kernel should be at least 5.8)") and the start
/// end with "the shard thread did not start: Executor builder error:
/// thread panicked": a panic, a wrong cause, nothing to change. The start
/// now tries io_uring's three calls before any thread, names the refusal
/// and the settings that make it, and exits 1, without a panic; so does
/// `demo`.
#[test]
fn io_uring_refused_by_the_host_names_the_cause_and_the_fix() {
    let dir = std::env::temp_dir().join(format!("clio-relay-no-uring-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let all: &'static [libc::c_long] = &[
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    let register: &'static [libc::c_long] = &[libc::SYS_io_uring_register];
    let refused = [
        "io_uring is not allowed here",
        "seccomp",
        "io_uring_disabled",
    ];
    let cases: [(&[libc::c_long], i32, [&str; 3]); 3] = [
        // Docker's default profile, and io_uring_disabled.
        (all, libc::EPERM, refused),
        // A profile that refuses only some of the calls.
        (register, libc::EPERM, refused),
        // runc's answer to a call its profile does not know, on a kernel
        // that has io_uring: not only "too old".
        (
            all,
            libc::ENOSYS,
            ["Function not implemented", "seccomp", "Linux 6.1"],
        ),
    ];
    for (calls, errno, says) in cases {
        for args in [vec!["run", "--config", config.as_str()], vec!["demo"]] {
            let mut cmd = Command::new(RELAY);
            cmd.args(&args).envs(RELAY_ENV).env("RUST_BACKTRACE", "0");
            refuse_calls(&mut cmd, calls, errno as u16);
            let o = cmd.output().unwrap();
            let t = text(&o);
            let case = format!("{args:?}, errno {errno}, {calls:?}");
            assert_eq!(o.status.code(), Some(1), "{case}: {t}");
            assert!(!t.contains("panicked"), "{case}: {t}");
            assert!(says.iter().all(|s| t.contains(s)), "{case}: {t}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A host that refuses `sched_setaffinity` (a seccomp profile without
/// it) made glommio panic in each pinned shard's blocking-pool thread
/// ("failed to bind blocking thread") and the start end with "the shard
/// thread did not start: permission denied": a relay that would run
/// unpinned did not run. The shards now run unpinned, said once at WARN.
#[test]
fn a_host_that_refuses_pinning_runs_the_shards_unpinned() {
    let dir = std::env::temp_dir().join(format!("clio-relay-no-pin-{}", std::process::id()));
    let admin = free_port();
    // As many shards as the CPUs it may run on, so they would be pinned.
    let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let cpus = (0..nix::sched::CpuSet::count())
        .filter(|&c| cpus.is_set(c).unwrap())
        .count();
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    let cfg = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        cfg.replace(
            "shards = 1
",
            &format!(
                "shards = {cpus}
"
            ),
        ),
    )
    .unwrap();
    let log = dir.join("stderr");
    let mut cmd = relay_run(&config);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    refuse_calls(&mut cmd, &[libc::SYS_sched_setaffinity], libc::EPERM as u16);
    let mut child = cmd.spawn().unwrap();
    let exited = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(admin).is_ok() {
                break None;
            }
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            assert!(std::time::Instant::now() < deadline, "relay never listened");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let t = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(exited, None, "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(
        t.contains("shards not pinned") && t.contains("sched_setaffinity"),
        "{t}"
    );
}

/// Whether the test runs as root (`Some(true)`: the files' checks then
/// run as uid 65534 through `setpriv`) or as another user (`Some(false)`:
/// its own files are made unreadable by mode); `None`, said, when it is
/// root without `setpriv` to drop to another user.
fn another_user() -> Option<bool> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: running as root without setpriv (util-linux) to drop to another user");
        return None;
    }
    Some(root)
}

/// `clio-relay check-config --config CONFIG` as [`another_user`] says.
fn check_config_as_another_user(root: bool, config: &str) -> std::process::Output {
    let mut c = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", RELAY]);
        c
    } else {
        Command::new(RELAY)
    };
    c.args(["check-config", "--config", config])
        .envs(RELAY_ENV)
        .output()
        .unwrap()
}

/// A secret file the relay's user may not read was refused with the
/// bare `Permission denied (os error 13)`. `check-config` run as root
/// reads any file, while the shipped unit runs the relay as a dynamic
/// user, so the start failed on a file the check had taken, and the
/// journal said nothing of whom the relay runs as or what to do. The
/// line now names the relay's uid, the file's owner and mode, and the
/// credential that fixes it. Run as a user other than the file's owner
/// (uid 65534 through `setpriv` when the test runs as root).
#[test]
fn a_secret_file_the_relays_user_may_not_read_says_whose_it_is_and_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let Some(root) = another_user() else { return };
    let dir = std::env::temp_dir().join(format!("clio-relay-unreadable-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let key = dir.join("soniox-01");
    std::fs::write(&key, "cli-unreadable-soniox-key\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text_of = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_of.replace("key_env = \"CLI_EXIT_KEY\"", "key_file = \"soniox-01\""),
    )
    .unwrap();
    // The directory and the config readable by the user the check runs as.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    if !root {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let o = check_config_as_another_user(root, &config);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(3), "{t}");
    let uid = if root {
        65534
    } else {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    };
    let mode = if root { "0600" } else { "0000" };
    // SAFETY: as above.
    let owner = unsafe { libc::geteuid() };
    let line = t
        .lines()
        .find(|l| l.contains("key_file") && l.contains("Permission denied"))
        .unwrap_or_else(|| panic!("no line for the key file: {t}"));
    for part in [
        format!("the relay runs as uid {uid} and may not read it"),
        format!("the file is uid {owner}'s with mode {mode}"),
        format!("`LoadCredential=soniox-01:{}`", key.display()),
        "key_file = \"/run/credentials/clio-relay.service/soniox-01\"".to_string(),
    ] {
        assert!(line.contains(&part), "{part:?} not in: {line}");
    }
    assert!(!t.contains("cli-unreadable-soniox-key"), "{t}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The same for a file in `/run/credentials/`, which is a credential
/// already: the previous line told the operator who ran `mint-token` or
/// `keys` as another user than root to load it as a credential, which it
/// is. It now says that systemd's copies are the service's user's and
/// root's alone, so run the command as root. Made in a mount namespace
/// of its own (`unshare -m`, a tmpfs on `/run`), as systemd makes the
/// directory; only as root (to make it, then drop to uid 65534).
#[test]
fn a_credential_another_user_may_not_read_says_to_run_as_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root (a /run/credentials/ directory cannot be made)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("clio-relay-cred-perm-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let creds = "/run/credentials/clio-relay.service";
    let text_of = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_of.replace(
            "secret_env = \"CLI_EXIT_SECRET\"",
            &format!("secret_file = \"{creds}/token-secret\""),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = format!(
        "{{ mount -t tmpfs tmpfs /run && mkdir -p {creds} \
           && echo cli-cred-perm-secret-0123456789abcdef > {creds}/token-secret \
           && chmod 0400 {creds}/token-secret && chmod 0500 {creds}; }} || exit 99\n\
         exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$0\" mint-token --config \"$1\" --device d1"
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script, RELAY, &config])
        .envs(RELAY_ENV)
        .output();
    let out = match out {
        Ok(o) if o.status.code() == Some(99) => {
            eprintln!("skipped: no private /run here: {}", text(&o));
            return;
        }
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: unshare not runnable ({e})");
            return;
        }
    };
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    let line = t
        .lines()
        .find(|l| {
            l.contains(&format!(
                "secret_file {creds}/token-secret: Permission denied"
            ))
        })
        .unwrap_or_else(|| panic!("no line for the credential: {t}"));
    assert!(
        line.contains("this runs as uid 65534, which may not read it")
            && line.contains("so run this as root"),
        "{line}"
    );
    assert!(!line.contains("LoadCredential="), "{line}");
    assert!(!t.contains("cli-cred-perm-secret"), "{t}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The same for `[tls]`'s files: a certificate chain or key the relay's
/// user may not read (certbot's `/etc/letsencrypt/live/` is root's
/// alone, and the shipped unit's dynamic user reads no root-only file)
/// said only `Permission denied (os error 13)`; each line now says whose
/// the file is and what to do: the chain, no secret, readable by every
/// user; the key, as for a secret file, a credential. The chain is read
/// first, so each file is made unreadable in a run of its own.
#[test]
fn a_tls_file_the_relays_user_may_not_read_says_whose_it_is_and_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let Some(root) = another_user() else { return };
    let dir =
        std::env::temp_dir().join(format!("clio-relay-unreadable-tls-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let text_of = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text_of}\n[tls]\ncert_file = \"fullchain.pem\"\nkey_file = \"privkey.pem\"\n"),
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("fullchain.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("privkey.pem"), key.serialize_pem()).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let closed = if root { 0o600 } else { 0o000 };
    for (key, file, other) in [
        ("cert_file", "fullchain.pem", "privkey.pem"),
        ("key_file", "privkey.pem", "fullchain.pem"),
    ] {
        let mode = |f: &str, m: u32| {
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode(file, closed);
        mode(other, 0o644);
        let o = check_config_as_another_user(root, &config);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{t}");
        let line = t
            .lines()
            .find(|l| l.contains(&format!("tls.{key}")) && l.contains("Permission denied"))
            .unwrap_or_else(|| panic!("no line for tls.{key}: {t}"));
        let parts = if key == "cert_file" {
            vec![
                "may not read it (the file is uid ".to_string(),
                "a certificate chain is no secret, so make it readable by every user".to_string(),
            ]
        } else {
            vec![
                "may not read it (the file is uid ".to_string(),
                format!("`LoadCredential={file}:{}`", dir.join(file).display()),
                format!("{key} = \"/run/credentials/clio-relay.service/{file}\""),
                "a new one takes a restart, not a reload".to_string(),
            ]
        };
        for part in parts {
            assert!(line.contains(&part), "{part:?} not in: {line}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A mistake on a table header was put on the table before it: `[account]`
/// written for `[[account]]` (after `[admin]`) said `admin: invalid
/// type: map, expected a list in brackets, such as ["a", "b"]`, and a
/// `[tokens]` given twice `admin: … duplicate key `tokens``, sending the
/// operator to the wrong table. `[tokens.extr]` said `extr` was unknown
/// in the top level, listing [tokens]'s keys as the top level's. Each
/// now names the table the header opens (or, for an unknown name, the
/// table it is a key of), and `[account]` says `[[account]]` tables.
#[test]
fn a_mistake_on_a_table_header_names_that_table() {
    let dir = std::env::temp_dir().join(format!("clio-relay-header-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    assert!(base.contains("[[account]]\n") && base.contains("[admin]\n"));
    let check = |file: String| {
        std::fs::write(&config, file).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        text(&o)
    };
    let line_of = |text: &str, header: &str| {
        text.lines()
            .position(|l| l == header)
            .expect("header in the file")
            + 1
    };
    let single = base.replace("[[account]]\n", "[account]\n");
    let n = line_of(&single, "[account]");
    let t = check(single);
    assert!(
        t.contains(&format!(
            "account: invalid type: map, expected [[account]] tables (line {n})"
        )) && !t.contains("admin:"),
        "{t}"
    );
    let extra = format!("{base}\n[tokens.extra]\nsecret_env = \"X\"\npools = [\"dev\"]\n");
    let n = line_of(&extra, "[tokens.extra]");
    let t = check(extra);
    assert!(
        t.contains(&format!(
            "tokens.extra: invalid type: map, expected [[tokens.extra]] tables (line {n})"
        )),
        "{t}"
    );
    let twice = format!("{base}\n[tokens]\nmax_ttl = \"1h\"\n");
    let n = twice
        .lines()
        .collect::<Vec<_>>()
        .iter()
        .rposition(|l| *l == "[tokens]")
        .unwrap()
        + 1;
    let t = check(twice);
    assert!(
        t.contains("tokens: invalid table header")
            && t.contains("duplicate key `tokens`")
            && t.contains(&format!("(line {n})"))
            && !t.contains("account[0]:"),
        "{t}"
    );
    let t = check(format!("{base}\n[tokens.extr]\nsecret_env = \"X\"\n"));
    assert!(
        t.contains("unknown field `extr` in [tokens]")
            && t.contains("did you mean `extra`? [tokens] takes one of `secret_env`"),
        "{t}"
    );
    let t = check(format!(
        "{base}\n[devices.tiers.pro]\nmax_concurrent_streams = 3\n"
    ));
    assert!(
        t.contains("unknown field `tiers` in [devices]") && t.contains("did you mean `tier`?"),
        "{t}"
    );
    // The other way round: `[[pool.eu]]` for `[pool.eu]` was "invalid
    // type: map, expected a string in quotes" (serde reading the list as
    // the table's fields in order); it now says which brackets to write.
    let listed = format!("{base}\n[[pool.eu]]\nurl = \"ws://127.0.0.1:9/x\"\n");
    let n = line_of(&listed, "[[pool.eu]]");
    let t = check(listed);
    assert!(
        t.contains(&format!(
            "pool.eu: [[pool.eu]] makes a list of tables, and pool.eu is one table: \
             write [pool.eu] (line {n})"
        )),
        "{t}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_unset_key_variable_says_what_to_do_once() {
    // `key_env X is not set` alone left a new operator to guess: that the
    // variable is the relay's own environment's, and that under the
    // shipped unit a secret comes in as a credential and a `*_file`.
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-unset-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    for cmd in ["check-config", "run"] {
        let o = relay_run_args(&[cmd, "--config", &config])
            .env_remove("CLI_EXIT_KEY")
            .env_remove("CLI_EXIT_ADMIN")
            .output()
            .unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{cmd}: {t}");
        assert!(t.contains("key_env CLI_EXIT_KEY is not set"), "{cmd}: {t}");
        assert!(
            t.contains("token_env CLI_EXIT_ADMIN is not set"),
            "{cmd}: {t}"
        );
        // Said once however many variables are missing, after them.
        assert_eq!(t.matches("export it in the shell").count(), 1, "{cmd}: {t}");
        assert!(
            t.contains("LoadCredential=") && t.contains("*_file"),
            "{cmd}: {t}"
        );
    }
    // A file with every variable set says nothing of the kind.
    let o = run_env(&["check-config", "--config", &config]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("export it"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
