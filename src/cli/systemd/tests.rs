use super::*;

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment is process-wide: tests that set `NOTIFY_SOCKET` take this.
static ENV: Mutex<()> = Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|e| e.into_inner())
}

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "clio-relay-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A datagram socket bound to a fresh path, standing in for systemd's.
struct FakeSystemd {
    sock: UnixDatagram,
    path: PathBuf,
}

impl FakeSystemd {
    fn bind() -> FakeSystemd {
        let path = std::env::temp_dir().join(unique("notify"));
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        FakeSystemd { sock, path }
    }

    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn nothing_pending(&self) -> bool {
        self.sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        let r = self.sock.recv(&mut buf);
        self.sock.set_nonblocking(false).unwrap();
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `Notifier::from_env` with `NOTIFY_SOCKET=value` (restored after).
fn notifier_with_env(value: Option<&str>) -> Notifier {
    let old = std::env::var_os(NOTIFY_SOCKET);
    match value {
        Some(v) => std::env::set_var(NOTIFY_SOCKET, v),
        None => std::env::remove_var(NOTIFY_SOCKET),
    }
    let n = Notifier::from_env();
    match old {
        Some(v) => std::env::set_var(NOTIFY_SOCKET, v),
        None => std::env::remove_var(NOTIFY_SOCKET),
    }
    n
}

#[test]
fn notify_datagrams_to_a_path_socket() {
    let _g = env_lock();
    let sd = FakeSystemd::bind();
    let n = notifier_with_env(Some(sd.path.to_str().unwrap()));
    assert!(n.enabled());

    n.ready();
    assert_eq!(sd.recv(), "READY=1");
    n.status("42 live streams, 2 shards");
    assert_eq!(sd.recv(), "STATUS=42 live streams, 2 shards");
    n.status("two\nlines\r");
    assert_eq!(sd.recv(), "STATUS=two lines ");
    n.watchdog();
    assert_eq!(sd.recv(), "WATCHDOG=1");
    n.stopping();
    assert_eq!(sd.recv(), "STOPPING=1");
    n.extend_timeout(Duration::from_secs(30));
    assert_eq!(sd.recv(), "EXTEND_TIMEOUT_USEC=30000000");

    let before = monotonic_usec();
    n.reloading();
    let after = monotonic_usec();
    let msg = sd.recv();
    let (first, second) = msg.split_once('\n').expect("two assignments");
    assert_eq!(first, "RELOADING=1");
    let usec: u64 = second
        .strip_prefix("MONOTONIC_USEC=")
        .expect("MONOTONIC_USEC=")
        .parse()
        .unwrap();
    assert!(
        before <= usec && usec <= after,
        "{before} <= {usec} <= {after}"
    );

    n.send("READY=1\nSTATUS=raw").unwrap();
    assert_eq!(sd.recv(), "READY=1\nSTATUS=raw");

    // Clones share the socket and reach the same place, from any thread.
    let c = n.clone();
    std::thread::spawn(move || c.watchdog()).join().unwrap();
    assert_eq!(sd.recv(), "WATCHDOG=1");
    assert!(sd.nothing_pending());
}

#[test]
fn notify_to_an_abstract_socket() {
    let _g = env_lock();
    let name = unique("abstract");
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = notifier_with_env(Some(&format!("@{name}")));
    assert!(n.enabled());
    n.ready();
    let mut buf = [0u8; 64];
    let k = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..k], b"READY=1");
}

#[test]
fn unset_notify_socket_is_a_no_op() {
    let _g = env_lock();
    let n = notifier_with_env(None);
    assert!(!n.enabled());
    n.ready();
    n.reloading();
    n.status("x");
    n.watchdog();
    n.stopping();
    assert!(n.send("READY=1").is_ok());
    assert!(Notifier::default().send("READY=1").is_ok());
}

#[test]
fn unusable_notify_socket_disables_notifying() {
    let _g = env_lock();
    assert!(!notifier_with_env(Some("relative/path")).enabled());
    assert!(!notifier_with_env(Some("vsock:2:1234")).enabled());
    // Set but nobody listening: the send fails, the convenience calls only log.
    let path = std::env::temp_dir().join(unique("gone"));
    let n = notifier_with_env(Some(path.to_str().unwrap()));
    assert!(n.enabled());
    assert!(n.send("READY=1").is_err());
    n.ready();
}

