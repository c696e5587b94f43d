//! The client's config message read as members: the relay decodes only
//! the few it reads itself; every other member's text goes upstream as
//! the client wrote it. JSON's grammar allows what serde_json's `Value`
//! cannot hold (a string with a lone surrogate escape, `"\ud83d"`, which
//! JavaScript writes for a string cut inside an emoji; a number past
//! f64's range, `1e400`): such a member is upstream's to judge.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A config's members by name, the name decoded (its escapes read; a
/// lone surrogate kept as WTF-8 bytes), each as its name and value were
/// written. A repeated member is the last one, as a JSON map reads it.
/// In the order of their names' bytes, as a JSON map writes them.
pub(crate) type Members<'a> = BTreeMap<Vec<u8>, (&'a RawValue, &'a RawValue)>;

/// `text` read as a JSON object's members; `Err` when it is not JSON or
/// not an object (serde_json's error says which, and where, never quoting
/// the text).
pub(crate) fn members(text: &str) -> Result<Members<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let members = de.deserialize_map(MembersVisitor)?;
    de.end()?;
    Ok(members)
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
        let mut members = Members::new();
        while let Some(name) = map.next_key::<&'de RawValue>()? {
            let value = map.next_value::<&'de RawValue>()?;
            members.insert(decoded_name(name), (name, value));
        }
        Ok(members)
    }
}

/// A member's name (a JSON string, as written) with its escapes read, as
/// bytes: a lone surrogate escape, which no `String` holds, as WTF-8.
fn decoded_name(name: &RawValue) -> Vec<u8> {
    let raw = name.get();
    if !raw.contains('\\') {
        return raw.as_bytes()[1..raw.len() - 1].to_vec();
    }
    struct Bytes;
    impl Visitor<'_> for Bytes {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON string")
        }
        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
    }
    serde_json::Deserializer::from_str(raw)
        .deserialize_bytes(Bytes)
        .expect("a member's name is a JSON string")
}

/// The members of the client's config the relay reads, decoded. Holds
/// the session token: no `Debug`.
pub(crate) struct Fields {
    /// `api_key` when a string: the session token, read only when the
    /// request carried none; `Err` for one with a lone surrogate.
    pub api_key: Option<Result<String, LoneSurrogate>>,
    /// `client_reference_id` when a string.
    pub client_reference_id: Option<String>,
    /// `audio_format` when a string.
    pub audio_format: Option<String>,
    /// `sample_rate` when a whole number a `u64` holds.
    pub sample_rate: Option<u64>,
    /// `num_channels` when a whole number a `u64` holds; 1 when absent.
    pub num_channels: Option<u64>,
}

/// A member the relay reads as a string holds a lone surrogate escape:
/// the member's name, for a 400 that never quotes its value.
#[derive(Debug)]
pub(crate) struct LoneSurrogate(pub &'static str);

impl Fields {
    /// Decodes the members the relay reads. A member of another type than
    /// the relay reads (`sample_rate` `1e400` or `"16000"`) is read as
    /// none and goes upstream as written, for upstream to judge, as
    /// before; a string the relay needs whole (the token, the reference
    /// id) with a lone surrogate is refused: no string holds it (the
    /// token only where it is read, see [`Fields::api_key`]).
    pub(crate) fn read(members: &Members<'_>) -> Result<Fields, LoneSurrogate> {
        let raw = |name: &str| members.get(name.as_bytes()).map(|(_, v)| v.get());
        let whole_string = |name: &'static str| match raw(name) {
            Some(v) if v.starts_with('"') => serde_json::from_str::<String>(v)
                .map(Some)
                .map_err(|_| LoneSurrogate(name)),
            _ => Ok(None),
        };
        let number = |v: &str| serde_json::from_str::<u64>(v).ok();
        Ok(Fields {
            api_key: whole_string("api_key").transpose(),
            client_reference_id: whole_string("client_reference_id")?,
            // Compared with the raw formats' names only: one with a lone
            // surrogate is none of them.
            audio_format: raw("audio_format").and_then(|v| serde_json::from_str(v).ok()),
            sample_rate: raw("sample_rate").and_then(number),
            num_channels: raw("num_channels").map_or(Some(1), number),
        })
    }
}

/// How deep serde_json reads nested arrays and objects: a config nested
/// deeper was refused when the relay read it into a `Value`, and still
/// is, with serde_json's words.
const MAX_DEPTH: usize = 127;

/// Where `text` (JSON) nests deeper than [`MAX_DEPTH`], said as
/// serde_json says it ("recursion limit exceeded at line 1 column 132").
pub(crate) fn too_deep(text: &str) -> Option<String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let (mut line, mut line_start) = (1, 0);
    for (i, b) in text.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    let column = i - line_start + 1;
                    return Some(format!(
                        "recursion limit exceeded at line {line} column {column}"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' => (line, line_start) = (line + 1, i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth refused, and the words, are serde_json's own.
    #[test]
    fn too_deep_is_where_serde_json_stops() {
        for n in [1, 100, 126, 127, 128, 200] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let text = format!(
                    "{{\"x\":\"[[{{\\\"\",\n \"a\":{}0{}}}",
                    open.repeat(n),
                    close.repeat(n)
                );
                let serde = serde_json::from_str::<serde_json::Value>(&text)
                    .err()
                    .map(|e| e.to_string());
                assert_eq!(too_deep(&text), serde, "{n} {open}");
            }
        }
    }

    #[test]
    fn members_are_read_raw_the_last_of_a_name_kept() {
        let text = r#" {"b":1e400, "a":"x\ud83d", "b" : [ 2 ], "caf\u00e9":1, "\ud800":2} "#;
        let m = members(text).unwrap();
        let got: Vec<(&str, &str)> = m.values().map(|(k, v)| (k.get(), v.get())).collect();
        assert_eq!(
            got,
            [
                (r#""a""#, r#""x\ud83d""#),
                (r#""b""#, "[ 2 ]"),
                (r#""caf\u00e9""#, "1"),
                (r#""\ud800""#, "2"),
            ]
        );
        assert!(m.contains_key("café".as_bytes()));
        assert!(members("[1]").is_err());
        assert!(members("1e400").is_err());
        assert!(members("{} x").is_err());
    }

    #[test]
    fn fields_decode_what_the_relay_reads() {
        let m = members(
            r#"{"api_key":"t\u0031","sample_rate":1e400,"num_channels":2,"audio_format":"\ud83d"}"#,
        )
        .unwrap();
        let f = Fields::read(&m).unwrap();
        assert_eq!(f.api_key.unwrap().unwrap(), "t1");
        assert_eq!((f.sample_rate, f.num_channels), (None, Some(2)));
        assert_eq!(f.audio_format, None);
        assert_eq!(f.client_reference_id, None);
        let m = members(r#"{"api_key":5,"num_channels":1.0}"#).unwrap();
        let f = Fields::read(&m).unwrap();
        assert!(f.api_key.is_none());
        assert_eq!(f.num_channels, None);
        let m = members(r#"{"api_key":"\ud83dx"}"#).unwrap();
        assert_eq!(
            Fields::read(&m).unwrap().api_key.unwrap().unwrap_err().0,
            "api_key"
        );
        let m = members(r#"{"client_reference_id":"\udc00x"}"#).unwrap();
        assert_eq!(Fields::read(&m).err().unwrap().0, "client_reference_id");
    }
}
