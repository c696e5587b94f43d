//! Where one Redis reply ends in a stream of bytes, so a shard's own
//! connection can take pipelined replies one by one as they arrive (the
//! `redis` crate parses a complete reply; it cannot say how long a partial
//! one is). RESP2 only: the link never asks for RESP3.

/// Deepest nesting of arrays a reply may have (ours have two levels).
const MAX_DEPTH: usize = 8;

/// Why bytes are not a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotResp;

/// The length of the first complete reply in `buf`; `None` while more
/// bytes are needed.
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, NotResp> {
    Scan::default().end(buf)
}

/// Where the first reply in a buffer that grows as its bytes come in
/// ends, read once: each call goes on from where the last stopped, so a
/// reply of many elements that comes in many reads is read through once,
/// not once per read (a revocation set of 100,000 ids in 16 KiB reads
/// took most of `cluster.timeout` scanned again at each).
#[derive(Debug, Default)]
pub struct Scan {
    /// Where the next value starts.
    at: usize,
    /// For each array opened and not yet whole, its elements still to come.
    open: Vec<i64>,
}

impl Scan {
    /// The length of the first complete reply in `buf` (the bytes of the
    /// last call and maybe more, never others); `None` while more bytes
    /// are needed. Once it has the length, it starts over for the next
    /// reply, at the start of the buffer the caller then gives.
    pub fn end(&mut self, buf: &[u8]) -> Result<Option<usize>, NotResp> {
        loop {
            let at = self.at;
            let Some(&kind) = buf.get(at) else {
                return Ok(None);
            };
            let Some(end) = line_end(buf, at) else {
                return Ok(None);
            };
            self.at = match kind {
                b'+' | b'-' | b':' => end,
                b'$' => {
                    let n = number(buf, at, end)?;
                    if n < 0 {
                        end
                    } else {
                        let next = end + n as usize + 2;
                        if buf.len() < next {
                            return Ok(None);
                        }
                        next
                    }
                }
                b'*' if self.open.len() < MAX_DEPTH => {
                    let n = number(buf, at, end)?;
                    self.at = end;
                    if n > 0 {
                        self.open.push(n);
                        continue;
                    }
                    end
                }
                _ => return Err(NotResp),
            };
            // A value is whole: it may be the last of the arrays around it.
            loop {
                match self.open.last_mut() {
                    None => {
                        let len = self.at;
                        *self = Scan::default();
                        return Ok(Some(len));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }
}

/// The index just past the `\r\n` that ends the line starting at `at`.
fn line_end(buf: &[u8], at: usize) -> Option<usize> {
    memchr::memchr(b'\n', &buf[at..]).map(|i| at + i + 1)
}

/// The number on the header line `buf[at..end]` (after its type byte).
fn number(buf: &[u8], at: usize, end: usize) -> Result<i64, NotResp> {
    let digits = buf
        .get(at + 1..end - 2)
        .filter(|_| buf[end - 2] == b'\r')
        .ok_or(NotResp)?;
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(NotResp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_each_kind_of_reply() {
        for reply in [
            &b"+OK\r\n"[..],
            b"-NOSCRIPT No matching script\r\n",
            b":42\r\n",
            b"$5\r\nhello\r\n",
            b"$-1\r\n",
            b"*2\r\n$2\r\nok\r\n:0\r\n",
            b"*2\r\n$7\r\nrefused\r\n$10\r\nconcurrent\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*2\r\n*1\r\n:1\r\n$0\r\n\r\n",
        ] {
            let mut two = reply.to_vec();
            two.extend_from_slice(b":7\r\n");
            assert_eq!(reply_len(&two), Ok(Some(reply.len())), "{reply:?}");
            // Every cut short of the end asks for more.
            for cut in 0..reply.len() {
                assert_eq!(reply_len(&reply[..cut]), Ok(None), "{reply:?} cut at {cut}");
            }
            // And the redis crate reads what it delimits.
            redis::parse_redis_value(&two[..reply.len()]).unwrap();
        }
    }

    /// A reply read as its bytes come in, however they are cut, ends
    /// where it ends read whole, and the scan then starts on the next.
    #[test]
    fn a_scan_goes_on_where_it_stopped() {
        let mut replies = b"*3\r\n*2\r\n$1\r\n5\r\n$1\r\n1\r\n*0\r\n*3\r\n".to_vec();
        for id in ["abcd", "ef", ""] {
            replies.extend_from_slice(format!("${}\r\n{id}\r\n", id.len()).as_bytes());
        }
        let first = replies.len();
        replies.extend_from_slice(b"+OK\r\n");
        for step in 1..=replies.len() {
            let mut scan = Scan::default();
            let mut have = 0;
            let got = loop {
                have = (have + step).min(replies.len());
                if let Some(n) = scan.end(&replies[..have]).unwrap() {
                    break n;
                }
            };
            assert_eq!(got, first, "pieces of {step}");
            assert_eq!(scan.end(&replies[first..]), Ok(Some(5)), "pieces of {step}");
        }
    }

    #[test]
    fn bytes_that_are_not_resp_are_an_error() {
        assert_eq!(reply_len(b"HTTP/1.1 200 OK\r\n"), Err(NotResp));
        assert_eq!(reply_len(b"$x\r\n"), Err(NotResp));
        assert_eq!(reply_len(b"$3\n"), Err(NotResp));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(reply_len(deep.as_bytes()), Err(NotResp));
    }
}
