//! The response parser, with no I/O: bytes go in as they arrive
//! ([`Parser::push`], then [`Parser::eof`] at the close), a [`Response`]
//! comes out. The head is parsed with httparse; the body is framed by
//! `Transfer-Encoding: chunked`, else `Content-Length`, else the close
//! (RFC 9112 §6.3), with no body for 1xx, 204, 304 and `HEAD`. Interim
//! 1xx answers (100 Continue) are skipped.

use super::{Error, MAX_HEAD};

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// Header lines in order (values as text, lossily).
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossily).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// Bytes of a `Content-Length` body still to come.
    Length(usize),
    ChunkSize,
    /// Bytes of the current chunk still to come.
    ChunkData(usize),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines, up to the empty line.
    Trailers,
    /// The body ends with the connection.
    Close,
    Done,
}

/// The parser of one answer.
#[derive(Debug)]
pub struct Parser {
    /// Bytes received and not yet consumed.
    raw: Vec<u8>,
    state: State,
    head_request: bool,
    max_body: usize,
    /// Head bytes seen (status line, headers, trailers), for the bound.
    head_bytes: usize,
    got_bytes: bool,
    response: Response,
}

impl Parser {
    /// A parser for the answer to a request with `method`, refusing a
    /// body over `max_body` bytes.
    pub fn new(method: &str, max_body: usize) -> Parser {
        Parser {
            raw: Vec::new(),
            state: State::Head,
            head_request: method.eq_ignore_ascii_case("HEAD"),
            max_body,
            head_bytes: 0,
            got_bytes: false,
            response: Response {
                status: 0,
                reason: String::new(),
                headers: Vec::new(),
                body: Vec::new(),
            },
        }
    }

    /// Whether the answer is complete (read no more).
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds bytes as they arrive.
    pub fn push(&mut self, data: &[u8]) -> Result<(), Error> {
        if self.state == State::Done {
            return Ok(());
        }
        self.got_bytes |= !data.is_empty();
        self.raw.extend_from_slice(data);
        self.advance()
    }

    /// The connection closed: ends a close-delimited body, or tells what
    /// is missing.
    pub fn eof(&mut self) -> Result<(), Error> {
        match self.state {
            State::Done => Ok(()),
            State::Close => {
                self.state = State::Done;
                Ok(())
            }
            State::Head if !self.got_bytes => Err(Error::NoAnswer),
            State::Head => Err(Error::Malformed("the connection closed mid-head".into())),
            _ => Err(Error::Truncated),
        }
    }

    /// The answer, once [`done`](Self::done).
    pub fn finish(self) -> Result<Response, Error> {
        if self.state == State::Done {
            Ok(self.response)
        } else {
            Err(Error::Truncated)
        }
    }

    fn body_room(&self, more: usize) -> Result<(), Error> {
        if self.response.body.len().saturating_add(more) > self.max_body {
            Err(Error::TooLarge("body", self.max_body))
        } else {
            Ok(())
        }
    }

