//! The `[cluster]` section and the local shares.

use std::path::Path;
use std::time::Duration;

use super::share_of;
use crate::core::config::{Config, DeviceLimits, StoreDown};

const MASTER: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn file(cluster: &str, master: bool) -> String {
    std::env::set_var(
        "CLIO_T_CLUSTER_TOKEN",
        "tok-secret-0123456789-0123456789-abcdef",
    );
    std::env::set_var("CLIO_T_CLUSTER_KEY", "soniox-key-AAAA-1111");
    std::env::set_var("CLIO_T_CLUSTER_MASTER", MASTER);
    std::env::set_var("CLIO_T_CLUSTER_REDIS_PW", "redis-password-sekrit");
    let admin = if master {
        "[admin]\nmaster_key_env = \"CLIO_T_CLUSTER_MASTER\"\n"
    } else {
        ""
    };
    format!(
        "[tokens]\nsecret_env = \"CLIO_T_CLUSTER_TOKEN\"\n[[account]]\nid = \"a\"\n\
         key_env = \"CLIO_T_CLUSTER_KEY\"\n{admin}[cluster]\n{cluster}"
    )
}

fn problems(text: &str) -> String {
    let e = Config::from_toml_str(text, Path::new("/nonexistent")).unwrap_err();
    let shown = format!("{e}\n{e:?}");
    for secret in ["redis-password-sekrit", "hunter2", MASTER] {
        assert!(!shown.contains(secret), "secret leaked: {shown}");
    }
    shown
}

#[test]
fn cluster_section_defaults_and_values() {
    let c = Config::from_toml_str(
        &file(
            "redis_url = \"redis://127.0.0.1:6379/0\"\nnode_id = \"relay-1\"\n\
             password_env = \"CLIO_T_CLUSTER_REDIS_PW\"",
            true,
        ),
        Path::new("."),
    )
    .unwrap();
    let k = c.cluster.unwrap();
    assert_eq!(k.node_id, "relay-1");
    assert_eq!(k.lease_ttl, Duration::from_secs(15));
    assert_eq!(k.on_store_down, StoreDown::Local);
    assert_eq!(k.timeout, Duration::from_millis(250));
    assert_eq!(k.password.unwrap().expose(), "redis-password-sekrit");
    let c = Config::from_toml_str(
        &file(
            "redis_url = \"rediss://redis.internal:6380\"\nnode_id = \"r2\"\n\
             lease_ttl = \"5s\"\non_store_down = \"refuse\"\ntimeout = \"100ms\"",
            true,
        ),
        Path::new("."),
    )
    .unwrap();
    let k = c.cluster.unwrap();
    assert_eq!(
        (k.lease_ttl, k.on_store_down, k.timeout),
        (
            Duration::from_secs(5),
            StoreDown::Refuse,
            Duration::from_millis(100)
        )
    );
    let alone = Config::from_toml_str(&file("", true).replace("[cluster]\n", ""), Path::new("."));
    assert!(alone.unwrap().cluster.is_none(), "no section, no fleet");
}

#[test]
fn bad_cluster_settings_are_named_and_never_echo_a_password() {
    let p = problems(&file(
        "redis_url = \"redis://:hunter2@10.0.0.5:6379\"\nnode_id = \"bad id!\"\n\
         on_store_down = \"maybe\"\nlease_ttl = \"0s\"",
        false,
    ));
    for needle in [
        "cluster.redis_url: must not hold credentials",
        "cluster.node_id",
        "cluster.on_store_down",
        "cluster.lease_ttl",
        "needs admin.master_key_env",
    ] {
        assert!(p.contains(needle), "{needle:?} not in {p}");
    }
    let p = problems(&file(
        "redis_url = \"http://10.0.0.5\"\nnode_id = \"n\"",
        true,
    ));
    assert!(p.contains("must start with redis:// or rediss://"), "{p}");
}

