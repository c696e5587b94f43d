//! `clio-relay demo`: in-process, and the real binary as a newcomer runs it.

use clio_relay::cli::demo::{render, run_demo, DemoArgs};

#[test]
fn demo_streams_every_client_to_the_end() {
    let args = DemoArgs {
        clients: 3,
        seconds: 1,
        fast: true,
    };
    let report = run_demo(&args).unwrap();
    assert!(report.all_ok(), "{report:#?}");
    assert_eq!(report.clients.len(), 3);
    for c in &report.clients {
        assert_eq!(c.frames_sent, 10);
        assert!(!c.transcript.trim().is_empty(), "{c:?}");
    }
    let m = &report.metrics;
    assert_eq!(m.streams_total(), 3);
    assert_eq!(m.accounts().iter().map(|a| a.streams_total).sum::<u64>(), 3);
    // Which account each stream lands on depends on timing (in --fast mode
    // the streams barely overlap), so only the sum is checked.
    assert_eq!(m.accounts().len(), 2);
    let text = render(&args, &report);
    assert!(text.contains("all 3 streams finished, 0 errors"), "{text}");
}

#[test]
fn demo_binary_prints_the_histogram_and_the_verdict() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args(["demo", "--clients", "2", "--seconds", "1", "--fast"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("frame client->upstream"), "{stdout}");
    assert!(stdout.contains("p99.9"), "{stdout}");
    assert!(
        stdout.contains("all 2 streams finished, 0 errors"),
        "{stdout}"
    );
    assert!(
        stdout.contains("demo-account-1") && stdout.contains("demo-account-2"),
        "{stdout}"
    );
}
