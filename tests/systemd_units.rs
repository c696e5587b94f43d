//! The systemd units and the installer: `systemd-analyze verify` and
//! `systemd-analyze security` on the units (skipped, with the reason
//! printed, where systemd-analyze cannot run), the sockets' names against
//! what `clio_relay::cli::systemd` looks for, `tools/install.sh` staged into a
//! directory, its config accepted by `clio-relay check-config`, and the
//! relay's defaults under the `/proc` the service unit leaves it.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 3] = [
    "clio-relay.service",
    "clio-relay.socket",
    "clio-relay-admin.socket",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(repo().join("systemd").join(name)).unwrap()
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clio-relay-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The units in a temp dir of their own for the test `tag` names,
/// ExecStart pointing at the binary cargo built (verify checks the command
/// exists). (Both tests staged them in one dir, which each emptied first:
/// one that started late removed the units the other was verifying.)
fn staged_units(tag: &str) -> PathBuf {
    let d = temp_dir(tag);
    for u in UNITS {
        let text = unit(u).replace(
            "/usr/local/bin/clio-relay",
            env!("CARGO_BIN_EXE_clio-relay"),
        );
        std::fs::write(d.join(u), text).unwrap();
    }
    d
}

/// `systemd-analyze` if it runs here, else why not.
fn systemd_analyze() -> Result<(), String> {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "systemd-analyze --version failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!(
            "systemd-analyze not runnable ({e}); install the systemd package"
        )),
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if let Err(why) = systemd_analyze() {
        println!("SKIPPED units_pass_systemd_analyze_verify: {why}");
        return;
    }
    let d = staged_units("units-verify");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(UNITS.iter().map(|u| d.join(u)))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Other units on the host may draw warnings; ours must draw none.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("clio-relay"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns:\n{}",
        ours.join("\n")
    );
}

