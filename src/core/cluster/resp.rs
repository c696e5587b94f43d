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
    value(buf, 0, 0)
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

fn value(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, NotResp> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(end) = line_end(buf, at) else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(end)),
        b'$' => {
            let n = number(buf, at, end)?;
            if n < 0 {
                return Ok(Some(end));
            }
            let next = end + n as usize + 2;
            Ok((buf.len() >= next).then_some(next))
        }
        b'*' if depth < MAX_DEPTH => {
            let n = number(buf, at, end)?;
            let mut p = end;
            for _ in 0..n.max(0) {
                match value(buf, p, depth + 1)? {
                    Some(q) => p = q,
                    None => return Ok(None),
                }
            }
            Ok(Some(p))
        }
        _ => Err(NotResp),
    }
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

    #[test]
    fn bytes_that_are_not_resp_are_an_error() {
        assert_eq!(reply_len(b"HTTP/1.1 200 OK\r\n"), Err(NotResp));
        assert_eq!(reply_len(b"$x\r\n"), Err(NotResp));
        assert_eq!(reply_len(b"$3\n"), Err(NotResp));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(reply_len(deep.as_bytes()), Err(NotResp));
    }
}
