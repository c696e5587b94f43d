//! Sockets registered with the data plane: a stream socket ([`RingSocket`])
//! and the client listener ([`RingListener`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};

use super::{Plane, Token};

/// A TCP socket registered with a shard's data plane for its whole life.
/// Reads and writes are non-blocking system calls made when the plane says
/// the socket is ready.
pub struct RingSocket {
    fd: OwnedFd,
    token: Token,
    plane: Rc<Plane>,
    /// Bytes received so far: over TLS, what arrived of a record that
    /// cannot be read yet shows here (see [`RingSocket::received`]).
    received: std::cell::Cell<u64>,
}

impl std::fmt::Debug for RingSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingSocket")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl RingSocket {
    /// Registers a connected, non-blocking TCP socket with `plane`.
    pub fn new(plane: &Rc<Plane>, fd: OwnedFd) -> RingSocket {
        RingSocket::registered(plane, fd, true)
    }

    /// Registers `fd`; `readable`: see [`Plane::register`].
    fn registered(plane: &Rc<Plane>, fd: OwnedFd, readable: bool) -> RingSocket {
        let token = plane.register(fd.as_raw_fd(), readable);
        RingSocket {
            fd,
            token,
            plane: plane.clone(),
            received: std::cell::Cell::new(0),
        }
    }

    /// Connects to `addr` (non-blocking `connect`, then waits for the
    /// socket to become writable). The caller bounds the wait.
    pub async fn connect(plane: &Rc<Plane>, addr: SocketAddr) -> io::Result<RingSocket> {
        let domain = match addr {
            SocketAddr::V4(_) => socket2::Domain::IPV4,
            SocketAddr::V6(_) => socket2::Domain::IPV6,
        };
        let socket = socket2::Socket::new(
            domain,
            socket2::Type::STREAM.nonblocking().cloexec(),
            Some(socket2::Protocol::TCP),
        )?;
        let in_progress = match socket.connect(&addr.into()) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
            Err(e) => return Err(e),
        };
        // Nothing to read until the peer answers what we send.
        let sock = RingSocket::registered(plane, socket.into(), false);
        if in_progress {
            // Writable once the handshake is done, or failed.
            let mut armed = false;
            std::future::poll_fn(|cx| {
                if armed && !sock.plane.write_armed(sock.token) {
                    return Poll::Ready(());
                }
                sock.plane.wait_writable(sock.token, cx.waker());
                armed = true;
                Poll::Pending
            })
            .await;
            if let Some(e) = socket2::SockRef::from(&sock.fd).take_error()? {
                return Err(e);
            }
        }
        Ok(sock)
    }

    /// Disables Nagle's algorithm: frames leave when written.
    pub fn set_nodelay(&self) -> io::Result<()> {
        socket2::SockRef::from(&self.fd).set_nodelay(true)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        socket2::SockRef::from(&self.fd)
            .peer_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    }

    /// Hands the socket to the plane, which closes it once the peer has
    /// closed its side (or after a bound; see `closing.rs`). For a stream
    /// that has said its last frame: the wait needs no task.
    pub fn close_after_peer(self) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so each field is read out once
        // and dropped (or handed on) once, here.
        let (fd, plane) = unsafe { (std::ptr::read(&this.fd), std::ptr::read(&this.plane)) };
        plane.close_after_peer(this.token, fd, None);
    }

    /// Closes the connection with a reset (RST) rather than a FIN: the
    /// bytes still unsent are dropped, and the peer learns at once that
    /// the connection is gone, though it stopped reading (a FIN waits
    /// behind the unsent bytes). As on any drop, the socket closes when
    /// the kernel has the plane's removal of its polls (`deregister`),
    /// at the plane's next pass: before a connection opened meanwhile
    /// sends its first bytes, since its connect waits for that pass to
    /// report it done.
    pub fn reset(self) {
        // SO_LINGER 0: the close sends RST. Should it fail, the close is
        // an ordinary one.
        let _ = socket2::SockRef::from(&self.fd).set_linger(Some(std::time::Duration::ZERO));
    }

    /// [`close_after_peer`](Self::close_after_peer) for a client the relay
    /// sent a close frame and no FIN yet: the plane sends the FIN once the
    /// client's close reply has come (`reply` holds what was read of its
    /// frames so far), so nothing the client still sends meets a closed
    /// connection (a proxy in front resets it then).
    pub fn close_after_reply(self, reply: super::CloseReply) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: as in `close_after_peer`.
        let (fd, plane) = unsafe { (std::ptr::read(&this.fd), std::ptr::read(&this.plane)) };
        plane.close_after_peer(this.token, fd, Some(reply));
    }

    /// Ready once the peer has shut down its side (FIN) or the connection
    /// failed (RST), with nothing read: how a task that is not reading
    /// learns that its peer has gone. It shares the reader's waker, so only
    /// the task that reads the socket (or, when none does, one task) may
    /// wait on it.
    pub fn poll_hangup(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.plane.poll_hangup(self.token, cx.waker()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Whether the peer has shut down its side (FIN) or the connection
    /// failed, asked of the kernel now (one `poll(2)` that does not wait),
    /// whatever readiness the plane has dispatched so far: for a step
    /// about to do costly work for a peer that may have gone meanwhile.
    pub fn peer_gone_now(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one `pollfd`, valid for the call; a zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Bytes received on the socket so far. A read over TLS takes the
    /// bytes of a record as they come and gives nothing until the record is
    /// whole: this counts them as they arrive.
    pub fn received(&self) -> u64 {
        self.received.get()
    }

    /// One non-blocking `recv`, once the plane says bytes may be there.
    pub(crate) fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if !self.plane.poll_readable(self.token, cx.waker()) {
                return Poll::Pending;
            }
            // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                let n = n as usize;
                self.received.set(self.received.get() + n as u64);
                if n > 0 && n < buf.len() {
                    // Drained: more bytes bring another readiness event
                    // (the poll is multishot), so no `recv` to find EAGAIN.
                    self.plane.clear_readable(self.token);
                }
                return Poll::Ready(Ok(n));
            }
            let e = errno();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => self.plane.clear_readable(self.token),
                Some(libc::EINTR) => {}
                _ => return Poll::Ready(Err(e)),
            }
        }
    }

    /// One non-blocking `recv` with `MSG_PEEK` into `buf`, once the socket
    /// holds more than `seen` bytes (the length an earlier peek found):
    /// nothing is taken from the socket. The answer is `seen` or less only
    /// when no more will come (the peer shut down its side: 0 at once when
    /// nothing was sent). For what comes before the first read, whose
    /// length is known only once its first bytes are (a PROXY header).
    pub(crate) fn poll_peek(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        seen: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            if !self.plane.poll_readable(self.token, cx.waker()) {
                return Poll::Pending;
            }
            // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_PEEK,
                )
            };
            if n >= 0 {
                let n = n as usize;
                if n > seen || n == buf.len() || n == 0 {
                    return Poll::Ready(Ok(n));
                }
                if self.plane.poll_hangup(self.token, cx.waker()) {
                    // What is there is all there will be.
                    return Poll::Ready(Ok(n));
                }
                // Nothing new: the next bytes bring a readiness event.
                self.plane.clear_readable(self.token);
                continue;
            }
            let e = errno();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => self.plane.clear_readable(self.token),
                Some(libc::EINTR) => {}
                _ => return Poll::Ready(Err(e)),
            }
        }
    }

    /// One non-blocking `sendmsg` of `bufs`; a full socket arms `POLLOUT`.
    pub(crate) fn poll_send(
        &self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            // SAFETY: a zeroed msghdr with only the iovec set; `IoSlice` is
            // ABI-compatible with `iovec`, and both outlive the call.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = bufs.len() as _;
                libc::sendmsg(
                    self.fd.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Poll::Ready(Ok(n as usize));
            }
            let e = errno();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => {
                    self.plane.wait_writable(self.token, cx.waker());
                    return Poll::Pending;
                }
                Some(libc::EINTR) => {}
                _ => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsRawFd for RingSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for RingSocket {
    fn drop(&mut self) {
        // The poll holds the socket open in the kernel: the connection
        // closes when the plane submits its removal, later in this pass.
        self.plane.deregister(self.token);
    }
}

impl AsyncRead for RingSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_recv(cx, buf)
    }
}

