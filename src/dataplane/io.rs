//! Connections and their shared halves (the pooled read buffers the
//! pumps read them into are in [`super::buf`]).
//!
//! A stream's two pumps (client→upstream and upstream→client) run as two
//! futures in one task on one shard. Each needs to read one socket and write
//! the other, so both sockets sit in a [`Duplex`]: a `RefCell` borrowed only
//! for the span of one `poll_*` call, which on a single thread never overlaps.
//! No lock, no atomic.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use crate::dataplane::uring::RingSocket;

/// A TCP socket: on a shard's data plane ([`RingSocket`], every stream
/// socket), or glommio's (the control plane: admin port, health checks).
#[derive(Debug)]
pub enum Tcp {
    /// Registered with the shard's data-plane ring for its whole life.
    Ring(RingSocket),
    /// glommio's socket, for connections off the streaming path. Boxed:
    /// it is four times the size of a `RingSocket`, and every stream keeps
    /// two of these in its task's state.
    Glommio(Box<TcpStream>),
}

impl From<TcpStream> for Tcp {
    fn from(s: TcpStream) -> Tcp {
        Tcp::Glommio(Box::new(s))
    }
}

impl From<RingSocket> for Tcp {
    fn from(s: RingSocket) -> Tcp {
        Tcp::Ring(s)
    }
}

macro_rules! delegate_tcp {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Tcp::Ring($s) => {
                let $s = Pin::new($s);
                $e
            }
            Tcp::Glommio($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        delegate_tcp!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Tcp {
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Tcp::Ring(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            // glommio has no vectored write: try one `sendmsg` directly,
            // and let glommio wait for room if the socket is full.
            Tcp::Glommio(tcp) => match send_vectored(tcp, bufs) {
                Ok(n) => Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let first = bufs.iter().find(|s| !s.is_empty()).map_or(&[][..], |s| s);
                    Pin::new(&mut **tcp).poll_write(cx, first)
                }
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate_tcp!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_tcp!(self, s => s.poll_flush(cx))
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_tcp!(self, s => s.poll_close(cx))
    }
}

/// One end of a stream: a plain TCP socket or TLS over one.
pub enum Conn {
    /// Plain TCP (client side without TLS, or a `ws://` upstream).
    Plain(Tcp),
    /// TLS to a `wss://` upstream.
    TlsClient(Box<futures_rustls::client::TlsStream<Tcp>>),
    /// TLS from a client (`[tls]` on the client port).
    TlsServer(Box<futures_rustls::server::TlsStream<Tcp>>),
    /// Reset by the relay ([`Duplex::reset`]): its socket is closed, and
    /// reads and writes fail.
    Closed,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Plain(_) => "Conn::Plain",
            Conn::TlsClient(_) => "Conn::TlsClient",
            Conn::TlsServer(_) => "Conn::TlsServer",
            Conn::Closed => "Conn::Closed",
        })
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::TlsClient($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Conn::TlsServer($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Conn::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

/// One non-blocking `sendmsg` of `bufs` on a plain socket.
fn send_vectored(tcp: &TcpStream, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, MsgFlags};
    use std::os::fd::AsRawFd;
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    loop {
        match sendmsg::<()>(tcp.as_raw_fd(), bufs, &[], flags, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_close(cx))
    }
}

impl Tcp {
    /// See [`RingSocket::received`]; glommio's sockets (off the streaming
    /// path) count nothing.
    fn received(&self) -> u64 {
        match self {
            Tcp::Ring(s) => s.received(),
            Tcp::Glommio(_) => 0,
        }
    }

    /// See [`RingSocket::poll_hangup`]; glommio's sockets (off the
    /// streaming path) never report it.
    fn poll_hangup(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Tcp::Ring(s) => s.poll_hangup(cx),
            Tcp::Glommio(_) => Poll::Pending,
        }
    }
}

impl Conn {
    /// The peer has shut down its side of the TCP connection under this
    /// one, or it failed (see [`RingSocket::poll_hangup`]).
    fn poll_hangup(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Conn::Plain(tcp) => tcp.poll_hangup(cx),
            Conn::TlsClient(tls) => tls.get_ref().0.poll_hangup(cx),
            Conn::TlsServer(tls) => tls.get_ref().0.poll_hangup(cx),
            Conn::Closed => Poll::Ready(()),
        }
    }

    /// Bytes received on the TCP socket under the connection, encrypted
    /// ones included: see [`RingSocket::received`].
    fn received(&self) -> u64 {
        match self {
            Conn::Plain(tcp) => tcp.received(),
            Conn::TlsClient(tls) => tls.get_ref().0.received(),
            Conn::TlsServer(tls) => tls.get_ref().0.received(),
            Conn::Closed => 0,
        }
    }

    /// The TCP socket under the connection (TLS state, if any, dropped);
    /// none once reset.
    pub fn into_tcp(self) -> Option<Tcp> {
        match self {
            Conn::Plain(tcp) => Some(tcp),
            Conn::TlsClient(tls) => Some(tls.into_inner().0),
            Conn::TlsServer(tls) => Some(tls.into_inner().0),
            Conn::Closed => None,
        }
    }
}

