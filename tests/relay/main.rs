//! End-to-end tests: a real relay, a real fake Soniox and real WebSocket
//! clients on 127.0.0.1, all speaking the real protocol.

mod util;

mod accounts;
mod admin;
mod admin_validation;
mod alerts;
mod auth;
mod certs;
mod clients;
mod contract;
mod devices;
mod drain;
mod endings;
mod errors;
mod failover;
mod handover;
mod heads;
mod health;
mod key_age;
mod keys_api;
mod metrics;
mod pool_limits;
mod pools;
mod ports;
mod proxy_protocol;
mod redaction;
mod refusals;
mod reload;
mod resume;
mod shards;
mod slow_clients;
mod sockets;
mod streaming;
mod timeouts;
mod tls;
mod unauthenticated;
mod upstream_fault;
mod usage;
mod watchdog;
