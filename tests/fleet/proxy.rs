//! A TCP proxy between the relays and `redis-server`, for a Redis that is
//! there but bad: it passes bytes both ways, or, once told to, holds the
//! cluster thread's calls unanswered (its connection is the one that
//! polls, `XREAD`) and cuts every other connection at its next command,
//! as a network that drops one path and resets the others would; or it
//! loses the answer to one call that Redis took, with its connection; or
//! has Redis flushed (`FLUSHALL`) just before one call reaches it, or
//! holds one call until something else has happened in Redis; or
//! trickles the answer to one call (and every later one on its
//! connection) a byte at a time.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    /// Hold the polling connection's calls, cut the others.
    fault: AtomicBool,
    /// Cut every connection but the polling one at its next command.
    cut_links: AtomicBool,
    /// Calls of the polling connection held so far.
    held: AtomicUsize,
    /// The next call with these bytes reaches Redis, and its connection is
    /// cut when the answer comes: the answer is lost.
    lose: Mutex<Option<Vec<u8>>>,
    /// The next call with these bytes reaches Redis after a `FLUSHALL`.
    flush_before: Mutex<Option<Vec<u8>>>,
    /// The next call with these bytes reaches Redis once this has run
    /// (each entry once, the first that matches).
    hold_for: Mutex<Vec<Held>>,
    /// From the next call with these bytes on, its connection's answers
    /// come a byte at a time, this long apart.
    trickle: Mutex<Option<(Vec<u8>, Duration)>>,
    /// Redis's port.
    to: u16,
    stop: AtomicBool,
}

/// What [`Proxy::hold_for`] runs, and the call it holds.
type Held = (Vec<u8>, Box<dyn FnOnce() + Send>);

pub struct Proxy {
    port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1, in front of Redis at `to`.
    pub fn start(to: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            to,
            ..State::default()
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                if s.fault.load(Ordering::Relaxed) {
                    // A new connection is reset at once.
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let s = s.clone();
                std::thread::spawn(move || relay(client, server, &s));
            }
        });
        Proxy { port, state }
    }

    /// The URL the relays are given in place of Redis's.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// From now on, hold the polling connection's calls and cut the others
    /// (`true`), or pass everything again (`false`).
    pub fn fault(&self, on: bool) {
        self.state.fault.store(on, Ordering::Relaxed);
    }

    /// From now on, cut every connection but the polling one (the
    /// cluster thread's) at its next command (`true`), or not (`false`).
    pub fn cut_links(&self, on: bool) {
        self.state.cut_links.store(on, Ordering::Relaxed);
    }

    /// The next call that carries `bytes` reaches Redis, but its answer is
    /// lost: the connection is cut when it comes.
    pub fn lose_answer_to(&self, bytes: &[u8]) {
        *self.state.lose.lock().unwrap() = Some(bytes.to_vec());
    }

    /// Whether the call [`Proxy::lose_answer_to`] named has gone by.
    pub fn answer_lost(&self) -> bool {
        self.state.lose.lock().unwrap().is_none()
    }

    /// The next call that carries `bytes` reaches Redis just after Redis
    /// is flushed (`FLUSHALL`, on a connection of its own): a loss of
    /// Redis's data that comes right before that call.
    pub fn flush_before(&self, bytes: &[u8]) {
        *self.state.flush_before.lock().unwrap() = Some(bytes.to_vec());
    }

    /// Whether the flush [`Proxy::flush_before`] asked for is done.
    pub fn flushed(&self) -> bool {
        self.state.flush_before.lock().unwrap().is_none()
    }

    /// The next call that carries `bytes` reaches Redis only once `then`
    /// has run (on the proxy's thread, the caller waiting for its
    /// answer): what `then` does in Redis comes between that connection's
    /// calls.
    pub fn hold_for(&self, bytes: &[u8], then: impl FnOnce() + Send + 'static) {
        self.holds().hold_for(bytes, then);
    }

    /// A handle that arms [`Proxy::hold_for`] from elsewhere: from what a
    /// hold runs, to hold a later call of the same connection.
    pub fn holds(&self) -> Holds {
        Holds(self.state.clone())
    }

    /// The holds armed whose call has not come yet.
    pub fn holds_left(&self) -> usize {
        self.state.hold_for.lock().unwrap().len()
    }

    /// From the next call that carries `bytes` on, that connection's
    /// answers come one byte every `gap`: each byte in time for a read's
    /// timeout, the whole answer long after.
    pub fn trickle_answer_to(&self, bytes: &[u8], gap: Duration) {
        *self.state.trickle.lock().unwrap() = Some((bytes.to_vec(), gap));
    }

    /// Whether the call [`Proxy::trickle_answer_to`] named has gone by.
    pub fn trickle_started(&self) -> bool {
        self.state.trickle.lock().unwrap().is_none()
    }

    /// Whether a call of the polling connection is held unanswered.
    pub fn poll_held(&self) -> bool {
        self.state.held.load(Ordering::Relaxed) > 0
    }
}