/// A connection both pumps of a stream use: one reads it, the other writes it.
#[derive(Debug)]
pub struct Duplex(RefCell<Conn>);

impl Duplex {
    /// Wraps a connection.
    pub fn new(conn: Conn) -> Self {
        Duplex(RefCell::new(conn))
    }

    /// Completes once the peer has shut down its side or the connection
    /// failed, reading nothing: see [`RingSocket::poll_hangup`].
    pub async fn hung_up(&self) {
        std::future::poll_fn(|cx| self.0.borrow().poll_hangup(cx)).await
    }

    /// Bytes received on the socket so far, TLS records still arriving
    /// included (see [`RingSocket::received`]).
    pub fn received(&self) -> u64 {
        self.0.borrow().received()
    }

    /// Whether the connection is TLS (client or upstream side).
    pub fn is_tls(&self) -> bool {
        matches!(*self.0.borrow(), Conn::TlsClient(_) | Conn::TlsServer(_))
    }

    /// Reads into `buf`; `Ok(0)` is end of stream.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read(cx, buf)).await
    }

    /// One poll of a read into `buf`.
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }

    /// Writes all of `buf` and flushes it (TLS keeps records until flushed).
    pub async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        self.write_all_noting(buf, &std::cell::Cell::new(None))
            .await
    }

    /// [`write_all`](Self::write_all), restarting the clock in `since` each
    /// time the peer took part of the bytes and more wait: the stall bounds
    /// (`limits.stall_timeout`) count from a write's last progress, so a
    /// peer that reads slowly but reads is not taken for one that stopped.
    /// A write taken whole (the usual case) reads no clock.
    pub async fn write_all_noting(
        &self,
        mut buf: &[u8],
        since: &std::cell::Cell<Option<std::time::Instant>>,
    ) -> io::Result<()> {
        while !buf.is_empty() {
            let n =
                std::future::poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf))
                    .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
            if !buf.is_empty() {
                since.set(Some(std::time::Instant::now()));
            }
        }
        self.flush().await
    }

    /// Writes `a` then `b` and flushes, as one send where the connection
    /// allows: on plain TCP one `sendmsg` with both buffers (no copy), over
    /// TLS both in one record (up to 16 KiB). The relay uses it to send the config
    /// message together with the client frames read along with it.
    pub async fn write_two(&self, a: &[u8], b: &[u8]) -> io::Result<()> {
        let total = a.len() + b.len();
        let mut sent = 0;
        while sent < total {
            let n = std::future::poll_fn(|cx| {
                let rest = [
                    io::IoSlice::new(&a[sent.min(a.len())..]),
                    io::IoSlice::new(&b[sent.saturating_sub(a.len())..]),
                ];
                Pin::new(&mut *self.0.borrow_mut()).poll_write_vectored(cx, &rest)
            })
            .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += n;
        }
        self.flush().await
    }

    /// Pushes out what TLS holds back until flushed (nothing on plain TCP).
    async fn flush(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)).await
    }

    /// Sends FIN (or TLS close_notify then FIN) after pending writes.
    pub async fn close(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)).await
    }

    /// Closes the connection now with a reset (see [`RingSocket::reset`]),
    /// without TLS's close_notify, and leaves it [`Conn::Closed`]: for an
    /// upstream connection that failed, before the stream opens its next
    /// one (upstream counts an open connection against the account's
    /// limit, and a stalled one would learn of a FIN only after audio it
    /// no longer reads).
    pub fn reset(&self) {
        let conn = std::mem::replace(&mut *self.0.borrow_mut(), Conn::Closed);
        // glommio's sockets (off the streaming path) close as dropped.
        if let Some(Tcp::Ring(socket)) = conn.into_tcp() {
            socket.reset();
        }
    }

    /// Gives the connection back.
    pub fn into_inner(self) -> Conn {
        self.0.into_inner()
    }
}

