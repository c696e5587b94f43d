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
//! A client the relay sent a close frame gets the relay's FIN only after
//! its close reply ([`CloseReply`]): a proxy in front (HAProxy) that has
//! the relay's FIN resets the client's connection at the client's next
//! byte, and a client whose write fails that way (its reply, or audio it
//! had in flight) reports 1006, with the relay's close frame unread.
//!
//! [`RingSocket::close_after_peer`]: super::RingSocket::close_after_peer

use std::os::fd::{IntoRawFd, OwnedFd};
use std::task::Poll;
use std::time::{Duration, Instant};

use clio_frame::frame::{parse_header, Opcode, Sender};

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
    /// its side (see the module docs). With `reply`, the relay's FIN is
    /// still to send: it goes once the client's close reply has come.
    pub(super) fn close_after_peer(&self, token: Token, fd: OwnedFd, reply: Option<CloseReply>) {
        // The plane owns the descriptor from here: `close_now` closes it.
        let _ = fd.into_raw_fd();
        {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[token.index as usize];
            debug_assert!(slot.in_use && slot.gen == token.gen && !slot.closing);
            slot.closing = true;
            slot.discard_left = DISCARD_LIMIT;
            // A client's close reply already read: its FIN now.
            if reply.is_some_and(|r| r.done()) {
                shut_write(slot.fd);
            }
            slot.await_reply = reply.filter(|r| !r.done());
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
        let mut scratch = self.discard.borrow_mut();
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
            {
                let mut slots = self.slots.borrow_mut();
                let slot = &mut slots[token.index as usize];
                if let Some(reply) = slot.await_reply.as_mut() {
                    if reply.feed(&scratch[..n as usize]) {
                        slot.await_reply = None;
                        shut_write(fd);
                    }
                }
            }
            if left == 0 {
                break true;
            }
        };
        drop(scratch);
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
            slot.await_reply = None;
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

/// Sends the FIN of a socket the plane closes (nothing if it went already).
fn shut_write(fd: std::os::fd::RawFd) {
    // SAFETY: `fd` is a closing socket the plane owns.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Follows a client's frames after the relay's close frame, reading none
/// of them, until the client's own close frame has come whole: its reply,
/// after which a client sends nothing more.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloseReply {
    /// Payload bytes of the current frame still to come.
    skip: u64,
    /// A frame header still arriving.
    head: [u8; 14],
    head_len: u8,
    /// The current frame is the close.
    in_close: bool,
    /// The close has come whole, or what came is not frames (nothing more
    /// to wait for either way).
    done: bool,
}

impl CloseReply {
    /// A wait that starts `skip` payload bytes before the next frame
    /// header (inside a frame the relay read in part).
    pub fn after(skip: u64) -> CloseReply {
        CloseReply {
            skip,
            ..CloseReply::default()
        }
    }

    /// Whether the wait is over.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Takes the next bytes from the client; true once the wait is over.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !self.done && !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64);
                self.skip -= n;
                bytes = &bytes[n as usize..];
                if self.skip == 0 && self.in_close {
                    self.done = true;
                }
                continue;
            }
            // A header, read as the scanner reads one once it is whole.
            let at = usize::from(self.head_len);
            let n = (self.head.len() - at).min(bytes.len());
            self.head[at..at + n].copy_from_slice(&bytes[..n]);
            match parse_header(&self.head[..at + n], Sender::Client, u64::MAX >> 1) {
                // More to come: all of `bytes` is in `head`.
                Ok(None) => {
                    self.head_len = (at + n) as u8;
                    bytes = &[];
                }
                Ok(Some(h)) => {
                    bytes = &bytes[h.header_len - at..];
                    self.head_len = 0;
                    self.in_close = h.opcode == Opcode::Close;
                    self.skip = h.payload_len;
                    self.done = self.in_close && h.payload_len == 0;
                }
                // Not a client's frame (a close over 125 bytes among them).
                Err(_) => self.done = true,
            }
        }
        self.done
    }
}

#[cfg(test)]
mod reply_tests {
    use super::CloseReply;
    use clio_frame::frame::{build_frame, Opcode};

    /// The client's frames, fed in pieces of every size: the wait ends
    /// with the close frame's last byte, not before.
    #[test]
    fn the_wait_ends_with_the_clients_close_frame_whole() {
        let key = Some([1, 2, 3, 4]);
        let mut bytes = build_frame(Opcode::Text, br#"{"model":"m"}"#, key);
        bytes.extend(build_frame(Opcode::Binary, &[7u8; 300], key));
        bytes.extend(build_frame(Opcode::Binary, &vec![7u8; 70_000], key));
        bytes.extend(build_frame(Opcode::Ping, b"p", key));
        let close = build_frame(Opcode::Close, &1000u16.to_be_bytes(), key);
        let before = bytes.len();
        bytes.extend(close);
        for piece in [1, 2, 3, 7, 100, 4096, bytes.len()] {
            let mut reply = CloseReply::after(0);
            for (i, chunk) in bytes.chunks(piece).enumerate() {
                let done = reply.feed(chunk);
                let fed = (i + 1) * piece;
                assert_eq!(done, fed >= bytes.len(), "piece {piece}, fed {fed}");
            }
            assert!(reply.done() && before < bytes.len());
        }
        // Starting inside a frame the relay read in part.
        let mut reply = CloseReply::after(5);
        assert!(!reply.feed(&[0; 5]));
        assert!(reply.feed(&build_frame(Opcode::Close, &[], key)));
    }
}