#[test]
fn watchdog_interval_is_half_of_watchdog_usec() {
    let me = 4242;
    assert_eq!(watchdog_interval_from(None, None, me), None);
    assert_eq!(
        watchdog_interval_from(Some("20000000"), None, me),
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        watchdog_interval_from(Some("20000000"), Some("4242"), me),
        Some(Duration::from_secs(10))
    );
    // Meant for another process, disabled, or malformed.
    assert_eq!(
        watchdog_interval_from(Some("20000000"), Some("1"), me),
        None
    );
    assert_eq!(watchdog_interval_from(Some("0"), None, me), None);
    assert_eq!(watchdog_interval_from(Some("soon"), None, me), None);
}

#[test]
fn watchdog_loop_keeps_alive_only_while_the_check_passes() {
    let sd = FakeSystemd::bind();
    let n = Notifier::for_socket(sd.path.to_str().unwrap()).unwrap();
    let mut ticks = vec![
        Ok("3 live streams".to_string()),
        Err("shard 1 did not answer in 1s".into()),
        Ok("1 live stream".to_string()),
    ]
    .into_iter();
    let (tx, rx) = std::sync::mpsc::channel();
    let w = Watchdog::spawn(n, Duration::from_millis(20), move |_| {
        let t = ticks.next().unwrap_or_else(|| Ok("idle".into()));
        let _ = tx.send(());
        t
    })
    .unwrap();
    assert_eq!(sd.recv(), "WATCHDOG=1\nSTATUS=3 live streams");
    assert_eq!(sd.recv(), "STATUS=watchdog: shard 1 did not answer in 1s");
    assert_eq!(sd.recv(), "WATCHDOG=1\nSTATUS=1 live stream");
    w.stop();
    // Stopped: no tick after stop() returned.
    while rx.try_recv().is_ok() {}
    let _ = sd.sock.set_read_timeout(Some(Duration::from_millis(100)));
    while sd.sock.recv(&mut [0u8; 256]).is_ok() {}
    std::thread::sleep(Duration::from_millis(60));
    assert!(rx.try_recv().is_err());
    assert!(sd.nothing_pending());
}

#[test]
fn a_check_may_take_all_the_time_systemd_allows() {
    let every = Duration::from_secs(15);
    let t0 = std::time::Instant::now();
    // Keep-alives every 15 s: systemd kills 30 s after the last one.
    assert_eq!(check_limit(t0, t0, every), Duration::from_millis(28_500));
    // The next tick's check may take 13.5 s (a fixed 2 s would have made a
    // shard 2 s late fatal: the tick after a failed check is too late).
    assert_eq!(
        check_limit(t0, t0 + every, every),
        Duration::from_millis(13_500)
    );
    // A keep-alive sent late moves the deadline with it.
    assert_eq!(
        check_limit(t0 + Duration::from_secs(10), t0 + every, every),
        Duration::from_millis(23_500)
    );
    // Past the deadline: still a short check, so the loop goes on reporting.
    assert_eq!(
        check_limit(t0, t0 + Duration::from_secs(29), every),
        Duration::from_millis(1_500)
    );
}

#[test]
fn a_check_slower_than_a_tick_still_keeps_the_relay_alive() {
    let sd = FakeSystemd::bind();
    let n = Notifier::for_socket(sd.path.to_str().unwrap()).unwrap();
    // Long enough that the test thread's scheduling on a busy machine
    // (the check fails only if 650 ms pass between two statements) does
    // not decide it.
    let every = Duration::from_secs(1);
    let slow = Duration::from_millis(1_250);
    let (tx, rx) = std::sync::mpsc::channel();
    let w = Watchdog::spawn(n, every, move |limit| {
        let _ = tx.send(limit);
        if limit < slow {
            return Err(format!("only {limit:?} to answer").into());
        }
        std::thread::sleep(slow);
        Ok("slow".to_string())
    })
    .unwrap();
    for _ in 0..3 {
        assert_eq!(sd.recv(), "WATCHDOG=1\nSTATUS=slow");
    }
    w.stop();
    // Each check was given more than a tick: up to systemd's deadline
    // (2 s after the last keep-alive) less a tenth of a tick.
    let limits: Vec<Duration> = rx.try_iter().collect();
    assert!(limits.len() >= 3, "{limits:?}");
    assert!(
        limits
            .iter()
            .all(|l| *l > every && *l <= Duration::from_millis(1_900)),
        "{limits:?}"
    );
}

