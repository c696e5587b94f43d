//! The first-message rewrite: what upstream gets from the client's config.

use clio_relay::dataplane::session::{upstream_config_text, with_api_key};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn config() -> impl Strategy<Value = Map<String, Value>> {
    (
        proptest::collection::btree_map(
            prop_oneof![
                Just("model".to_string()),
                Just("audio_format".to_string()),
                Just("context".to_string()),
                ".{1,12}"
            ],
            json(),
            0..8,
        ),
        proptest::option::of(json()),
        proptest::option::of(json()),
    )
        .prop_map(|(fields, api_key, reference)| {
            let mut m: Map<String, Value> = fields.into_iter().collect();
            if let Some(k) = api_key {
                m.insert("api_key".into(), k);
            }
            if let Some(r) = reference {
                m.insert("client_reference_id".into(), r);
            }
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Upstream gets the client's config with `api_key` removed (the
    /// session token never goes upstream), `client_reference_id` set to the
    /// stream id when the client gave none (or `null`), and every other
    /// field as sent;
    /// in `config` auth mode, the account key as `api_key` on top.
    #[test]
    fn the_config_upstream_gets(client in config(), stream_id in "[a-z0-9-]{1,20}", key in ".{1,60}") {
        let text = upstream_config_text(&serde_json::to_vec(&client).unwrap(), &stream_id);
        let got: Map<String, Value> = serde_json::from_slice(&text).unwrap();
        let mut want = client.clone();
        want.remove("api_key");
        // None given, or `null` (no id either), is the stream id.
        if want.get("client_reference_id").is_none_or(Value::is_null) {
            want.insert("client_reference_id".into(), Value::String(stream_id.clone()));
        }
        prop_assert_eq!(&got, &want);

        let keyed: Map<String, Value> = serde_json::from_slice(&with_api_key(&text, &key)).unwrap();
        let mut want_keyed = want.clone();
        want_keyed.insert("api_key".into(), Value::String(key.clone()));
        prop_assert_eq!(keyed, want_keyed);
    }
}

/// Found by the property above: serde_json's default float parser may be
/// one unit in the last place off, so a number in the client's config
/// reached upstream changed (4.047480001825406e153 became
/// 4.0474800018254065e153). The relay parses with `float_roundtrip`.
#[test]
fn numbers_reach_upstream_unchanged() {
    let text = r#"{"model":"m","x":4.047480001825406e+153,"y":[0.1,1e-300,123456789.0123456789]}"#;
    let out = String::from_utf8(upstream_config_text(text.as_bytes(), "s-1").into_vec()).unwrap();
    assert!(out.contains("4.047480001825406e+153"), "{out}");
    let sent: Value = serde_json::from_str(text).unwrap();
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["y"], sent["y"]);
}

/// A number goes up as the client wrote it: an integer past 64 bits kept
/// every digit (read into a JSON map and written again it became the
/// nearest float, 1.2345678901234568e+29), and `1e2`, `-0` and an escape
/// in a string are not rewritten (to `100.0`, `-0.0`, the character).
#[test]
fn members_reach_upstream_as_written() {
    let text = r#"{"model":"m","n":123456789012345678901234567890,"e":1e2,"z":-0,"s":"caf\u00e9","o":{ "k" : [1, 2.50] }}"#;
    let out = String::from_utf8(upstream_config_text(text.as_bytes(), "s-1").into_vec()).unwrap();
    for member in [
        r#""n":123456789012345678901234567890"#,
        r#""e":1e2"#,
        r#""z":-0"#,
        r#""s":"caf\u00e9""#,
        r#""o":{ "k" : [1, 2.50] }"#,
    ] {
        assert!(out.contains(member), "{member} in {out}");
    }
}
