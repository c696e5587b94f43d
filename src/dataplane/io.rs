//! Connections, shared halves and pooled read buffers.
//!
//! A stream's two pumps (client→upstream and upstream→client) run as two
//! futures in one task on one shard. Each needs to read one socket and write
//! the other, so both sockets sit in a [`Duplex`]: a `RefCell` borrowed only
//! for the span of one `poll_*` call, which on a single thread never overlaps.
//! No lock, no atomic.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
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
    /// glommio's socket, for connections off the streaming path.
    Glommio(TcpStream),
}

impl From<TcpStream> for Tcp {
    fn from(s: TcpStream) -> Tcp {
        Tcp::Glommio(s)
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
                let $s = Pin::new($s);
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
                    Pin::new(tcp).poll_write(cx, first)
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
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Plain(_) => "Conn::Plain",
            Conn::TlsClient(_) => "Conn::TlsClient",
            Conn::TlsServer(_) => "Conn::TlsServer",
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

/// A connection both pumps of a stream use: one reads it, the other writes it.
#[derive(Debug)]
pub struct Duplex(RefCell<Conn>);

impl Duplex {
    /// Wraps a connection.
    pub fn new(conn: Conn) -> Self {
        Duplex(RefCell::new(conn))
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
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n =
                std::future::poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf))
                    .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
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
/// with `SO_REUSEPORT` when `share` (as [`listener`] binds).
pub fn stream_listener(
    passed: Option<&std::os::fd::OwnedFd>,
    addr: std::net::SocketAddr,
    share: bool,
) -> io::Result<std::net::TcpListener> {
    match passed {
        Some(fd) => fd.try_clone().map(std::net::TcpListener::from),
        None => crate::dataplane::listen::bind(addr, share),
    }
}

/// Whether `peer` is in one of `allow`'s networks (an empty list allows
/// everyone). IPv4-mapped IPv6 peers match IPv4 networks.
pub fn allowed(
    allow: &[ipnet::IpNet],
    peer: impl FnOnce() -> Option<std::net::SocketAddr>,
) -> bool {
    // `peer` is a system call (`getpeername`): asked only with a list.
    allow.is_empty()
        || peer().is_some_and(|p| {
            let ip = match p.ip() {
                std::net::IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
                v4 => v4,
            };
            allow.iter().any(|n| n.contains(&ip))
        })
}

pub use crate::core::deadline::timeout;

/// A shard's free list of read buffers, all the same size. Preallocated at
/// start so the first streams allocate nothing; grows on demand and keeps at
/// most `keep` buffers when streams end.
///
/// A stream holds a buffer only while it has bytes in it or a read is
/// running: an idle stream's [`Buf`] gives its storage back between reads
/// (see [`Buf::read_from`]), so memory follows the streams that are moving
/// data, not the streams that are open.
#[derive(Debug)]
pub struct BufferPool {
    free: RefCell<Vec<Box<[u8]>>>,
    in_use: std::cell::Cell<usize>,
    size: usize,
    keep: usize,
}

impl BufferPool {
    /// A pool of `size`-byte buffers with `prealloc` made now.
    pub fn new(size: usize, prealloc: usize, keep: usize) -> Rc<BufferPool> {
        let free = (0..prealloc)
            .map(|_| vec![0u8; size].into_boxed_slice())
            .collect();
        Rc::new(BufferPool {
            free: RefCell::new(free),
            in_use: std::cell::Cell::new(0),
            size,
            keep,
        })
    }

    /// A buffer of this pool's size. It takes storage from the free list the
    /// first time it needs some and gives it back when empty or dropped.
    pub fn get(self: &Rc<Self>) -> Buf {
        Buf {
            data: None,
            start: 0,
            end: 0,
            pool: self.clone(),
        }
    }

    /// Buffers on the free list now.
    pub fn available(&self) -> usize {
        self.free.borrow().len()
    }

    /// Buffers holding a stream's bytes (or lent to a read) now.
    pub fn in_use(&self) -> usize {
        self.in_use.get()
    }

    fn take(&self) -> Box<[u8]> {
        self.in_use.set(self.in_use.get() + 1);
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }

    fn give_back(&self, data: Box<[u8]>) {
        self.in_use.set(self.in_use.get() - 1);
        let mut free = self.free.borrow_mut();
        if free.len() < self.keep {
            free.push(data);
        }
    }
}

/// A pooled read buffer with a window `start..end` of bytes read but not yet
/// consumed. Bytes are read into `spare()`, processed in place, and consumed
/// from the front.
#[derive(Debug)]
pub struct Buf {
    data: Option<Box<[u8]>>,
    /// First unconsumed byte.
    start: usize,
    /// One past the last byte read.
    end: usize,
    pool: Rc<BufferPool>,
}

impl Buf {
    /// Where the unconsumed bytes start in [`raw`](Self::raw).
    #[inline]
    pub fn start(&self) -> usize {
        self.start
    }

    /// One past the last byte read, in [`raw`](Self::raw).
    #[inline]
    pub fn end(&self) -> usize {
        self.end
    }

    /// Marks `n` bytes at the front as used while they stay readable
    /// through [`raw`](Self::raw) (for a message handled in place after it
    /// is taken off the front). Unlike [`consume`](Self::consume) it keeps
    /// the storage even when nothing unconsumed is left.
    #[inline]
    pub fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
    }

    /// The whole backing storage (taken from the pool if the buffer has none).
    #[inline]
    pub fn raw(&mut self) -> &mut [u8] {
        let pool = &self.pool;
        self.data.get_or_insert_with(|| pool.take())
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.pool.size
    }

    /// True while the buffer holds storage from the pool.
    pub fn holds_storage(&self) -> bool {
        self.data.is_some()
    }

    /// Unconsumed bytes.
    #[inline]
    pub fn filled(&mut self) -> &mut [u8] {
        if self.start == self.end {
            return &mut [];
        }
        let (s, e) = (self.start, self.end);
        &mut self.raw()[s..e]
    }

    /// Number of unconsumed bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when no unconsumed bytes are left.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Free space after the filled window.
    #[inline]
    pub fn spare(&mut self) -> &mut [u8] {
        let e = self.end;
        &mut self.raw()[e..]
    }

    /// Moves the unconsumed bytes to the front so `spare()` is as large as
    /// possible. Copies at most what is left over, usually nothing or a
    /// partial frame header. An empty buffer gives its storage back.
    pub fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.release();
        } else if self.start > 0 {
            let (s, e) = (self.start, self.end);
            self.raw().copy_within(s..e, 0);
            self.end = e - s;
            self.start = 0;
        }
    }

    /// Consumes `n` bytes from the front of the window. An emptied buffer
    /// gives its storage back, so a stream that is waiting (for its peer, or
    /// in its closing handshake) holds none.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.release();
        }
    }

    /// Gives the storage back to the pool if no unconsumed bytes are in it.
    fn release(&mut self) {
        if self.start == self.end {
            if let Some(data) = self.data.take() {
                self.pool.give_back(data);
            }
        }
    }

    /// Reads once from `conn` into the spare space; returns bytes read.
    ///
    /// The socket is polled for readiness (glommio arms an io_uring poll, not
    /// a read into this memory), so while the peer is quiet an empty buffer
    /// holds no storage: each poll takes storage from the pool, and gives it
    /// back if nothing was read.
    pub async fn read_from(&mut self, conn: &Duplex) -> io::Result<usize> {
        if self.end == self.capacity() {
            self.compact();
        }
        let n = std::future::poll_fn(|cx| {
            let r = conn.poll_read(cx, self.spare());
            if r.is_pending() {
                self.release();
            }
            r
        })
        .await;
        let n = n.inspect_err(|_| self.release())?;
        self.end += n;
        self.release();
        Ok(n)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            self.pool.give_back(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::time::Duration;

    #[test]
    fn buffers_return_to_the_pool_and_compact() {
        let pool = BufferPool::new(64, 2, 3);
        assert_eq!(pool.available(), 2);
        let mut a = pool.get();
        let mut b = pool.get();
        let mut c = pool.get();
        assert_eq!(pool.available(), 2, "storage is taken when first used");
        assert!(a.filled().is_empty() && !a.holds_storage());
        a.raw()[..4].copy_from_slice(b"abcd");
        b.raw();
        c.raw(); // grown on demand
        assert_eq!(pool.available(), 0);
        a.end = 4;
        a.start = 2;
        a.compact();
        assert_eq!((a.start, a.end), (0, 2));
        assert_eq!(a.filled(), b"cd");
        a.consume(2);
        assert!(
            !a.holds_storage(),
            "an emptied buffer gives its storage back"
        );
        assert_eq!((a.start, a.end), (0, 0));
        assert_eq!(pool.available(), 1);
        assert_eq!(pool.in_use(), 2);
        drop((a, b, c));
        assert_eq!(pool.available(), 3);
        let mut extra: Vec<Buf> = (0..5).map(|_| pool.get()).collect();
        extra.iter_mut().for_each(|b| {
            b.raw();
        });
        drop(extra);
        assert_eq!(pool.available(), 3, "keeps at most `keep`");
    }

    /// Runs `test` on a glommio executor with a connected pair of plain
    /// sockets on 127.0.0.1: ours as a [`Duplex`], and the peer's.
    fn on_socket_pair<F, Fut>(test: F)
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

    /// An idle stream's read holds no buffer; bytes that arrive are read
    /// into one taken then, and the buffer goes back once they are consumed.
    #[test]
    fn a_waiting_read_holds_no_storage() {
        use futures_lite::AsyncWriteExt;
        on_socket_pair(|conn, mut peer| async move {
            let pool = BufferPool::new(1024, 1, 4);
            let mut buf = pool.get();
            let reader = glommio::spawn_local(async move {
                let n = buf.read_from(&conn).await.unwrap();
                (n, buf)
            });
            for _ in 0..3 {
                glommio::timer::sleep(Duration::from_millis(20)).await;
                assert_eq!(pool.available(), 1, "a pending read gives storage back");
            }
            peer.write_all(b"hello").await.unwrap();
            let (n, mut buf) = reader.await;
            assert_eq!(n, 5);
            assert_eq!(buf.filled(), b"hello");
            assert_eq!(pool.available(), 0, "bytes not yet consumed keep it");
            buf.start = buf.end;
            buf.compact();
            assert_eq!(pool.available(), 1);
        });
    }
}
