//! The PROXY protocol header (v1 text, v2 binary) that a trusted balancer
//! sends before a connection's first byte, with the client's address in it
//! (`server.proxy_protocol_from`; HAProxy's `send-proxy-v2`).
//!
//! From a listed address the header is required; from any other it is
//! never looked for (its bytes are then a request like any other, and a
//! bad one). It is read once, at accept, before TLS and the request head,
//! and taken from the socket exactly: peeked (`MSG_PEEK`) until it is
//! whole, then read to its last byte, so what follows (a request head, a
//! TLS ClientHello) is left on the socket for the code that reads it
//! today. Parsing is `ppp`'s; this module frames the header (how many
//! bytes it has) and bounds it.

use std::net::SocketAddr;

use crate::dataplane::uring::RingSocket;

/// The v2 header's first 12 bytes.
const V2_SIGNATURE: &[u8] = ppp::v2::PROTOCOL_PREFIX;
/// A v2 header's fixed part: the signature, version and command, family
/// and protocol, and the length of what follows.
const V2_FIXED: usize = 16;
/// A v1 header's first bytes.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// A v1 header's longest form, its CRLF included (the specification's 107).
const V1_MAX: usize = 107;
/// What the first peek takes: any v1 header, and a v2 header of any
/// address family (IPv6 is 16 + 36 bytes) with a few TLVs.
const FIRST_PEEK: usize = 256;

/// Whether a PROXY header is the wanted thing from `peer`: it is in one of
/// the balancers' networks (IPv4-mapped IPv6 peers match IPv4 networks).
pub fn trusted(from: &[ipnet::IpNet], peer: SocketAddr) -> bool {
    !from.is_empty() && crate::dataplane::io::allowed(from, || Some(peer))
}

/// Whether `bytes` start with a PROXY header's signature (v1 or v2): what a
/// balancer sends that the relay does not trust (not in
/// `server.proxy_protocol_from`), said as such rather than as a request
/// or TLS handshake that merely fails to parse.
pub fn starts_with_signature(bytes: &[u8]) -> bool {
    bytes.starts_with(V1_SIGNATURE) || bytes.starts_with(V2_SIGNATURE)
}

/// What the bytes at a connection's start say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not whole yet: at least this many bytes are needed.
    Need(usize),
    /// A whole header of `len` bytes; `client` is the address it carries,
    /// or `None` when the connection's own peer is the one to use (v2
    /// `LOCAL`, a balancer's own health check; v2 `UNSPEC` or a UNIX
    /// socket's address; v1 `UNKNOWN`).
    Header {
        /// The header's length: the bytes to take from the socket.
        len: usize,
        /// The client's address, if the header gives one.
        client: Option<SocketAddr>,
    },
    /// Not a PROXY header, a bad one, or one longer than allowed.
    Refused(Refusal),
}

/// Why a connection from a balancer was refused, for its answer and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The connection does not start with a PROXY header.
    Missing,
    /// A PROXY header that does not parse (what `ppp` says of it).
    Malformed(String),
    /// A header longer than the bound (`limits.max_header_bytes`; a v1
    /// header's 107 bytes).
    TooLarge,
    /// The balancer shut its side before the header was whole.
    Truncated,
}

impl Refusal {
    /// The HTTP status it is answered and counted with.
    pub fn status(&self) -> u16 {
        400
    }

    /// What the answer and the log line say.
    pub fn message(&self) -> String {
        match self {
            Refusal::Missing => "a PROXY protocol header is required from this address \
                                 (server.proxy_protocol_from)"
                .to_string(),
            Refusal::Malformed(why) => format!("malformed PROXY protocol header: {why}"),
            Refusal::TooLarge => "PROXY protocol header too large".to_string(),
            Refusal::Truncated => "PROXY protocol header cut short".to_string(),
        }
    }
}

