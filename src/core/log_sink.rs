//! The process's log lines, written to stderr by a thread of their own.
//!
//! A thread that logs (a shard at a refused request, the admin thread at a
//! change) only queues its line: a `write(2)` to stderr blocks while the
//! pipe or socket behind it is full, and that is what a stalled journald
//! or a log shipper that stopped reading looks like. Written by the
//! thread that logged, one such line stopped a shard and every stream on
//! it until the reader came back. Here the `clio-log` thread waits
//! instead, and the queue is bounded ([`MAX_LINES`], [`MAX_BYTES`]): a
//! line that does not fit is dropped and counted
//! (`clio_relay_log_lines_dropped_total`), and so is one stderr refuses
//! (EPIPE, its reader gone). Once the queue is written out after a drop,
//! one WARN says how many lines were lost.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Lines waiting to be written, at most.
pub const MAX_LINES: usize = 4096;
/// Bytes of lines waiting to be written, at most.
pub const MAX_BYTES: usize = 1 << 20;

/// What the threads that log and the writer share.
#[derive(Debug, Default)]
struct Counts {
    /// Lines queued and not yet written (the one being written included).
    lines: AtomicUsize,
    /// Their bytes.
    bytes: AtomicUsize,
    /// Lines lost: not queued (the queue was full) or refused by the output.
    dropped: AtomicU64,
}

/// A bounded queue of log lines and the thread that writes them; the
/// `MakeWriter` of the process's subscriber.
#[derive(Debug)]
pub struct LogSink {
    /// The queue's sending side (no lock: every thread that logs sends).
    tx: Sender<Vec<u8>>,
    counts: Arc<Counts>,
    max_lines: usize,
    max_bytes: usize,
}

impl LogSink {
    /// Starts the `clio-log` thread writing to `out`, with a queue of at
    /// most `max_lines` lines and `max_bytes` bytes.
    pub fn start<W: Write + Send + 'static>(
        out: W,
        max_lines: usize,
        max_bytes: usize,
    ) -> std::io::Result<LogSink> {
        let (tx, rx) = channel();
        let counts = Arc::new(Counts::default());
        let writer = counts.clone();
        // The thread takes no signal: it starts before `run` blocks the
        // ones the main thread waits for, and a SIGTERM the kernel gave
        // it would end the process at once, with no drain.
        let all = nix::sys::signal::SigSet::all();
        let before = all
            .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
            .map_err(std::io::Error::from)?;
        let spawned = std::thread::Builder::new()
            .name("clio-log".into())
            .spawn(move || write_lines(out, rx, &writer));
        before.thread_set_mask().map_err(std::io::Error::from)?;
        spawned?;
        Ok(LogSink {
            tx,
            counts,
            max_lines,
            max_bytes,
        })
    }

    /// Queues one line; false when it was dropped.
    fn queue(&self, line: &[u8]) -> bool {
        let len = line.len();
        let lines = self.counts.lines.fetch_add(1, Relaxed);
        let bytes = self.counts.bytes.fetch_add(len, Relaxed);
        if lines >= self.max_lines || bytes + len > self.max_bytes {
            self.counts.lines.fetch_sub(1, Relaxed);
            self.counts.bytes.fetch_sub(len, Relaxed);
            self.counts.dropped.fetch_add(1, Relaxed);
            return false;
        }
        let sent = self.tx.send(line.to_vec()).is_ok();
        if !sent {
            self.counts.lines.fetch_sub(1, Relaxed);
            self.counts.bytes.fetch_sub(len, Relaxed);
            self.counts.dropped.fetch_add(1, Relaxed);
        }
        sent
    }

    /// Lines lost so far.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Relaxed)
    }

    /// Waits until every line queued is written, at most `within`; whether
    /// they were (at exit: a stalled stderr does not hold the process).
    pub fn flush(&self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while self.counts.lines.load(Relaxed) > 0 {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// The `clio-log` thread: writes each line whole, in order, and says how
/// many were lost once it has caught up after a loss.
fn write_lines<W: Write>(mut out: W, rx: Receiver<Vec<u8>>, counts: &Counts) {
    let mut reported = 0;
    while let Ok(line) = rx.recv() {
        let written = out.write_all(&line).and_then(|()| out.flush()).is_ok();
        if !written {
            counts.dropped.fetch_add(1, Relaxed);
        }
        counts.bytes.fetch_sub(line.len(), Relaxed);
        let left = counts.lines.fetch_sub(1, Relaxed) - 1;
        let dropped = counts.dropped.load(Relaxed);
        // Said only once a line went out (an output that refuses every
        // line would loop on its own report) and the queue is empty.
        if written && left == 0 && dropped > reported {
            reported = dropped;
            tracing::warn!(
                dropped_total = dropped,
                "log lines dropped: stderr did not take them as fast as they came (its reader stalled or gone); clio_relay_log_lines_dropped_total counts them"
            );
        }
    }
}

/// One line on its way into the queue (tracing-subscriber writes an
/// event's line with one `write_all`).
#[derive(Debug)]
pub struct Line<'a>(&'a LogSink);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            self.0.queue(buf);
        }
        // A line dropped is counted, not an error: the subscriber would
        // report it on stderr, the very thing that failed.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

