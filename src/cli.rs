//! Helpers behind the `check-config` and `mint-token` subcommands, kept in
//! the library so they are tested here and `main` stays a thin shell.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::{Config, ConfigError};
use crate::token::TokenKeys;

/// `check-config`: loads and validates the file, returns the summary to print.
/// On error, print the [`ConfigError`] (one line per problem) and exit 1.
pub fn check_config(path: &Path) -> Result<String, ConfigError> {
    Config::load(path).map(|c| c.summary())
}

/// `mint-token`: one session token for `device`, valid for `ttl` (default
/// `tokens.default_ttl`; more than `tokens.max_ttl` is an error).
pub fn mint_token(
    path: &Path,
    device: &str,
    ttl: Option<Duration>,
) -> Result<String, Box<dyn std::error::Error>> {
    let config = Config::load(path)?;
    let tokens = &config.tokens;
    let ttl = ttl.unwrap_or(tokens.default_ttl);
    if ttl > tokens.max_ttl {
        return Err(format!(
            "--ttl {} is longer than tokens.max_ttl {}",
            humantime::format_duration(ttl),
            humantime::format_duration(tokens.max_ttl)
        )
        .into());
    }
    let keys = TokenKeys::from_config(tokens);
    Ok(keys.mint(device, ttl, SystemTime::now())?)
}

/// Parses a duration for a command-line flag (clap `value_parser`), in the
/// same syntax as the config file: `500ms`, `5s`, `15m`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}
