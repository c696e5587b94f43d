//! clio-frame: the frame path of clio-relay without any I/O.
//!
//! Everything the relay does to a WebSocket frame on its way through lives
//! here, as plain functions over byte slices, so it can be tested at every
//! chunk size, fuzzed and benchmarked alone:
//! - [`frame`]: frame headers (RFC 6455 §5.2), parsed and written in place.
//! - [`mask`]: in-place re-masking (§5.3) and a source of fresh mask keys.
//! - [`scanner`]: [`scanner::FrameScanner`], which walks frames where they lie
//!   in a read buffer across reads and re-masks client frames in place.
//! - [`utf8`]: UTF-8 checked in pieces, for either side's text messages.
//!
//! The relay's pumps (`clio_relay::dataplane::pump`) own the sockets and the
//! buffers; they hand each read to the scanner and forward what it reports
//! ready.

#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod frame;
pub mod mask;
pub mod scanner;
pub mod utf8;