impl AsyncWrite for RingSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, &[io::IoSlice::new(buf)])
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, bufs)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown on our own descriptor.
        let r = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if r == 0 { Ok(()) } else { Err(errno()) })
    }
}

/// A listening socket registered with the data plane: accepts are
/// `accept4` calls made when the plane says connections are waiting.
pub struct RingListener {
    fd: RawFd,
    token: Token,
    plane: Rc<Plane>,
}

impl std::fmt::Debug for RingListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingListener")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl RingListener {
    /// Registers the listening socket `fd`, which the caller keeps open for
    /// longer than this value; it is made non-blocking.
    pub fn new(plane: &Rc<Plane>, fd: RawFd) -> io::Result<RingListener> {
        // SAFETY: fcntl on a descriptor the caller owns.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(errno());
            }
        }
        Ok(RingListener {
            fd,
            token: plane.register(fd, true),
            plane: plane.clone(),
        })
    }

    /// The next connection, registered with the same data plane.
    pub async fn accept(&self) -> io::Result<RingSocket> {
        let fd = self.accept_fd().await?;
        Ok(RingSocket::new(&self.plane, fd))
    }

    /// The next connection, as a non-blocking socket not yet registered.
    async fn accept_fd(&self) -> io::Result<OwnedFd> {
        std::future::poll_fn(|cx| loop {
            if !self.plane.poll_readable(self.token, cx.waker()) {
                return Poll::Pending;
            }
            // SAFETY: accept4 with no address buffers.
            let fd = unsafe {
                libc::accept4(
                    self.fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a new descriptor, owned from here on.
                return Poll::Ready(Ok(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = errno();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => self.plane.clear_readable(self.token),
                Some(libc::EINTR) => {}
                _ => return Poll::Ready(Err(e)),
            }
        })
        .await
    }
}

impl Drop for RingListener {
    fn drop(&mut self) {
        self.plane.deregister(self.token);
        // Now, not at the end of the pass: until the kernel drops the poll
        // the listening socket stays open, and keeps taking connections.
        let _ = self.plane.submit();
    }
}