#[test]
fn service_exposure_is_at_most_2() {
    if let Err(why) = systemd_analyze() {
        println!("SKIPPED service_exposure_is_at_most_2: {why}");
        return;
    }
    let d = staged_units("units-security");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(d.join("clio-relay.service"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
    else {
        println!(
            "SKIPPED service_exposure_is_at_most_2: no exposure figure (systemd older than 250?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return;
    };
    let figure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"));
    println!("{}", line.trim());
    assert!(figure <= 2.0, "exposure {figure} > 2.0:\n{stdout}");
    // The figure written in the unit and the README is the one measured.
    let written = format!("exposure {figure:.1}");
    assert!(
        unit("clio-relay.service").contains(&written),
        "unit should say {written:?}"
    );
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("**{figure:.1} (OK)**")),
        "README should say {figure:.1}"
    );
}

#[test]
fn units_say_what_the_relay_expects() {
    let service = unit("clio-relay.service");
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=clio-relay",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        // A bad config (3) or a port another process holds (4): a restart
        // every 2 s fixes neither.
        "RestartPreventExitStatus=3 4",
        // Key dates, revocations and token times go by the wall clock:
        // started at boot before it is set (a host with no real-time
        // clock reads 1970), the relay dates its keys 1970, for good.
        "After=time-sync.target",
    ] {
        assert!(service.lines().any(|l| l == line), "service lacks {line:?}");
    }
    assert!(service.contains("WatchdogSec="));
    // The drain the comment describes is the relay's default, and the stop
    // timeout covers it plus the finalize.
    let drain = clio_relay::core::config::LimitsConfig::default()
        .drain_timeout
        .as_secs();
    assert!(
        service.contains(&format!("(limits.drain_timeout, default {drain} s)")),
        "the unit's comment should give the default drain of {drain} s"
    );
    let stop: u64 = service
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec=Ns");
    // What a stop takes past the drain deadline, as check-config counts
    // it: the comment gives the same number, and the timeout covers it.
    let after = clio_relay::core::config::STOP_AFTER_DRAIN.as_secs();
    assert!(
        service.contains(&format!("up to {after} s after the")),
        "the unit's comment should say a stop takes up to {after} s past the drain deadline"
    );
    assert!(stop > drain + after, "TimeoutStopSec={stop}s");
    // check-config warns about a longer drain against this number.
    assert_eq!(
        stop,
        clio_relay::core::config::UNIT_STOP_TIMEOUT.as_secs(),
        "UNIT_STOP_TIMEOUT is the unit's TimeoutStopSec"
    );
    assert!(service.contains("LoadCredential="));
    let client = unit("clio-relay.socket");
    let admin = unit("clio-relay-admin.socket");
    assert!(client.contains(&format!(
        "FileDescriptorName={}\n",
        clio_relay::cli::systemd::CLIENT_FD_NAME
    )));
    assert!(admin.contains(&format!(
        "FileDescriptorName={}\n",
        clio_relay::cli::systemd::ADMIN_FD_NAME
    )));
    assert!(client.contains("ReusePort=yes"));
    for s in [&client, &admin] {
        assert!(s.contains("Service=clio-relay.service"));
    }
    // The socket addresses are the example config's.
    let example = std::fs::read_to_string(repo().join("config/example.toml")).unwrap();
    assert!(
        example.contains(r#"listen = "0.0.0.0:8080""#)
            && client.contains("ListenStream=0.0.0.0:8080")
    );
    assert!(
        example.contains(r#"admin_listen = "127.0.0.1:9464""#)
            && admin.contains("ListenStream=127.0.0.1:9464")
    );
}

#[test]
fn install_sh_stages_a_working_layout() {
    let root = temp_dir("install");
    let out = Command::new("sh")
        .arg(repo().join("tools/install.sh"))
        .arg(env!("CARGO_BIN_EXE_clio-relay"))
        .env("DESTDIR", &root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "install.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("missing: token-secret admin-token master-key soniox-01"),
        "{stdout}"
    );
    // Secrets made on each host of a fleet one by one would differ.
    assert!(
        stdout.contains("token-secret and master-key must be the\n   same on every node"),
        "{stdout}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root.join("usr/local/bin/clio-relay")), 0o755);
    assert_eq!(mode(&root.join("etc/clio-relay/credentials")), 0o700);
    for u in UNITS {
        assert_eq!(
            std::fs::read_to_string(root.join("etc/systemd/system").join(u)).unwrap(),
            unit(u)
        );
    }
    // The generated config reads every secret from a credential the unit loads.
    let conf = root.join("etc/clio-relay/clio-relay.toml");
    let text = std::fs::read_to_string(&conf).unwrap();
    let creds = "/run/credentials/clio-relay.service/";
    let service = unit("clio-relay.service");
    let mut used = 0;
    for l in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        assert!(!l.contains("_env"), "secret from the environment: {l}");
        if let Some(i) = l.find(creds) {
            let name: String = l[i + creds.len()..]
                .chars()
                .take_while(|c| *c != '"')
                .collect();
            assert!(
                service.contains(&format!(
                    "LoadCredential={name}:/etc/clio-relay/credentials/{name}\n"
                )),
                "no LoadCredential for {name}"
            );
            used += 1;
        }
    }
    assert_eq!(used, 4, "{text}");
    // Its own comments point at the installed file, not the example's
    // path in a checkout (which is not on the host).
    assert!(
        text.contains("clio-relay check-config --config /etc/clio-relay/clio-relay.toml"),
        "{text}"
    );
    assert!(!text.contains("--config config/example.toml"), "{text}");
    // The optional sections it leaves out are installed beside README,
    // and it says where.
    let doc_example = root.join("usr/local/share/doc/clio-relay/example.toml");
    assert_eq!(
        std::fs::read_to_string(&doc_example).unwrap(),
        std::fs::read_to_string(repo().join("config/example.toml")).unwrap()
    );
    assert!(
        text.contains("are in /usr/local/share/doc/clio-relay/example.toml"),
        "{text}"
    );
    // With the credentials in place, check-config accepts it.
    let cred_dir = temp_dir("creds");
    std::fs::write(
        cred_dir.join("token-secret"),
        "0123456789abcdef0123456789abcdef0123\n",
    )
    .unwrap();
    std::fs::write(cred_dir.join("admin-token"), "admin-token-0123456789\n").unwrap();
    std::fs::write(cred_dir.join("soniox-01"), "soniox-test-key-01\n").unwrap();
    std::fs::write(
        cred_dir.join("master-key"),
        format!("{}\n", "5a".repeat(32)),
    )
    .unwrap();
    let local = cred_dir.join("clio-relay.toml");
    std::fs::write(
        &local,
        text.replace(creds, &format!("{}/", cred_dir.display())),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args(["check-config", "--config"])
        .arg(&local)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config refused the installed config:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Runtime key changes persist: the master key is set, so check-config
    // has no warning (it warns when the admin API is on without one).
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("configuration is valid"), "{summary}");
    assert!(!summary.contains("admin.master_key"), "{summary}");
    assert!(
        text.contains("state_dir = \"/var/lib/clio-relay\""),
        "{text}"
    );
    assert!(service.contains("StateDirectory=clio-relay\n"));
    // A second run keeps the config.
    std::fs::write(&conf, "# edited\n").unwrap();
    let out = Command::new("sh")
        .arg(repo().join("tools/install.sh"))
        .arg(env!("CARGO_BIN_EXE_clio-relay"))
        .env("DESTDIR", &root)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "# edited\n");
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&cred_dir);
}