/// The listener of an executor: a duplicate of a socket systemd passed
/// (socket activation), or a new one bound to `addr`, with `SO_REUSEPORT`
/// when `share` (see [`crate::dataplane::listen`]). Must run inside the executor that
/// will accept on it.
pub fn listener(
    passed: Option<&std::os::fd::OwnedFd>,
    addr: std::net::SocketAddr,
    share: bool,
) -> io::Result<glommio::net::TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = match passed {
        Some(fd) => fd.try_clone()?,
        None => crate::dataplane::listen::bind(addr, share)?.into(),
    };
    // SAFETY: a listening TCP socket we own (a fresh duplicate, or just bound).
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) })
}

/// The client listener of a shard, for its data plane: a duplicate of a
/// socket systemd passed (socket activation), or a new one bound to `addr`,
/// with `SO_REUSEPORT` when `share` (as [`listener`] binds). Nagle's
/// algorithm is off on it, which every connection it accepts inherits (one
/// system call per stream fewer than setting it on each).
pub fn stream_listener(
    passed: Option<&std::os::fd::OwnedFd>,
    addr: std::net::SocketAddr,
    share: bool,
) -> io::Result<std::net::TcpListener> {
    let listener = match passed {
        Some(fd) => fd.try_clone().map(std::net::TcpListener::from)?,
        None => crate::dataplane::listen::bind(addr, share)?,
    };
    socket2::SockRef::from(&listener).set_nodelay(true)?;
    Ok(listener)
}

/// Whether `peer` is in one of `allow`'s networks (an empty list allows
/// everyone). IPv4-mapped IPv6 peers match IPv4 networks and IPv4-mapped
/// ones (`::ffff:10.0.0.0/104`).
pub fn allowed(
    allow: &[ipnet::IpNet],
    peer: impl FnOnce() -> Option<std::net::SocketAddr>,
) -> bool {
    // `peer` is a system call (`getpeername`): asked only with a list.
    allow.is_empty()
        || peer().is_some_and(|p| {
            // An IPv4 client of a dual-stack port comes IPv4-mapped (and
            // is logged so): an IPv4 entry or an IPv4-mapped one matches it.
            let ip = p.ip();
            let v4 = match ip {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4),
                std::net::IpAddr::V4(_) => None,
            };
            allow
                .iter()
                .any(|n| n.contains(&ip) || v4.is_some_and(|v4| n.contains(&v4)))
        })
}

pub use crate::core::deadline::timeout;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::future::Future;
    use std::time::Duration;

    /// A client connection comes with Nagle's algorithm off, from its
    /// listener: no stream sets it on its own socket.
    #[test]
    fn accepted_stream_sockets_have_nagle_off() {
        let listener = stream_listener(None, "127.0.0.1:0".parse().unwrap(), false).unwrap();
        let _peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        assert!(socket2::SockRef::from(&ours).nodelay().unwrap());
    }

    /// Runs `test` on a glommio executor with a connected pair of plain
    /// sockets on 127.0.0.1: ours as a [`Duplex`], and the peer's.
    pub(crate) fn on_socket_pair<F, Fut>(test: F)
    where
        F: FnOnce(Duplex, glommio::net::TcpStream) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async move {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let peer = glommio::net::TcpStream::connect(addr).await.unwrap();
                let conn = Duplex::new(Conn::Plain(listener.accept().await.unwrap().into()));
                test(conn, peer).await;
            });
    }

    /// `write_two` delivers both buffers whole and in order, also when the
    /// socket fills up part-way and the rest waits for the peer to read.
    #[test]
    fn write_two_sends_both_buffers_in_order() {
        use futures_lite::AsyncReadExt;
        on_socket_pair(|conn, mut peer| async move {
            let a: Vec<u8> = (0..143u32).map(|i| i as u8).collect();
            // Far more than loopback's socket buffers hold at once.
            let b: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + 3) as u8).collect();
            let expected = [a.as_slice(), b.as_slice(), b"tail"].concat();
            let reader = glommio::spawn_local(async move {
                let mut got = vec![0u8; expected.len()];
                // Read slowly at first, so the writer meets a full socket.
                glommio::timer::sleep(Duration::from_millis(50)).await;
                peer.read_exact(&mut got).await.unwrap();
                assert!(got == expected, "bytes arrived changed or out of order");
            });
            conn.write_two(&a, &b).await.unwrap();
            conn.write_two(b"", b"tail").await.unwrap();
            reader.await;
        });
    }
}
