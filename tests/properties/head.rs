//! The HTTP head reader (over a real socket, the head arriving in any
//! pieces) and the request parser that finds the token.

use std::time::Duration;

use clio_relay::dataplane::buf::BufferPool;
use clio_relay::dataplane::http::{parse_client_request, read_head, upgrade_response, TokenSource};
use clio_relay::dataplane::io::{Conn, Duplex};
use proptest::prelude::*;

/// A generated upgrade request: where its token goes, filler headers, and
/// the WebSocket frame bytes the client sends right behind the head.
#[derive(Debug, Clone)]
struct Request {
    token: String,
    place: usize,
    filler: Vec<(String, String)>,
    lower_case: bool,
    after: Vec<u8>,
}

const PLACES: [TokenSource; 3] = [
    TokenSource::Header,
    TokenSource::Subprotocol,
    TokenSource::Query,
];

fn request() -> impl Strategy<Value = Request> {
    (
        proptest::collection::vec(
            prop_oneof![
                Just('a'),
                Just('Z'),
                Just('0'),
                Just('-'),
                Just('_'),
                Just('.')
            ],
            1..120,
        ),
        0usize..3,
        proptest::collection::vec(
            (
                proptest::collection::vec(prop_oneof![Just('x'), Just('K'), Just('-')], 1..20),
                proptest::collection::vec(32u8..127, 0..200),
            ),
            0..20,
        ),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(token, place, filler, lower_case, after)| Request {
            token: token.into_iter().collect(),
            place,
            filler: filler
                .into_iter()
                .map(|(n, v)| {
                    (
                        format!("X-{}", n.into_iter().collect::<String>()),
                        String::from_utf8(v).unwrap().trim().to_string(),
                    )
                })
                .collect(),
            lower_case,
            after,
        })
}

impl Request {
    fn head(&self) -> Vec<u8> {
        let name = |n: &str| {
            if self.lower_case {
                n.to_ascii_lowercase()
            } else {
                n.to_string()
            }
        };
        let mut h = String::new();
        if PLACES[self.place] == TokenSource::Query {
            h.push_str(&format!(
                "GET /v1/transcribe?x=1&token={} HTTP/1.1\r\n",
                self.token
            ));
        } else {
            h.push_str("GET /v1/transcribe HTTP/1.1\r\n");
        }
        h.push_str(&format!("{}: relay.example\r\n", name("Host")));
        for (n, v) in &self.filler {
            h.push_str(&format!("{n}: {v}\r\n"));
        }
        h.push_str(&format!(
            "{}: websocket\r\n{}: Upgrade\r\n",
            name("Upgrade"),
            name("Connection")
        ));
        h.push_str(&format!(
            "{}: 13\r\n{}: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            name("Sec-WebSocket-Version"),
            name("Sec-WebSocket-Key")
        ));
        match PLACES[self.place] {
            TokenSource::Header => h.push_str(&format!(
                "{}: Bearer {}\r\n",
                name("Authorization"),
                self.token
            )),
            TokenSource::Subprotocol => h.push_str(&format!(
                "{}: soniox-api-key, {}\r\n",
                name("Sec-WebSocket-Protocol"),
                self.token
            )),
            _ => {}
        }
        h.push_str("\r\n");
        h.into_bytes()
    }
}

/// Sends `bytes` to a real socket in the pieces `cuts` makes (a pause
/// after each, so each is its own read), and runs `read_head` on the other
/// end. Returns its answer and the bytes the buffer then holds.
fn read_in_pieces(bytes: &[u8], cuts: &[usize], max: usize) -> (Result<usize, String>, Vec<u8>) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    let bytes = bytes.to_vec();
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async move {
            let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let mut peer = glommio::net::TcpStream::connect(addr).await.unwrap();
            peer.set_nodelay(true).unwrap();
            let conn = Duplex::new(Conn::Plain(listener.accept().await.unwrap().into()));
            let writer = async {
                use futures_lite::AsyncWriteExt;
                let mut last = 0;
                for p in points {
                    peer.write_all(&bytes[last..p]).await.unwrap();
                    last = p;
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                peer
            };
            let pool = BufferPool::new(16 * 1024, 1, 1);
            let reader = async {
                let mut buf = pool.get();
                let r = read_head(&conn, &mut buf, max)
                    .await
                    .map_err(|e| format!("{e:?}"));
                (r, buf.filled().to_vec())
            };
            let ((r, held), _peer) = futures_lite::future::zip(reader, writer).await;
            (r, held)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// However the head arrives, the reader finds where it ends, and the
    /// bytes behind it (the first frames) stay in the buffer after it.
    #[test]
    fn any_chunking_of_a_head_reads_the_same(req in request(), cuts in proptest::collection::vec(any::<usize>(), 0..12)) {
        let head = req.head();
        prop_assume!(head.len() <= 8192);
        let mut bytes = head.clone();
        bytes.extend_from_slice(&req.after);
        let (r, held) = read_in_pieces(&bytes, &cuts, 8192);
        prop_assert_eq!(r, Ok(head.len()));
        prop_assert_eq!(&held[..head.len()], &head[..]);
        prop_assert!(bytes.starts_with(&held), "the buffer holds the bytes in order");
        let parsed = parse_client_request(&held[..head.len()]).unwrap();
        prop_assert_eq!(parsed.path.as_str(), "/v1/transcribe");
        prop_assert_eq!(parsed.token.clone(), Some((req.token.clone(), PLACES[req.place])));
        prop_assert!(upgrade_response(&parsed).is_some());
    }

    /// Any bytes at all: the parser answers, and never with a token the
    /// bytes do not contain.
    #[test]
    fn the_request_parser_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(req) = parse_client_request(&bytes) {
            if let Some((t, _)) = req.token {
                prop_assert!(bytes.windows(t.len()).any(|w| w == t.as_bytes()));
            }
        }
    }
}