    fn advance(&mut self) -> Result<(), Error> {
        loop {
            match self.state {
                State::Head => {
                    if !self.parse_head()? {
                        return Ok(());
                    }
                }
                State::Length(left) => {
                    let n = left.min(self.raw.len());
                    self.response.body.extend_from_slice(&self.raw[..n]);
                    self.raw.drain(..n);
                    self.state = if n == left {
                        State::Done
                    } else {
                        State::Length(left - n)
                    };
                    if self.state != State::Done {
                        return Ok(());
                    }
                }
                State::ChunkSize => {
                    let Some(line) = self.take_line(1024, "chunk size line")? else {
                        return Ok(());
                    };
                    let hex = line.split(|&b| b == b';').next().unwrap_or(&[]);
                    let hex = std::str::from_utf8(hex).unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16)
                        .ok()
                        .filter(|_| !hex.is_empty() && !hex.starts_with('+'))
                        .ok_or_else(|| Error::Malformed("bad chunk size".into()))?;
                    if size == 0 {
                        self.state = State::Trailers;
                    } else {
                        self.body_room(size)?;
                        self.state = State::ChunkData(size);
                    }
                }
                State::ChunkData(left) => {
                    let n = left.min(self.raw.len());
                    self.response.body.extend_from_slice(&self.raw[..n]);
                    self.raw.drain(..n);
                    if n < left {
                        self.state = State::ChunkData(left - n);
                        return Ok(());
                    }
                    self.state = State::ChunkEnd;
                }
                State::ChunkEnd => {
                    if self.raw.len() < 2 {
                        return Ok(());
                    }
                    if &self.raw[..2] != b"\r\n" {
                        return Err(Error::Malformed("no CRLF after a chunk".into()));
                    }
                    self.raw.drain(..2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some(line) = self.take_line(MAX_HEAD, "trailer")? else {
                        return Ok(());
                    };
                    self.head_bytes += line.len() + 2;
                    if self.head_bytes > MAX_HEAD {
                        return Err(Error::TooLarge("head", MAX_HEAD));
                    }
                    if line.is_empty() {
                        self.state = State::Done;
                    }
                }
                State::Close => {
                    self.body_room(self.raw.len())?;
                    self.response.body.append(&mut self.raw);
                    return Ok(());
                }
                State::Done => {
                    self.raw.clear();
                    return Ok(());
                }
            }
        }
    }

    /// One CRLF-ended line from `raw`, without the CRLF; `None` while it
    /// is incomplete.
    fn take_line(&mut self, max: usize, what: &str) -> Result<Option<Vec<u8>>, Error> {
        match self.raw.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                let line = self.raw[..i].to_vec();
                self.raw.drain(..i + 2);
                Ok(Some(line))
            }
            None if self.raw.len() > max => Err(Error::Malformed(format!("{what} too long"))),
            None => Ok(None),
        }
    }

    /// Parses the head if it is complete; true when it was.
    fn parse_head(&mut self) -> Result<bool, Error> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(&self.raw) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if self.head_bytes + self.raw.len() > MAX_HEAD {
                    return Err(Error::TooLarge("head", MAX_HEAD));
                }
                return Ok(false);
            }
            Err(e) => return Err(Error::Malformed(e.to_string())),
        };
        self.head_bytes += n;
        if self.head_bytes > MAX_HEAD {
            return Err(Error::TooLarge("head", MAX_HEAD));
        }
        let status = resp.code.unwrap_or(0);
        let reason = resp.reason.unwrap_or("").to_string();
        let fields: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        self.raw.drain(..n);
        if (100..200).contains(&status) && status != 101 {
            // An interim answer: the real one follows.
            return Ok(true);
        }
        fn header_values<'a>(
            fields: &'a [(String, String)],
            name: &'static str,
        ) -> impl Iterator<Item = &'a str> {
            fields
                .iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        let chunked = header_values(&fields, "transfer-encoding")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .last()
            .map(|c| c.eq_ignore_ascii_case("chunked"));
        let mut length: Option<usize> = None;
        for v in header_values(&fields, "content-length").flat_map(|v| v.split(',')) {
            let v = v.trim();
            let n = v
                .parse::<usize>()
                .ok()
                .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| Error::Malformed("bad Content-Length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Malformed("conflicting Content-Length".into()));
            }
            length = Some(n);
        }
        self.state = if self.head_request || matches!(status, 101 | 204 | 304) {
            State::Done
        } else {
            match (chunked, length) {
                (Some(true), _) => State::ChunkSize,
                // Another coding last: the body runs to the close.
                (Some(false), _) => State::Close,
                (None, Some(n)) => {
                    self.body_room(n)?;
                    if n == 0 {
                        State::Done
                    } else {
                        State::Length(n)
                    }
                }
                (None, None) => State::Close,
            }
        };
        self.response.status = status;
        self.response.reason = reason;
        self.response.headers = fields;
        Ok(true)
    }
}