#[test]
fn a_ca_file_is_read_at_load_and_only_for_rediss() {
    let dir = std::env::temp_dir().join(format!("clio-ca-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let pem = ca_params.self_signed(&ca_key).unwrap().pem();
    std::fs::write(dir.join("ca.pem"), &pem).unwrap();
    std::fs::write(dir.join("not.pem"), "hello").unwrap();
    let c = Config::from_toml_str(
        &file(
            "redis_url = \"rediss://redis.internal:6380/0\"\nnode_id = \"n\"\nca_file = \"ca.pem\"",
            true,
        ),
        &dir,
    )
    .unwrap();
    assert_eq!(c.cluster.unwrap().ca.as_deref(), Some(pem.as_bytes()));
    for (url, ca, needle) in [
        ("redis://10.0.0.5:6379/0", "ca.pem", "only for a rediss://"),
        (
            "rediss://10.0.0.5:6379/0",
            "not.pem",
            "holds no PEM certificate",
        ),
        ("rediss://10.0.0.5:6379/0", "absent.pem", "cannot read"),
    ] {
        let e = Config::from_toml_str(
            &file(
                &format!("redis_url = \"{url}\"\nnode_id = \"n\"\nca_file = \"{ca}\""),
                true,
            ),
            &dir,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cluster.ca_file") && e.contains(needle), "{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_username_goes_with_a_password() {
    let c = Config::from_toml_str(
        &file(
            "redis_url = \"redis://10.0.0.5:6379/0\"\nnode_id = \"n\"\nusername = \"clio\"\n\
             password_env = \"CLIO_T_CLUSTER_REDIS_PW\"",
            true,
        ),
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.cluster.unwrap().username.as_deref(), Some("clio"));
    let p = problems(&file(
        "redis_url = \"redis://10.0.0.5:6379/0\"\nnode_id = \"n\"\nusername = \"clio\"",
        true,
    ));
    assert!(
        p.contains("cluster.username: needs cluster.password_env"),
        "{p}"
    );
}

#[test]
fn local_shares_divide_count_limits_among_nodes() {
    let l = DeviceLimits {
        max_concurrent_streams: 5,
        streams_per_minute: 30,
        audio_seconds_per_day: 100,
        ..Default::default()
    };
    let s = share_of(&l, 2);
    assert_eq!((s.max_concurrent_streams, s.streams_per_minute), (2, 15));
    assert_eq!(
        s.audio_seconds_per_day, 100,
        "audio counts on from the fleet total"
    );
    let s = share_of(&l, 10);
    assert_eq!(s.max_concurrent_streams, 1, "never below one");
    assert_eq!(
        share_of(&DeviceLimits::default(), 3),
        DeviceLimits::default()
    );
}

/// A fleet handle for node n1 (no thread: the test takes its jobs).
fn fleet_of_n1() -> (
    std::sync::Arc<super::Fleet>,
    std::sync::mpsc::Receiver<super::Job>,
) {
    let cfg = Config::from_toml_str(
        &file(
            "redis_url = \"redis://127.0.0.1:9/0\"\nnode_id = \"n1\"",
            true,
        ),
        Path::new("."),
    )
    .unwrap()
    .cluster
    .unwrap();
    super::store::channel(&cfg)
}

#[test]
fn given_back_holds_wait_in_one_queue_and_wake_the_thread_once() {
    use super::{Job, Kind};
    let (fleet, rx) = fleet_of_n1();
    let holds = [
        fleet.hold(Kind::Device, "phone"),
        fleet.hold(Kind::Device, "phone"),
        fleet.hold(Kind::Account, "a"),
    ];
    assert!(rx.try_recv().is_err(), "taking a hold sends nothing");
    drop(holds);
    assert!(matches!(rx.try_recv(), Ok(Job::Released)));
    assert!(
        rx.try_recv().is_err(),
        "only the first release into an empty queue wakes the thread"
    );
    let (net, jobs) = fleet.take_changes();
    assert_eq!(net[&(Kind::Device, "phone".to_string())], -2);
    let mut sent: Vec<_> = jobs
        .into_iter()
        .map(|j| match j {
            Job::Sync(kind, id, delta) => (kind == Kind::Device, id, delta),
            other => panic!("not an adjustment: {other:?}"),
        })
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            (false, "a".to_string(), -1),
            (true, "phone".to_string(), -2)
        ],
        "the same id summed"
    );
    assert!(fleet.take_changes().1.is_empty());
    drop(fleet.hold(Kind::Account, "a"));
    assert!(
        matches!(rx.try_recv(), Ok(Job::Released)),
        "an emptied queue wakes it again"
    );
}

#[test]
fn counts_a_shards_link_took_reach_the_tally_but_are_not_sent_again() {
    use super::{Job, Kind};
    let (fleet, rx) = fleet_of_n1();
    // A stream that ended before: its release is waiting, unsent.
    drop(fleet.hold(Kind::Device, "phone"));
    assert!(matches!(rx.try_recv(), Ok(Job::Released)));
    // A link sends it in front of its open, and Redis takes the open.
    assert_eq!(
        fleet.take_unsent(),
        [(Kind::Device, "phone".to_string(), -1)]
    );
    assert!(fleet.take_unsent().is_empty(), "sent once");
    let held = fleet.counted(Kind::Device, "phone");
    let (net, jobs) = fleet.take_changes();
    assert_eq!(net[&(Kind::Device, "phone".to_string())], 0);
    assert!(
        jobs.is_empty(),
        "nothing left for the thread to send: {jobs:?}"
    );
    // Its end is the thread's to send.
    drop(held);
    let (net, jobs) = fleet.take_changes();
    assert_eq!(net[&(Kind::Device, "phone".to_string())], -1);
    assert!(matches!(&jobs[..], [Job::Sync(Kind::Device, id, -1)] if id == "phone"));
}
