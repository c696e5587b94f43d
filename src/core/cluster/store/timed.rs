//! The cluster thread's connection to Redis, whose pipelines read their
//! replies against one `cluster.timeout` deadline.

use std::time::{Duration, Instant};

use redis::Value;

/// The cluster thread's connection: a pipeline's replies share one
/// `cluster.timeout` deadline, and the first that fails ends the call.
/// (The client's own pipeline read every reply with the full timeout
/// each, and went on reading after one timed out: a Redis that stopped
/// answering held the thread for as many timeouts as the pipeline had
/// commands, 4 for a poll and up to 256 for a batch of stream opens,
/// while the node still counted the store as up.)
pub(super) struct Timed {
    pub(super) con: redis::Connection,
    pub(super) timeout: Duration,
}

impl redis::ConnectionLike for Timed {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<Value> {
        self.con.req_packed_command(cmd)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        let deadline = Instant::now() + self.timeout;
        self.con.send_packed_command(cmd)?;
        let mut out = Vec::with_capacity(count);
        let mut read = || {
            for i in 0..offset + count {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(redis::RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )));
                }
                self.con.set_read_timeout(Some(left))?;
                let v = self.con.recv_response()?;
                if i >= offset {
                    out.push(v);
                }
            }
            Ok(())
        };
        let r = read();
        // The connection is dropped after a failure; after a success the
        // next single command has the whole timeout again.
        self.con.set_read_timeout(Some(self.timeout))?;
        r.map(|()| out)
    }

    fn get_db(&self) -> i64 {
        self.con.get_db()
    }

    fn check_connection(&mut self) -> bool {
        self.con.check_connection()
    }

    fn is_open(&self) -> bool {
        self.con.is_open()
    }
}
