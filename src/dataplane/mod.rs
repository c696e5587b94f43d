//! The data plane: the streaming path, run by one shard per core.
//!
//! The frame path:
//! - [`pump`]: the two loops that move a stream's frames (the in-place
//!   scanning and re-masking is `clio_frame`'s).
//! - [`io`]: connections, the shared duplex wrapper, pooled read buffers.
//! - [`uring`]: the data plane's own io_uring per shard: every stream socket
//!   registered once (multishot poll), completions dispatched in batches.
//!
//! A stream's life:
//! - [`listen`]: binding the ports; a second relay cannot join them by mistake.
//! - [`accept`]: accept loops that survive errors; the file limit, said plainly.
//! - [`proxy_header`]: the PROXY protocol header a trusted balancer sends
//!   first, with the client's address.
//! - [`shard`]: one executor per core: listener, live streams, control messages.
//! - [`session`]: one stream: upgrade, token, first message, account, pumps, end.
//! - [`log_budget`]: lines a peer repeats (refusals, upstream connect
//!   failures), logged one by one up to a budget, then counted.
//! - [`unauth`]: the bounded pool of connections waiting for a first-message token.
//! - [`http`]: the HTTP/1.1 edge: request heads, upgrades, JSON errors.
//! - [`upstream`]: TCP, TLS and the WebSocket client upgrade to Soniox.
//! - [`turns`]: TLS handshakes take the shard's time its streams leave,
//!   and a bounded share of the rest.
//! - [`fleet_link`]: a shard's own connection to the fleet's store, for
//!   stream opens without waking the cluster thread.

pub mod accept;
pub mod buf;
pub mod fleet_link;
pub mod http;
pub mod io;
pub mod listen;
pub mod log_budget;
pub mod process;
pub mod proxy_header;
pub mod pump;
pub mod session;
pub mod shard;
pub mod turns;
pub mod unauth;
pub mod upstream;
pub mod uring;
