//! Closing a stream's sockets after their peers, without the stream.
//!
//! A stream that has said its last frame still has two waits before its
//! sockets may close: for the client's FIN after the relay's own (so that
//! bytes the client still sends do not turn the close into a reset that
//! could cost it its last frames), and for upstream's FIN (upstream, the
//! WebSocket server, closes first, so the relay keeps no TIME_WAIT on an
//! ephemeral port towards it). Those waits need no stream: the stream's
//! task hands each socket to the plane ([`RingSocket::close_after_peer`])
//! and ends, freeing its memory at once. The plane reads and discards what
//! still comes, right where the readiness event is dispatched, and closes
//! the socket at its peer's FIN, at an error, after [`DISCARD_LIMIT`]
//! bytes, or after [`CLOSE_LIMIT`], whichever comes first. No task wakes
//! for it and no timer is set: the deadlines are checked at the start of
//! each dispatch, oldest first.
//!
//! [`RingSocket::close_after_peer`]: super::RingSocket::close_after_peer

use std::os::fd::{IntoRawFd, OwnedFd};
use std::task::Poll;
use std::time::{Duration, Instant};

use super::{Plane, Token};

/// The longest the plane waits for a peer's FIN before it closes the
/// socket anyway.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// The most bytes the plane reads and discards from a closing socket
/// before it closes the socket anyway (a peer that goes on sending gets
/// a reset). Also what one socket's reads can take of a dispatch.
pub const DISCARD_LIMIT: u32 = 1 << 20;

impl Plane {
    /// Takes `fd`, registered as `token`, to close once its peer has closed
    /// its side (see the module docs).
    pub(super) fn close_after_peer(&self, token: Token, fd: OwnedFd) {
        // The plane owns the descriptor from here: `close_now` closes it.
        let _ = fd.into_raw_fd();
        {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[token.index as usize];
            debug_assert!(slot.in_use && slot.gen == token.gen && !slot.closing);
            slot.closing = true;
            slot.discard_left = DISCARD_LIMIT;
            slot.reader = None;
            slot.writer = None;
        }
        self.closing_now.set(self.closing_now.get() + 1);
        self.closing
            .borrow_mut()
            .push_back((Instant::now() + CLOSE_LIMIT, token));
        // The FIN (or bytes) may be there already.
        if self.slots.borrow()[token.index as usize].readable {
            self.drain_closing(token);
        }
    }

    /// Reads and discards what a closing socket has, until it has no more
    /// (a readiness event comes only with new bytes); closes it at the
    /// peer's FIN, an error, or the discard limit.
    pub(super) fn drain_closing(&self, token: Token) {
        let (fd, mut left) = {
            let slots = self.slots.borrow();
            let slot = &slots[token.index as usize];
            if !slot.in_use || slot.gen != token.gen || !slot.closing {
                return;
            }
            (slot.fd, slot.discard_left)
        };
        let mut scratch = [0u8; 16 << 10];
        let done = loop {
            // SAFETY: `scratch` is valid for its length; `fd` is the
            // closing socket, which the plane owns.
            let n = unsafe {
                libc::recv(
                    fd,
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                break true; // the peer's FIN
            }
            if n < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        self.clear_readable(token);
                        break false;
                    }
                    _ => break true, // reset, or failed: nothing to wait for
                }
            }
            left = left.saturating_sub(n as u32);
            if left == 0 {
                break true;
            }
        };
        if done {
            self.close_now(token);
        } else {
            self.slots.borrow_mut()[token.index as usize].discard_left = left;
        }
    }

    /// Closes the sockets whose wait is over.
    pub(super) fn close_overdue(&self) {
        if self.closing.borrow().is_empty() {
            return;
        }
        let now = Instant::now();
        loop {
            let token = {
                let mut closing = self.closing.borrow_mut();
                match closing.front() {
                    Some(&(due, token)) if due <= now => {
                        closing.pop_front();
                        token
                    }
                    _ => break,
                }
            };
            self.close_now(token);
        }
    }

    /// When the oldest closing socket is closed anyway, if there is one.
    pub(super) fn next_close_due(&self) -> Option<Instant> {
        self.closing.borrow().front().map(|&(due, _)| due)
    }

    /// Ends a closing socket's registration and closes it (the FIN, or a
    /// reset if bytes are left unread, leaves when the poll's removal is
    /// submitted). Nothing if it is closed already.
    fn close_now(&self, token: Token) {
        let fd = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[token.index as usize];
            if !slot.in_use || slot.gen != token.gen || !slot.closing {
                return;
            }
            slot.closing = false;
            slot.fd
        };
        self.deregister(token);
        // SAFETY: the plane took ownership of `fd` in `close_after_peer`,
        // and closes it once, here (the slot is no longer closing).
        unsafe { libc::close(fd) };
        let left = self.closing_now.get() - 1;
        self.closing_now.set(left);
        if left == 0 {
            if let Some(w) = self.all_closed.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Sockets waiting for their peer's FIN now.
    pub fn closing(&self) -> usize {
        self.closing_now.get()
    }

    /// Waits until no socket is waiting for its peer's FIN (each does for
    /// at most [`CLOSE_LIMIT`]): a shard that stops lets its last streams'
    /// sockets close as they would have.
    pub async fn all_closed(&self) {
        std::future::poll_fn(|cx| {
            if self.closing_now.get() == 0 {
                return Poll::Ready(());
            }
            *self.all_closed.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Closes what is still waiting (the plane is going away).
    pub(super) fn close_all_now(&self) {
        let tokens: Vec<Token> = self
            .closing
            .borrow_mut()
            .drain(..)
            .map(|(_, t)| t)
            .collect();
        for token in tokens {
            self.close_now(token);
        }
    }
}