// --- socket activation -----------------------------------------------------

/// Puts `fds` on consecutive fd numbers from `first` (high numbers, free in a
/// test process; each test uses its own range) and returns `first`.
fn place(first: RawFd, fds: Vec<OwnedFd>) -> RawFd {
    for (i, fd) in fds.into_iter().enumerate() {
        let target = first + i as RawFd;
        assert!(
            nix::fcntl::fcntl(target, nix::fcntl::F_GETFD).is_err(),
            "fd {target} is already in use"
        );
        nix::unistd::dup2(fd.as_raw_fd(), target).unwrap();
    }
    first
}

fn listener() -> (OwnedFd, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (OwnedFd::from(l), addr)
}

fn is_open(fd: RawFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::F_GETFD).is_ok()
}

fn accepts(fd: OwnedFd, addr: SocketAddr) {
    let l = TcpListener::from(fd);
    assert_eq!(l.local_addr().unwrap(), addr);
    let _c = TcpStream::connect(addr).unwrap();
    // Non-blocking now: retry until the connection is queued.
    for _ in 0..500 {
        match l.accept() {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    panic!("no connection accepted");
}

const ME: u32 = 777;

/// [`activated_from`] over this test's own fd range.
fn activate(
    our_pid: u32,
    pid_env: Option<&str>,
    fds_env: Option<&str>,
    names_env: Option<&str>,
    first_fd: RawFd,
) -> io::Result<Activated> {
    // SAFETY: each test passes the range [`place`] filled for it (or a range
    // nothing holds, to see the error): fds no other owner in this process
    // has, so taking them over (and closing them) is ours to do.
    unsafe { activated_from(our_pid, pid_env, fds_env, names_env, first_fd) }
}

#[test]
fn sockets_by_name_in_any_order() {
    let (a, a_addr) = listener();
    let (c, c_addr) = listener();
    let first = place(600, vec![a, c]);
    let got = activate(ME, Some("777"), Some("2"), Some("admin:client"), first).unwrap();
    let client = got.client.unwrap();
    let admin = got.admin.unwrap();
    assert_eq!(client.as_raw_fd(), 601);
    assert_eq!(admin.as_raw_fd(), 600);
    assert_eq!(local_addr(&client).unwrap(), c_addr);
    assert_eq!(local_addr(&admin).unwrap(), a_addr);
    // Close-on-exec and non-blocking.
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    for fd in [&client, &admin] {
        let fdf = FdFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD).unwrap());
        assert!(fdf.contains(FdFlag::FD_CLOEXEC));
        let fl = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
        assert!(fl.contains(OFlag::O_NONBLOCK));
    }
    accepts(client, c_addr);
    accepts(admin, a_addr);
    assert!(!is_open(600) && !is_open(601));
}

#[test]
fn unnamed_sockets_are_client_then_admin() {
    let (c, c_addr) = listener();
    let (a, a_addr) = listener();
    let first = place(610, vec![c, a]);
    // Without FileDescriptorName= systemd names them after the socket unit.
    let got = activate(
        ME,
        Some("777"),
        Some("2"),
        Some("clio-relay.socket:clio-relay.socket"),
        first,
    )
    .unwrap();
    assert_eq!(local_addr(got.client.as_ref().unwrap()).unwrap(), c_addr);
    assert_eq!(local_addr(got.admin.as_ref().unwrap()).unwrap(), a_addr);
    drop(got);

    let (c, c_addr) = listener();
    let first = place(612, vec![c]);
    let got = activate(ME, Some("777"), Some("1"), None, first).unwrap();
    assert_eq!(local_addr(got.client.as_ref().unwrap()).unwrap(), c_addr);
    assert!(got.admin.is_none());
}

#[test]
fn only_the_admin_socket() {
    let (a, a_addr) = listener();
    let first = place(615, vec![a]);
    let got = activate(ME, Some("777"), Some("1"), Some("admin"), first).unwrap();
    assert!(got.client.is_none());
    assert_eq!(local_addr(got.admin.as_ref().unwrap()).unwrap(), a_addr);
}

#[test]
fn extra_sockets_are_closed() {
    let (c, _) = listener();
    let (a, _) = listener();
    let (x, _) = listener();
    let first = place(620, vec![c, a, x]);
    let got = activate(ME, Some("777"), Some("3"), None, first).unwrap();
    assert!(got.client.is_some() && got.admin.is_some());
    assert!(is_open(620) && is_open(621) && !is_open(622));
}