/// `install.sh` as root into `/` on a host where systemd is not running
/// (a container, an image being built): it installs, enables the units
/// (symlinks, which need no running systemd) and prints the next steps.
/// Before, `systemctl daemon-reload` failed ("System has not been booted
/// with systemd") and the script stopped there, exit 1, without the
/// list of missing secrets. Run in a private mount namespace: `/etc`
/// and `/usr/local` are overlays into a temp dir, `/run/systemd` an
/// empty tmpfs; skipped, with the reason, where that cannot be set up.
#[test]
fn install_sh_into_root_needs_no_running_systemd() {
    if Command::new("systemctl").arg("--version").output().is_err() {
        eprintln!("skipped: systemctl not installed");
        return;
    }
    let d = temp_dir("root-install");
    for sub in ["etc-up", "etc-work", "usr-up", "usr-work"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let d = d.display();
    let script = format!(
        "mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc-up,workdir={d}/etc-work /etc \
           && mount -t overlay overlay -o lowerdir=/usr/local,upperdir={d}/usr-up,workdir={d}/usr-work /usr/local \
           && {{ [ ! -d /run/systemd ] || mount -t tmpfs tmpfs /run/systemd; }} || exit 99\n\
         sh {install} {bin} || exit $?\n\
         for u in sockets.target.wants/clio-relay.socket sockets.target.wants/clio-relay-admin.socket \
                  multi-user.target.wants/clio-relay.service; do\n\
           [ -L /etc/systemd/system/$u ] || {{ echo \"not enabled: $u\"; exit 98; }}\n\
         done\n\
         [ -x /usr/local/bin/clio-relay ] && [ -f /etc/clio-relay/clio-relay.toml ] || exit 97\n",
        install = repo().join("tools/install.sh").display(),
        bin = env!("CARGO_BIN_EXE_clio-relay"),
    );
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let out = Command::new("unshare")
        .arg(if root { "-m" } else { "-rm" })
        .args(["sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(99) || (!out.status.success() && stdout.is_empty()) {
        eprintln!("skipped: no private mount namespace with overlays here: {stderr}");
        return;
    }
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    assert!(
        stdout.contains("Next steps")
            && stdout.contains("missing: token-secret admin-token master-key soniox-01"),
        "{stdout}"
    );
    assert!(stdout.contains("systemd is not running"), "{stdout}");
    let _ = std::fs::remove_dir_all(d.to_string());
}

/// A new operator runs `check-config` on the installed config before the
/// first start, as the README's first commands do. Its secrets are
/// systemd credentials in /run/credentials/clio-relay.service/, which
/// systemd makes only while the service runs, so each was "No such file
/// or directory" and nothing more. Each line now says so and names the
/// file the shipped unit loads it from, and the exit status is still 3.
#[test]
fn the_installed_config_checked_before_a_start_names_the_credential_files() {
    if Path::new("/run/credentials/clio-relay.service").exists() {
        println!("SKIPPED: a clio-relay service runs here (its credentials exist)");
        return;
    }
    let root = temp_dir("install-first-check");
    let out = Command::new("sh")
        .arg(repo().join("tools/install.sh"))
        .arg(env!("CARGO_BIN_EXE_clio-relay"))
        .env("DESTDIR", &root)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args(["check-config", "--config"])
        .arg(root.join("etc/clio-relay/clio-relay.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let service = unit("clio-relay.service");
    for name in ["token-secret", "soniox-01", "admin-token", "master-key"] {
        assert!(
            service.contains(&format!(
                "LoadCredential={name}:/etc/clio-relay/credentials/{name}\n"
            )),
            "{name}"
        );
        assert!(
            stderr.lines().any(|l| l.contains(&format!(
                "/run/credentials/clio-relay.service/{name}: No such file or directory"
            )) && l.contains(
                "systemd makes /run/credentials/clio-relay.service/ only while \
                 clio-relay.service runs"
            ) && l.contains(&format!(
                "the shipped unit loads {name} from /etc/clio-relay/credentials/{name}"
            ))),
            "{name}: {stderr}"
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

/// `sh -c SCRIPT` with `/proc` as the service unit's `ProcSubset=pid`
/// leaves it (procfs mounted `subset=pid`: the processes and nothing
/// else), in a mount and PID namespace of its own (`unshare`); `Err` with
/// the reason where that cannot be made here (no `unshare`, not root).
fn with_unit_proc(
    script: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Result<std::process::Output, String> {
    let run = |script: &str, args: &[&str]| {
        Command::new("unshare")
            .envs(envs.iter().copied())
            .args(["--mount", "--pid", "--fork", "sh", "-c"])
            .arg(format!(
                "mount -t proc -o subset=pid proc /proc && {script}"
            ))
            .args(args)
            .output()
    };
    match run("test ! -e /proc/sys", &["probe"]) {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!(
                "procfs subset=pid not made: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Err(format!("unshare not runnable ({e}); install util-linux")),
    }
    run(script, args).map_err(|e| e.to_string())
}

/// The unit's `ProcSubset=pid` hides `/proc/sys`: a fleet config with no
/// `node_id` still names the node after the host, as the README says,
/// where the relay under the unit once found no host name and refused
/// to start (exit 3: `cluster.node_id` must be 1 to 64 of …).
#[test]
fn the_default_node_id_is_the_host_name_under_the_units_proc() {
    let dir = temp_dir("unit-proc");
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
             [upstream]\nurl = \"ws://127.0.0.1:9/transcribe-websocket\"\n\n\
             [tokens]\nsecret_env = \"UNIT_PROC_SECRET\"\n\n\
             [admin]\nstate_dir = \"{}\"\nmaster_key_env = \"UNIT_PROC_MASTER\"\n\n\
             [[account]]\nid = \"a\"\nkey_env = \"UNIT_PROC_KEY\"\nmax_concurrent_streams = 5\n\n\
             [cluster]\nredis_url = \"redis://127.0.0.1:9\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let master = "cd".repeat(32);
    let envs = [
        ("UNIT_PROC_SECRET", "unit-proc-secret-0123456789abcdef"),
        ("UNIT_PROC_MASTER", master.as_str()),
        ("UNIT_PROC_KEY", "unit-proc-soniox-key"),
    ];
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let out = match with_unit_proc(
        "exec \"$0\" check-config --config \"$1\"",
        &[env!("CARGO_BIN_EXE_clio-relay"), config.to_str().unwrap()],
        &envs,
    ) {
        Ok(out) => out,
        Err(why) => {
            eprintln!("not checked: {why}");
            return;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(", node_id {}, ", host.trim())),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
