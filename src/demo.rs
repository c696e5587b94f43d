//! `clio-relay demo`.

/// Demo flags.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

/// Runs the demo.
pub fn run(_args: &DemoArgs) -> std::io::Result<()> {
    Err(std::io::Error::other("not yet"))
}
