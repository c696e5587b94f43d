//! Pooled read buffers: a shard's [`BufferPool`], and the [`Buf`] each
//! direction of a stream reads into, holding storage only while it holds
//! bytes.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use super::io::Duplex;

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
        // A buffer grown for one large message is not kept.
        if free.len() < self.keep && data.len() == self.size {
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

    /// Capacity in bytes: the pool's size, or more while the buffer is
    /// grown for one large message ([`hold`](Self::hold)).
    pub fn capacity(&self) -> usize {
        self.data.as_ref().map_or(self.pool.size, |d| d.len())
    }

    /// Makes room for `n` unconsumed bytes, to hold a message larger than
    /// the pool's buffers whole. Past the pool's size the bytes move to a
    /// buffer of their own (allocated here, counted as in use), which is
    /// freed, not pooled, once emptied: a stream holds it only while the
    /// message is in it.
    pub fn hold(&mut self, n: usize) {
        if n <= self.capacity() {
            return;
        }
        let mut big = vec![0u8; n].into_boxed_slice();
        let (s, e) = (self.start, self.end);
        self.pool.in_use.set(self.pool.in_use.get() + 1);
        if let Some(old) = self.data.take() {
            big[..e - s].copy_from_slice(&old[s..e]);
            self.pool.give_back(old);
        }
        self.data = Some(big);
        self.start = 0;
        self.end = e - s;
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

    /// Reads what socket `fd` holds now into the spare space, without
    /// waiting; returns bytes read: 0 when none are there yet, and on an
    /// error or the peer's end, which the next [`read_from`](Self::read_from)
    /// reports. For a socket glommio has just taken over: its first read
    /// waits for a readiness poll of glommio's ring, a reactor turn away,
    /// even when bytes are there.
    pub fn read_now(&mut self, fd: std::os::fd::RawFd) -> usize {
        use nix::sys::socket::{recv, MsgFlags};
        if self.end == self.capacity() {
            self.compact();
        }
        let n = loop {
            match recv(fd, self.spare(), MsgFlags::MSG_DONTWAIT) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.unwrap_or(0),
            }
        };
        self.end += n;
        self.release();
        n
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
    use crate::dataplane::io::tests::on_socket_pair;
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

    /// A message larger than the pool's buffers is held whole in one of
    /// its own, freed rather than pooled once it is consumed.
    #[test]
    fn a_large_message_is_held_whole_then_freed() {
        let pool = BufferPool::new(64, 1, 4);
        let mut a = pool.get();
        a.raw()[..8].copy_from_slice(b"xxheader");
        a.start = 2;
        a.end = 8;
        a.hold(32);
        assert_eq!(
            (a.capacity(), a.filled().len()),
            (64, 6),
            "room enough already"
        );
        a.hold(200);
        assert_eq!(a.capacity(), 200);
        assert_eq!(a.filled(), b"header", "the unconsumed bytes moved over");
        assert_eq!(
            (pool.in_use(), pool.available()),
            (1, 1),
            "the pooled one went back"
        );
        assert_eq!(a.spare().len(), 194);
        a.consume(6);
        assert!(!a.holds_storage());
        assert_eq!((pool.in_use(), pool.available()), (0, 1), "not pooled");
        assert_eq!(a.capacity(), 64);
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
