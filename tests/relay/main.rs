//! End-to-end tests: a real relay, a real fake Soniox and real WebSocket
//! clients on 127.0.0.1, all speaking the real protocol.

mod util;

mod auth;
mod keys_api;
mod reload;
mod streaming;