/// Frames and parses a PROXY header at the start of `bytes`, which may be
/// only its first part; `max` bounds a v2 header's length (a v1 header
/// has its own bound, 107 bytes).
pub fn parse(bytes: &[u8], max: usize) -> Parsed {
    let n = bytes.len();
    if starts_like(bytes, V2_SIGNATURE) {
        if n < V2_FIXED {
            return Parsed::Need(V2_FIXED);
        }
        let len = V2_FIXED + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        if len > max {
            return Parsed::Refused(Refusal::TooLarge);
        }
        if n < len {
            return Parsed::Need(len);
        }
        return match ppp::v2::Header::try_from(&bytes[..len]) {
            Ok(h) => Parsed::Header {
                len,
                client: match (h.command, h.addresses) {
                    (ppp::v2::Command::Local, _) => None,
                    (_, ppp::v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (_, ppp::v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (_, ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_)) => None,
                },
            },
            Err(e) => Parsed::Refused(Refusal::Malformed(e.to_string())),
        };
    }
    if starts_like(bytes, V1_SIGNATURE) {
        let Some(cr) = bytes[..n.min(V1_MAX)].iter().position(|&b| b == b'\r') else {
            return if n >= V1_MAX {
                Parsed::Refused(Refusal::TooLarge)
            } else {
                Parsed::Need(n + 1)
            };
        };
        // Whole once the CRLF is: parsed only then, so a header that came
        // in pieces is never judged on a piece.
        if cr + 1 >= n {
            return Parsed::Need(cr + 2);
        }
        let len = cr + 2;
        return match ppp::v1::Header::try_from(&bytes[..len]) {
            Ok(h) => Parsed::Header {
                len,
                client: match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Unknown => None,
                },
            },
            Err(e) => Parsed::Refused(Refusal::Malformed(e.to_string())),
        };
    }
    Parsed::Refused(Refusal::Missing)
}

/// Whether `bytes` could be the start of something that begins with
/// `signature` (it does, or it is a shorter piece of it).
fn starts_like(bytes: &[u8], signature: &[u8]) -> bool {
    let k = bytes.len().min(signature.len());
    bytes[..k] == signature[..k]
}

