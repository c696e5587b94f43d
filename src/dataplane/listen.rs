//! Binding the listening ports, and refusing to share them by accident.
//!
//! Each shard binds its own client listener with `SO_REUSEPORT`, so the
//! kernel spreads connections over the shards. The same option would let a
//! second relay started by mistake with the same config join those ports
//! without a word, and take a share of the streams, `/metrics` and
//! `keys rotate`. So:
//!
//! - Before the first shard binds, [`check_free`] binds the client address
//!   once *without* `SO_REUSEPORT`. The kernel refuses that while any socket
//!   listens there, ours or another program's. A relay meant to join a
//!   running one's client port (a hand-over restart) says so
//!   (`clio-relay run --join-client-port`) and skips the check; under
//!   socket activation the shards share the socket systemd passed instead.
//! - The admin port is bound once, by [`bind`] with `share = false`: it is
//!   never shared.
//!
//! Every socket sets `SO_REUSEADDR`, so a restart binds at once although
//! the last process's connections still sit in `TIME_WAIT`. (On Linux,
//! `SO_REUSEADDR` never lets a second socket bind where one listens.)
//! Relays before this check (glommio's own `bind`) set `SO_REUSEPORT`
//! and not `SO_REUSEADDR`, and their connections in `TIME_WAIT` keep
//! those options: the kernel refuses a bind with `SO_REUSEADDR` alone
//! there for up to a minute after such a relay exits. So a bind refused
//! while no socket listens on the port ([`listening`]: only connections
//! hold it) is no relay running: [`check_free`] passes, and [`bind`]
//! binds again with `SO_REUSEPORT`, which those connections allow.
//!
//! The check and the bind are two steps: two relays started at the very
//! same instant could both pass the check. It is there for the operator who
//! starts a second copy by mistake, not for a race.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The accept queue's length (glommio's own `bind` uses the same).
const BACKLOG: i32 = 1024;

/// A listening TCP socket on `addr`, with `SO_REUSEADDR`; with
/// `SO_REUSEPORT` too when `share` (the shards of one relay on the client
/// port). The socket is blocking, as glommio's own `bind` leaves it.
///
/// An unshared bind that the kernel refuses while nothing listens on the
/// port (connections of an older relay in `TIME_WAIT`, see the module
/// docs) is made again with `SO_REUSEPORT`.
pub fn bind(addr: SocketAddr, share: bool) -> io::Result<std::net::TcpListener> {
    let sk = socket(addr)?;
    sk.set_reuse_port(share)?;
    match sk.bind(&SockAddr::from(addr)) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && !share && !listening(addr.port()) => {
            return bind(addr, true);
        }
        r => r?,
    }
    sk.listen(BACKLOG)?;
    Ok(sk.into())
}

/// Fails with [`io::ErrorKind::AddrInUse`] when a socket still listens on
/// `addr` (or on an address that overlaps it, such as `0.0.0.0` on the same
/// port) after [`LINGER`]. Port 0 always passes: the kernel picks a free
/// port.
pub fn check_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let until = std::time::Instant::now() + LINGER;
    loop {
        let sk = socket(addr)?;
        // Bound, never listening, and closed at once.
        match sk.bind(&SockAddr::from(addr)) {
            // Held by connections only: no relay runs there.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && !listening(addr.port()) => {
                return Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Whether a TCP socket of this network namespace listens on `port`, on
/// any address (`/proc/net/tcp` and `tcp6`, state `0A`). Where those
/// cannot be read, `true`: a port the kernel refuses is then taken for
/// one a relay listens on, as before.
pub fn listening(port: u16) -> bool {
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        read_any = true;
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(state)) = (fields.nth(1), fields.nth(1)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if state == "0A" && local_port == Some(port) {
                return true;
            }
        }
    }
    !read_any
}

/// How long [`check_free`] waits for a port to be released. A relay that
/// has just exited still listens for a few milliseconds: an io_uring poll
/// holds each listener, and the kernel tears the rings down after the
/// process is gone (about 20 ms measured here). A restart right after an
/// exit (`kill; wait; start`) must not take that for a running relay.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// The error for a port found in use, naming it and what to do; other
/// bind errors name the port, and what to do for the two a first deploy
/// meets (a port below 1024, an address of another host).
pub fn in_use(addr: SocketAddr, key: &str, e: io::Error) -> io::Error {
    if e.kind() != io::ErrorKind::AddrInUse {
        let hint = match e.kind() {
            io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
                ": a port below 1024 needs CAP_NET_BIND_SERVICE (or the systemd socket \
                 units, which bind it for the relay)"
            }
            io::ErrorKind::AddrNotAvailable => ": it is not an address of this host",
            _ => "",
        };
        return io::Error::new(e.kind(), format!("{key} {addr}: {e}{hint}"));
    }
    let what = if key == "server.listen" {
        "stop it first, or, for a hand-over restart, start the new relay with \
         --join-client-port to share the client port with it"
    } else {
        "stop it first; the admin port is never shared (a hand-over restart \
         needs another server.admin_listen, or socket activation)"
    };
    // Another program may hold it (9464 is also the OpenTelemetry
    // Prometheus exporter's default port): say how to see which.
    let port = addr.port();
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "{key} {addr} is already in use, probably by a running clio-relay: {what}; \
             if another program holds it (`ss -ltnp 'sport = :{port}'` names it), stop it \
             or choose another {key}"
        ),
    )
}

fn socket(addr: SocketAddr) -> io::Result<Socket> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sk = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    Ok(sk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn shared_sockets_join_each_other_but_the_check_sees_them() {
        let first = bind(any(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).expect("SO_REUSEPORT joins the port");
        let e = check_free(addr).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop((first, second));
        check_free(addr).expect("free again once both are closed");
    }

    #[test]
    fn an_unshared_socket_cannot_be_joined() {
        let admin = bind(any(), false).unwrap();
        let addr = admin.local_addr().unwrap();
        assert_eq!(
            bind(addr, true).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        assert_eq!(
            bind(addr, false).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
    }

    #[test]
    fn a_port_left_in_time_wait_is_free() {
        let l = bind(any(), true).unwrap();
        let addr = l.local_addr().unwrap();
        // The server side closes first, so its end of the connection sits in
        // TIME_WAIT on the listening port after the listener is gone.
        let c = std::net::TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        drop(s);
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &c, &mut buf);
        drop(c);
        drop(l);
        check_free(addr).unwrap();
        drop(bind(addr, true).unwrap());
        drop(bind(addr, false).unwrap());
    }

    #[test]
    fn the_error_names_the_port_and_the_way_out() {
        let admin = bind(any(), false).unwrap();
        let addr = admin.local_addr().unwrap();
        let e = in_use(addr, "server.listen", check_free(addr).unwrap_err());
        let msg = e.to_string();
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.contains("--join-client-port"), "{msg}");
    }

    #[test]
    fn a_low_port_without_the_capability_says_what_it_needs() {
        // As root the bind succeeds, so the kernel's answer to anyone
        // else is given here.
        let addr: SocketAddr = "127.0.0.1:443".parse().unwrap();
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let msg = in_use(addr, "server.listen", e).to_string();
        assert!(
            msg.starts_with("server.listen 127.0.0.1:443: Permission denied")
                && msg.contains("CAP_NET_BIND_SERVICE"),
            "{msg}"
        );
    }
}