#[test]
fn not_for_us_takes_nothing() {
    let (c, _) = listener();
    let first = place(625, vec![c]);
    for pid in [None, Some("1"), Some("x")] {
        let got = activate(ME, pid, Some("1"), Some("client"), first).unwrap();
        assert!(got.is_empty());
        assert!(
            is_open(first),
            "an fd meant for another process is left alone"
        );
    }
    let got = activate(ME, Some("777"), None, None, first).unwrap();
    assert!(got.is_empty());
    let got = activate(ME, Some("777"), Some("0"), None, first).unwrap();
    assert!(got.is_empty());
    // SAFETY: `first` was placed by this test and not taken over above.
    drop(unsafe { OwnedFd::from_raw_fd(first) });
}

#[test]
fn malformed_activation_is_an_error() {
    for n in ["two", "-1", "100000"] {
        let e = activate(ME, Some("777"), Some(n), None, 630).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{n}: {e}");
    }
    // Counted but not open.
    let e = activate(ME, Some("777"), Some("1"), None, 631).unwrap_err();
    assert!(e.to_string().contains("fd 631 is not open"), "{e}");
    // The same name twice.
    let (c1, _) = listener();
    let (c2, _) = listener();
    let first = place(632, vec![c1, c2]);
    let e = activate(ME, Some("777"), Some("2"), Some("client:client"), first).unwrap_err();
    assert!(e.to_string().contains("two sockets"), "{e}");
    assert!(!is_open(632) && !is_open(633), "closed on error");
}

#[test]
fn only_listening_tcp_sockets_are_taken() {
    // A datagram socket (ListenDatagram=).
    let udp = OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap());
    // A stream socket that is bound but not listening.
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let idle = OwnedFd::from(s);
    // Not a socket at all.
    let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    // A listening Unix socket (not TCP).
    let path = std::env::temp_dir().join(unique("unix"));
    let unix = OwnedFd::from(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let _ = std::fs::remove_file(&path);
    for (i, (fd, what)) in [
        (udp, "not a stream socket"),
        (idle, "not listening"),
        (file, ""),
        (unix, "not an IP"),
    ]
    .into_iter()
    .enumerate()
    {
        let first = place(640 + i as RawFd, vec![fd]);
        let e = activate(ME, Some("777"), Some("1"), Some("client"), first).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
        assert!(!is_open(first));
    }
}

#[test]
fn listen_fds_clears_the_environment() {
    let _g = env_lock();
    std::env::set_var("LISTEN_PID", "1");
    std::env::set_var("LISTEN_FDS", "1");
    std::env::set_var("LISTEN_FDNAMES", "client");
    let got = listen_fds().unwrap();
    assert!(got.is_empty(), "pid 1 is not us");
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert!(std::env::var_os(k).is_none(), "{k} still set");
    }
    assert!(listen_fds().unwrap().is_empty());
}

#[test]
fn local_addr_of_a_listener() {
    let (fd, addr) = listener();
    assert_eq!(local_addr(&fd).unwrap(), addr);
}

#[test]
fn a_notify_socket_no_one_reads_never_blocks_a_send() {
    // A notify socket whose reader stopped reading (a supervisor that
    // hung, a wrapper that never reads): once its queue is full a send
    // must fail, not wait. Before, the socket blocked: the watchdog
    // thread hung in its next send, and the relay never exited after
    // SIGTERM (its drain waits for that thread).
    let sd = FakeSystemd::bind();
    let n = Notifier::for_socket(sd.path.to_str().unwrap()).unwrap();
    let (done, sent) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Far more than a datagram queue holds (512 by default).
        let failed = (0..5_000).filter(|_| n.send("WATCHDOG=1").is_err()).count();
        let _ = done.send(failed);
    });
    let failed = sent
        .recv_timeout(Duration::from_secs(20))
        .expect("a send blocked on a full notify socket");
    assert!(
        failed > 0,
        "every send went through: the queue never filled"
    );
    // The reader comes back: sends go through again.
    while !sd.nothing_pending() {}
    let n = Notifier::for_socket(sd.path.to_str().unwrap()).unwrap();
    n.send("READY=1").unwrap();
    assert_eq!(sd.recv(), "READY=1");
}
