//! Connections, shared halves and pooled read buffers.
//!
//! A stream's two pumps (client→upstream and upstream→client) run as two
//! futures in one task on one shard. Each needs to read one socket and write
//! the other, so both sockets sit in a [`Duplex`]: a `RefCell` borrowed only
//! for the span of one `poll_*` call, which on a single thread never overlaps.
//! No lock, no atomic.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// One end of a stream: a plain TCP socket or TLS over one.
pub enum Conn {
    /// Plain TCP (client side without TLS, or a `ws://` upstream).
    Plain(TcpStream),
    /// TLS to a `wss://` upstream.
    TlsClient(Box<futures_rustls::client::TlsStream<TcpStream>>),
    /// TLS from a client (`[tls]` on the client port).
    TlsServer(Box<futures_rustls::server::TlsStream<TcpStream>>),
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

impl AsyncWrite for Conn {
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
        std::future::poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)).await
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
/// (socket activation), or a new one bound to `addr` (with SO_REUSEPORT).
/// Must run inside the executor that will accept on it.
pub fn listener(
    passed: Option<&std::os::fd::OwnedFd>,
    addr: std::net::SocketAddr,
) -> io::Result<glommio::net::TcpListener> {
    match passed {
        Some(fd) => fd.try_clone().map(|fd| {
            use std::os::fd::IntoRawFd;
            // SAFETY: a fresh duplicate of a listening TCP socket, owned from here on.
            unsafe {
                <glommio::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd.into_raw_fd())
            }
        }),
        None => glommio::net::TcpListener::bind(addr).map_err(Into::into),
    }
}

/// Whether `peer` is in one of `allow`'s networks (an empty list allows
/// everyone). IPv4-mapped IPv6 peers match IPv4 networks.
pub fn allowed(allow: &[ipnet::IpNet], peer: Option<std::net::SocketAddr>) -> bool {
    allow.is_empty()
        || peer.is_some_and(|p| {
            let ip = match p.ip() {
                std::net::IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
                v4 => v4,
            };
            allow.iter().any(|n| n.contains(&ip))
        })
}

/// Runs `fut`, giving up after `dur`.
pub async fn timeout<T>(dur: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::Timer::new(dur).await;
        None
    })
    .await
}

/// A shard's free list of read buffers, all the same size. Preallocated at
/// start so the first streams allocate nothing; grows on demand and keeps at
/// most `keep` buffers when streams end.
#[derive(Debug)]
pub struct BufferPool {
    free: RefCell<Vec<Box<[u8]>>>,
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
            size,
            keep,
        })
    }

    /// Takes a buffer; it goes back to the pool when dropped.
    pub fn get(self: &Rc<Self>) -> Buf {
        let data = self
            .free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice());
        Buf {
            data: Some(data),
            start: 0,
            end: 0,
            pool: self.clone(),
        }
    }

    /// Buffers on the free list now.
    pub fn available(&self) -> usize {
        self.free.borrow().len()
    }
}

/// A pooled read buffer with a window `start..end` of bytes read but not yet
/// consumed. Bytes are read into `spare()`, processed in place, and consumed
/// from the front.
#[derive(Debug)]
pub struct Buf {
    data: Option<Box<[u8]>>,
    /// First unconsumed byte.
    pub start: usize,
    /// One past the last byte read.
    pub end: usize,
    pool: Rc<BufferPool>,
}

impl Buf {
    /// The whole backing storage.
    #[inline]
    pub fn raw(&mut self) -> &mut [u8] {
        self.data.as_deref_mut().expect("buffer present until drop")
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.data.as_deref().map_or(0, |d| d.len())
    }

    /// Unconsumed bytes.
    #[inline]
    pub fn filled(&mut self) -> &mut [u8] {
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
    /// partial frame header.
    pub fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            let (s, e) = (self.start, self.end);
            self.raw().copy_within(s..e, 0);
            self.end = e - s;
            self.start = 0;
        }
    }

    /// Reads once from `conn` into the spare space; returns bytes read.
    pub async fn read_from(&mut self, conn: &Duplex) -> io::Result<usize> {
        if self.end == self.capacity() {
            self.compact();
        }
        let n = conn.read(self.spare()).await?;
        self.end += n;
        Ok(n)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            let mut free = self.pool.free.borrow_mut();
            if free.len() < self.pool.keep {
                free.push(data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_the_pool_and_compact() {
        let pool = BufferPool::new(64, 2, 3);
        assert_eq!(pool.available(), 2);
        let mut a = pool.get();
        let b = pool.get();
        let c = pool.get(); // grown on demand
        assert_eq!(pool.available(), 0);
        a.raw()[..4].copy_from_slice(b"abcd");
        a.end = 4;
        a.start = 2;
        a.compact();
        assert_eq!((a.start, a.end), (0, 2));
        assert_eq!(a.filled(), b"cd");
        drop((a, b, c));
        assert_eq!(pool.available(), 3);
        let extra: Vec<Buf> = (0..5).map(|_| pool.get()).collect();
        drop(extra);
        assert_eq!(pool.available(), 3, "keeps at most `keep`");
    }
}