/// The process's sink, once `run` has installed it.
static INSTALLED: OnceLock<LogSink> = OnceLock::new();

/// Installs the process's sink, writing to stderr (the first call starts
/// it; later ones return it).
pub fn install() -> std::io::Result<&'static LogSink> {
    if let Some(sink) = INSTALLED.get() {
        return Ok(sink);
    }
    let sink = LogSink::start(std::io::stderr(), MAX_LINES, MAX_BYTES)?;
    Ok(INSTALLED.get_or_init(|| sink))
}

/// Lines the process's sink has lost (0 without one: the relay run in a
/// test, or a command that writes to stderr itself).
pub fn dropped_total() -> u64 {
    INSTALLED.get().map_or(0, LogSink::dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A pipe's ends, neither inherited by a child.
    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (r.into(), w.into())
    }

    /// The output stalled (a pipe full and unread): lines past the bound
    /// are dropped and counted at once, the ones queued are written in
    /// order once the reader reads again, and nothing waits meanwhile.
    #[test]
    fn lines_past_the_bound_are_dropped_while_the_output_is_stalled() {
        let (mut read, mut write) = pipe();
        let size = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&write),
            nix::fcntl::FcntlArg::F_GETPIPE_SZ,
        )
        .unwrap();
        write.write_all(&vec![b'x'; size as usize]).unwrap();
        let sink = LogSink::start(write, 4, 1 << 20).unwrap();
        use tracing_subscriber::fmt::MakeWriter;
        for i in 0..10 {
            sink.make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        assert_eq!(sink.dropped(), 6);
        assert!(!sink.flush(Duration::from_millis(1)));

        let mut got = Vec::new();
        let want = b"line 0\nline 1\nline 2\nline 3\n";
        let mut buf = [0u8; 65536];
        while !got.ends_with(want) {
            let n = read.read(&mut buf).unwrap();
            assert!(n > 0, "the pipe closed");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), size as usize + want.len());
        assert!(sink.flush(Duration::from_secs(10)));
        assert_eq!(sink.dropped(), 6);
    }

    /// A line larger than the bytes the queue may hold is dropped; a line
    /// the output refuses (EPIPE) is counted as dropped, and the writer
    /// goes on.
    #[test]
    fn a_line_too_large_or_refused_is_counted() {
        let (read, write) = pipe();
        let sink = LogSink::start(write, 16, 64).unwrap();
        use tracing_subscriber::fmt::MakeWriter;
        sink.make_writer().write_all(&[b'y'; 65]).unwrap();
        assert_eq!(sink.dropped(), 1);
        drop(read);
        sink.make_writer().write_all(b"to no one\n").unwrap();
        assert!(sink.flush(Duration::from_secs(10)));
        assert_eq!(sink.dropped(), 2);
    }
}
