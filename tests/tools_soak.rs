//! `tools/soak.sh`'s options: one given without its value, or with a value
//! that is not one, is named in one line before anything starts (the script
//! ran with bash's own "unbound variable" before, or with a nonsense value).

use std::process::Command;

fn soak(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/soak.sh"))
        .args(args)
        .output()
        .expect("bash runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_option_without_its_value_is_named() {
    for (args, want) in [
        (
            &["--minutes"][..],
            "--minutes needs a whole number of minutes, 1 or more (got '')",
        ),
        (
            &["--minutes", "ten"],
            "--minutes needs a whole number of minutes, 1 or more (got 'ten')",
        ),
        (&["--minutes", "0"], "(got '0')"),
        (&["--streams", "1", "--minutes"], "--minutes needs"),
        (
            &["--streams", "-5"],
            "--streams needs a number of streams, 1 or more (got '-5')",
        ),
        (
            &["--drop-share", "5%"],
            "--drop-share needs a share from 0 to 1, such as 0.05 (got '5%')",
        ),
        (&["--drop-share"], "--drop-share needs"),
    ] {
        let (code, err) = soak(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
}
