//! The `clio-relay` binary as an operator meets it, run as a program on
//! real files and real sockets. (`relay-load` and `fake-soniox` test their
//! own in `tools/*/tests/cli.rs`.)

mod util;

mod command_line;
mod log_sink;
mod refused;
mod running;
mod slow_disk;
mod warnings;
