//! The kernel's view of a socket, for tests of what the relay holds in it
//! and whether it closed it: `ss` and `/proc/net/tcp`.

use std::net::SocketAddr;

/// The IPv4 TCP socket from `local` to `peer` in `/proc/net/tcp`: its state
/// as the kernel numbers it (1 established, 4 FIN_WAIT1, ...) and whether
/// a file still holds it (an inode; a socket closed while its FIN waits
/// behind unsent bytes has none). `None` if there is no such socket.
pub fn tcp_socket(local: SocketAddr, peer: SocketAddr) -> Option<(u8, bool)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    let (local, peer) = (hex(local), hex(peer));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[1] == local && f[2] == peer)
            .then(|| (u8::from_str_radix(f[3], 16).unwrap(), f[9] != "0"))
    })
}

/// `Send-Q`, `rb` and `tb` of the TCP socket from `local` to `peer`, as
/// `ss -tmn` shows them: the bytes in its send queue (sent and not yet
/// acknowledged, or not sent at all), and its receive and send buffers.
pub fn socket_state(local: SocketAddr, peer: SocketAddr) -> (u64, u64, u64) {
    let out = std::process::Command::new("ss")
        .args(["-tmn"])
        .output()
        .expect("ss runs (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 || cols[3] != local.to_string() || cols[4] != peer.to_string() {
            continue;
        }
        let mem = lines.next().unwrap_or_default();
        let field = |name: &str| {
            mem.split([',', '(', ')'])
                .find_map(|f| f.trim().strip_prefix(name)?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in {mem:?}"))
        };
        let send_q = cols[2].parse().expect("Send-Q is a number");
        return (send_q, field("rb"), field("tb"));
    }
    panic!("no socket {local} -> {peer} in:\n{text}");
}

/// The relay's end of its one upstream connection to `upstream`.
pub fn upstream_socket(upstream: SocketAddr) -> SocketAddr {
    let out = std::process::Command::new("ss")
        .args(["-tn", "state", "established", "dst", &upstream.to_string()])
        .output()
        .expect("ss runs (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split_whitespace().rev().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no upstream socket in:\n{text}"))
}