/// Reads the PROXY header at the start of `socket`'s bytes, and nothing
/// after it: the client's address it carries (`None`: use the peer's),
/// or why the connection is refused. `Err(None)` when the balancer closed
/// the connection without sending anything. The caller bounds the wait.
pub async fn read(socket: &RingSocket, max: usize) -> Result<Option<SocketAddr>, Option<Refusal>> {
    let mut buf = vec![0u8; FIRST_PEEK.min(max.max(V1_MAX))];
    let mut seen = 0;
    loop {
        let n = std::future::poll_fn(|cx| socket.poll_peek(cx, &mut buf, seen))
            .await
            .map_err(|_| None)?;
        if n == 0 {
            return Err(None);
        }
        if n <= seen {
            return Err(Some(Refusal::Truncated));
        }
        seen = n;
        match parse(&buf[..n], max) {
            Parsed::Need(want) => {
                if want > buf.len() {
                    buf.resize(want, 0);
                }
            }
            Parsed::Header { len, client } => {
                // All peeked: one read takes exactly the header.
                let mut taken = 0;
                while taken < len {
                    let got = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut buf[taken..len]))
                        .await
                        .map_err(|_| None)?;
                    if got == 0 {
                        return Err(Some(Refusal::Truncated));
                    }
                    taken += got;
                }
                return Ok(client);
            }
            Parsed::Refused(why) => return Err(Some(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend((body.len() as u16).to_be_bytes());
        h.extend(body);
        h
    }

    fn v2_ipv4(client: [u8; 4], port: u16) -> Vec<u8> {
        let mut body = client.to_vec();
        body.extend([10, 0, 0, 1]);
        body.extend(port.to_be_bytes());
        body.extend(8080u16.to_be_bytes());
        v2(1, 0x11, &body)
    }

    #[test]
    fn a_v2_header_gives_its_client_and_length_at_every_cut() {
        let h = v2_ipv4([192, 0, 2, 7], 5000);
        let mut bytes = h.clone();
        bytes.extend(b"GET / HTTP/1.1\r\n");
        for cut in 1..h.len() {
            assert!(
                matches!(parse(&bytes[..cut], 8192), Parsed::Need(w) if w > cut),
                "{cut}"
            );
        }
        assert_eq!(
            parse(&bytes, 8192),
            Parsed::Header {
                len: h.len(),
                client: Some("192.0.2.7:5000".parse().unwrap())
            }
        );
    }

    #[test]
    fn a_v2_ipv6_header_and_tlvs() {
        let mut body = std::net::Ipv6Addr::LOCALHOST.octets().to_vec();
        body.extend(std::net::Ipv6Addr::UNSPECIFIED.octets());
        body.extend([0, 80, 0, 81]);
        body.extend([0x04, 0, 3, 1, 2, 3]); // a NOOP TLV
        let h = v2(1, 0x21, &body);
        assert_eq!(
            parse(&h, 8192),
            Parsed::Header {
                len: h.len(),
                client: Some("[::1]:80".parse().unwrap())
            }
        );
    }

    #[test]
    fn local_and_unspecified_use_the_peer() {
        for h in [v2(0, 0x00, &[]), v2(0, 0x11, &[0; 12]), v2(1, 0x00, &[])] {
            assert_eq!(
                parse(&h, 8192),
                Parsed::Header {
                    len: h.len(),
                    client: None
                },
                "{h:?}"
            );
        }
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\nGET", 8192),
            Parsed::Header {
                len: 15,
                client: None
            }
        );
    }

    #[test]
    fn a_v1_header_is_parsed_once_its_crlf_is_in() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 5000 8080\r\n";
        for cut in 1..h.len() {
            assert!(matches!(parse(&h[..cut], 8192), Parsed::Need(_)), "{cut}");
        }
        assert_eq!(
            parse(h, 8192),
            Parsed::Header {
                len: h.len(),
                client: Some("192.0.2.7:5000".parse().unwrap())
            }
        );
        assert_eq!(
            parse(b"PROXY TCP6 ::1 ::2 1 2\r\n", 8192),
            Parsed::Header {
                len: 24,
                client: Some("[::1]:1".parse().unwrap())
            }
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        let refused = |b: &[u8]| match parse(b, 8192) {
            Parsed::Refused(r) => r,
            other => panic!("{b:?}: {other:?}"),
        };
        assert_eq!(refused(b"GET / HTTP/1.1\r\n"), Refusal::Missing);
        assert_eq!(refused(&[0x16, 3, 1]), Refusal::Missing);
        assert!(matches!(
            refused(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n"),
            Refusal::Malformed(_)
        ));
        assert!(matches!(
            refused(b"PROXY TCP9 1.2.3.4 1.2.3.4 1 2\r\n"),
            Refusal::Malformed(_)
        ));
        assert_eq!(refused(&[b'P'; 200][..]), Refusal::Missing);
        let mut long = b"PROXY ".to_vec();
        long.extend([b'1'; 120]);
        assert_eq!(refused(&long), Refusal::TooLarge);
        // Version 3, command 5, family 4.
        let mut bad = v2_ipv4([1, 2, 3, 4], 1);
        bad[12] = 0x31;
        assert!(matches!(refused(&bad), Refusal::Malformed(_)));
        let mut bad = v2_ipv4([1, 2, 3, 4], 1);
        bad[12] = 0x25;
        assert!(matches!(refused(&bad), Refusal::Malformed(_)));
        let mut bad = v2_ipv4([1, 2, 3, 4], 1);
        bad[13] = 0x41;
        assert!(matches!(refused(&bad), Refusal::Malformed(_)));
        // An IPv4 family with fewer bytes than its addresses.
        assert!(matches!(
            refused(&v2(1, 0x11, &[0; 4])),
            Refusal::Malformed(_)
        ));
        // Longer than the bound, told from its length field alone.
        let mut big = v2(1, 0x11, &[0; 12]);
        big[14..16].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(refused(&big[..16]), Refusal::TooLarge);
    }

    #[test]
    fn a_signature_is_told_from_a_request() {
        assert!(starts_with_signature(&v2_ipv4([192, 0, 2, 7], 5000)));
        assert!(starts_with_signature(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        assert!(!starts_with_signature(b"GET / HTTP/1.1\r\n"));
        assert!(!starts_with_signature(b"PROXY"));
        assert!(!starts_with_signature(&[0x16, 3, 1]));
    }

    #[test]
    fn trusted_only_in_the_listed_networks() {
        let from: Vec<ipnet::IpNet> = vec!["10.0.0.5/32".parse().unwrap()];
        assert!(trusted(&from, "10.0.0.5:1".parse().unwrap()));
        assert!(trusted(&from, "[::ffff:10.0.0.5]:1".parse().unwrap()));
        assert!(!trusted(&from, "10.0.0.6:1".parse().unwrap()));
        assert!(!trusted(&[], "10.0.0.5:1".parse().unwrap()));
        let mapped: Vec<ipnet::IpNet> = vec!["::ffff:10.0.0.5/128".parse().unwrap()];
        assert!(trusted(&mapped, "[::ffff:10.0.0.5]:1".parse().unwrap()));
        assert!(!trusted(&mapped, "[::ffff:10.0.0.6]:1".parse().unwrap()));
    }
}