/// Arms holds on a [`Proxy`] (see [`Proxy::holds`]).
pub struct Holds(Arc<State>);

impl Holds {
    /// As [`Proxy::hold_for`]; holds armed together wait each for its own
    /// call.
    pub fn hold_for(&self, bytes: &[u8], then: impl FnOnce() + Send + 'static) {
        self.0
            .hold_for
            .lock()
            .unwrap()
            .push((bytes.to_vec(), Box::new(then)));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `client`'s commands to `server` (this thread) and the replies
/// back (another), until either side ends or the fault cuts them.
fn relay(mut client: TcpStream, mut server: TcpStream, state: &State) {
    let (mut from_server, mut to_client) =
        (server.try_clone().unwrap(), client.try_clone().unwrap());
    let cut = Arc::new(AtomicBool::new(false));
    let cut_answer = cut.clone();
    // Nanoseconds between the answers' bytes; 0: as they come.
    let gap = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let gap_answer = gap.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        'copy: while let Ok(n @ 1..) = from_server.read(&mut buf) {
            if cut_answer.load(Ordering::Relaxed) {
                break;
            }
            let gap = Duration::from_nanos(gap_answer.load(Ordering::Relaxed));
            if gap.is_zero() {
                if to_client.write_all(&buf[..n]).is_err() {
                    break;
                }
                continue;
            }
            for b in &buf[..n] {
                std::thread::sleep(gap);
                if to_client.write_all(std::slice::from_ref(b)).is_err() {
                    break 'copy;
                }
            }
        }
        let _ = to_client.shutdown(Shutdown::Both);
        let _ = from_server.shutdown(Shutdown::Both);
    });
    let mut polls = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.fault.load(Ordering::Relaxed) {
            if polls {
                // Taken, never answered: the caller waits out its deadline.
                state.held.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            break;
        }
        polls |= buf[..n].windows(5).any(|w| w == b"XREAD");
        if !polls && state.cut_links.load(Ordering::Relaxed) {
            break;
        }
        let carries = |b: &mut Vec<u8>| buf[..n].windows(b.len()).any(|w| w == b.as_slice());
        if state.lose.lock().unwrap().take_if(carries).is_some() {
            cut.store(true, Ordering::Relaxed);
        }
        if let Some((_, every)) = state.trickle.lock().unwrap().take_if(|(b, _)| carries(b)) {
            gap.store(every.as_nanos() as u64, Ordering::Relaxed);
        }
        let mut flush = state.flush_before.lock().unwrap();
        if flush.as_mut().is_some_and(carries) {
            let mut redis = TcpStream::connect(("127.0.0.1", state.to)).unwrap();
            redis.write_all(b"FLUSHALL\r\n").unwrap();
            let mut ok = [0u8; 5];
            redis.read_exact(&mut ok).unwrap();
            assert_eq!(&ok, b"+OK\r\n");
            // Flushed: only now does the test see it done.
            *flush = None;
        }
        drop(flush);
        let held = {
            let mut holds = state.hold_for.lock().unwrap();
            let at = holds.iter_mut().position(|(b, _)| carries(b));
            at.map(|i| holds.remove(i))
        };
        if let Some((_, then)) = held {
            then();
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}
