//! The binary's commands and the process they run. `main` parses the
//! command line and calls these; each returns an error it can print.
//!
//! - [`server`]: starting, reloading, draining and stopping a relay.
//! - [`run`]: `clio-relay run`, the relay as a process: signals, systemd.
//! - [`systemd`]: sd_notify and socket activation, written by hand.
//! - [`keys`]: `keys`, the admin API's client for accounts and keys.
//! - `demo` (with the `demo` feature, on by default): `clio-relay demo`, a
//!   relay and a local fake Soniox in one process.
//! - this module: the helpers behind `check-config` and `mint-token`, kept
//!   in the library so they are tested here and `main` stays a thin shell.

#[cfg(feature = "demo")]
pub mod demo;
pub mod keys;
pub mod run;
pub mod server;
pub mod systemd;

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::core::config::{Config, ConfigError};
use crate::core::token::TokenKeys;

/// Why a command failed. Each kind has its own exit status, so scripts and
/// systemd can tell them apart (README, "Exit status"); the message never
/// holds a key, a secret or a token.
#[derive(Debug)]
pub enum CliError {
    /// Exit 1: the command started and then failed (the relay stopped on an
    /// error, the demo's streams failed, a socket systemd passed was wrong).
    Failed(String),
    /// Exit 2: the command line asks for something that cannot be done.
    Usage(String),
    /// Exit 3: the configuration file is missing, unreadable or invalid.
    Config(String),
    /// Exit 4: a port the relay needs is taken (another relay, most likely).
    PortInUse(String),
    /// Exit 5: `keys`: the relay's admin API could not be reached.
    AdminUnreachable(String),
    /// Exit 6: `keys`: the admin API answered, and refused the request.
    AdminRefused(String),
}

impl CliError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Config(_) => 3,
            CliError::PortInUse(_) => 4,
            CliError::AdminUnreachable(_) => 5,
            CliError::AdminRefused(_) => 6,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Failed(m)
            | CliError::Usage(m)
            | CliError::Config(m)
            | CliError::PortInUse(m)
            | CliError::AdminUnreachable(m)
            | CliError::AdminRefused(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CliError {}

/// The problems of the config file at `path`, one line each, each naming
/// the file (`relay.toml: tokens: secret_env X is not set`), as every
/// command that reads it prints them: exit 3.
pub fn config_error(path: &Path, e: &ConfigError) -> CliError {
    let mut lines: Vec<String> = e
        .problems
        .iter()
        .map(|p| format!("{}: {p}", path.display()))
        .collect();
    if e.unset_env {
        lines.push(UNSET_ENV_HINT.to_string());
    }
    CliError::Config(lines.join("\n"))
}

/// Said once under the problems when one is a `*_env` variable not set
/// or empty: what to do about it, in a shell and under the shipped unit.
pub const UNSET_ENV_HINT: &str =
    "(a *_env setting names a variable of the relay's own environment, read when it starts: \
     export it in the shell that runs the command; under systemd, give the secret as a \
     credential instead (LoadCredential=) and name it with the matching *_file setting; \
     README, \"Running under systemd\")";

/// A start-up failure that is the configuration's (a master key that
/// does not open the key store): carried in an `io::Error` from the
/// server's start, and exit 3 like an invalid file, so systemd's
/// `RestartPreventExitStatus=3 4` does not retry it.
#[derive(Debug)]
pub struct ConfigFault(pub String);

impl std::fmt::Display for ConfigFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigFault {}

impl From<std::io::Error> for CliError {
    /// A port taken is [`CliError::PortInUse`], a [`ConfigFault`] is
    /// [`CliError::Config`]; any other I/O failure is [`CliError::Failed`].
    fn from(e: std::io::Error) -> Self {
        if let Some(fault) = e.get_ref().and_then(|i| i.downcast_ref::<ConfigFault>()) {
            return CliError::Config(fault.0.clone());
        }
        if e.kind() == std::io::ErrorKind::AddrInUse {
            CliError::PortInUse(e.to_string())
        } else {
            CliError::Failed(e.to_string())
        }
    }
}

/// `check-config`: loads and validates the file, returns the summary to print.
/// On error, print the [`ConfigError`] (one line per problem) and exit 1.
pub fn check_config(path: &Path) -> Result<String, ConfigError> {
    Config::load(path).map(|c| c.summary())
}

/// `mint-token`: one session token for `device`, valid for `ttl` (default
/// `tokens.default_ttl`; more than `tokens.max_ttl` is an error).
///
/// Only `[tokens]` is resolved (the file must still parse, with no unknown
/// keys): minting needs the token secret, not the Soniox keys, which an
/// operator's shell often cannot read.
pub fn mint_token(
    path: &Path,
    device: &str,
    ttl: Option<Duration>,
) -> Result<String, Box<dyn std::error::Error>> {
    mint_token_for(path, device, None, &[], ttl)
}

/// `mint-token --tier NAME`: like [`mint_token`], for a device tier; the
/// tier must exist in `[devices.tier.NAME]`.
pub fn mint_token_with_tier(
    path: &Path,
    device: &str,
    tier: &str,
    ttl: Option<Duration>,
) -> Result<String, Box<dyn std::error::Error>> {
    mint_token_for(path, device, Some(tier), &[], ttl)
}

/// `mint-token [--tier NAME] [--pool NAME]...`: a token for `device`, for
/// the accounts of `pools` only. Each pool must be declared in the file.
/// With no `--pool`, the token is for the default pool, or, when
/// `tokens.pools` binds the secret to exactly one pool, for that one. A
/// secret bound to pools refuses to mint for any other (the relay refuses
/// such a token too).
pub fn mint_token_for(
    path: &Path,
    device: &str,
    tier: Option<&str>,
    pools: &[String],
    ttl: Option<Duration>,
) -> Result<String, Box<dyn std::error::Error>> {
    let (tokens, tiers) = Config::load_minting(path)?;
    if let Some(tier) = tier.filter(|t| !tiers.iter().any(|known| known == t)) {
        return Err(format!("no [devices.tier.{tier}] in {}", path.display()).into());
    }
    let ttl = ttl.unwrap_or(tokens.default_ttl);
    if ttl > tokens.max_ttl {
        let max = humantime::format_duration(tokens.max_ttl);
        return Err(format!(
            "--ttl {} is longer than tokens.max_ttl {max}, and the relay refuses a token that \
             lives longer: give a --ttl of at most {max}, or raise tokens.max_ttl in {}",
            humantime::format_duration(ttl),
            path.display()
        )
        .into());
    }
    for pool in pools {
        if !tokens.known_pools.contains(pool) {
            return Err(format!(
                "--pool {pool}: no such pool in {} (pools: {})",
                path.display(),
                tokens.known_pools.join(", ")
            )
            .into());
        }
    }
    let pools: Vec<String> = match (&tokens.pools, pools) {
        (Some(bound), []) if bound.len() == 1 => bound.clone(),
        (Some(bound), []) if !bound.iter().any(|b| b == crate::core::config::DEFAULT_POOL) => {
            return Err(format!(
                "tokens.pools binds the token secret to pools {}: name one with --pool",
                bound.join(", ")
            )
            .into())
        }
        (Some(bound), asked) if !asked.iter().all(|p| bound.contains(p)) => {
            return Err(format!(
                "tokens.pools binds the token secret to pools {}: it cannot mint a token for {}",
                bound.join(", "),
                asked
                    .iter()
                    .filter(|p| !bound.contains(p))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
            .into())
        }
        (_, asked) => asked.to_vec(),
    };
    let keys = TokenKeys::from_config(&tokens);
    Ok(keys.mint_in(device, tier, &pools, ttl, SystemTime::now())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::UNIX_EPOCH;

    const SECRET: &str = "cli-test-secret-0123456789-0123456789";

    /// Writes a config whose secrets live in files beside it.
    fn write_config(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clio-relay-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token-secret"), format!("{SECRET}\n")).unwrap();
        std::fs::write(dir.join("key"), "cli-test-soniox-key\n").unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            "[tokens]\nsecret_file = \"token-secret\"\ndefault_ttl = \"10m\"\nmax_ttl = \"1h\"\n\
             [[account]]\nid = \"acc-1\"\nkey_file = \"key\"\nregion = \"eu\"\n",
        )
        .unwrap();
        path
    }

    #[test]
    fn check_config_summarises() {
        let path = write_config("check");
        let s = check_config(&path).unwrap();
        assert!(s.contains("acc-1: region eu, enabled"), "{s}");
        assert!(
            !s.contains(SECRET) && !s.contains("cli-test-soniox-key"),
            "{s}"
        );
        let err = check_config(&path.with_file_name("absent.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1);
    }

    #[test]
    fn mint_token_uses_config_ttls() {
        let path = write_config("mint");
        let keys = TokenKeys::new(
            &crate::core::secret::Secret::new(SECRET),
            None,
            Duration::ZERO,
        );
        let tok = mint_token(&path, "phone-7", None).unwrap();
        let c = keys.verify(&tok, SystemTime::now()).unwrap();
        assert_eq!(c.device_id, "phone-7");
        assert_eq!(c.expires_at - c.issued_at, 600);
        assert!(
            c.issued_at
                <= SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
        );

        let tok = mint_token(&path, "phone-7", Some(Duration::from_secs(3600))).unwrap();
        let c = keys.verify(&tok, SystemTime::now()).unwrap();
        assert_eq!(c.expires_at - c.issued_at, 3600);

        let err = mint_token(&path, "phone-7", Some(Duration::from_secs(3601))).unwrap_err();
        assert!(err.to_string().contains("tokens.max_ttl"), "{err}");
        let err = mint_token(&path, "bad device", None).unwrap_err();
        assert!(err.to_string().contains("device id"), "{err}");
        assert!(!err.to_string().contains(SECRET));
    }

    #[test]
    fn mint_token_names_pools_and_a_bound_secret_refuses_others() {
        let path = write_config("pools");
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "max_ttl = \"1h\"\n",
            "max_ttl = \"1h\"\npools = [\"dev\"]\n\
             [pool.dev]\nurl = \"ws://127.0.0.1:7301/x\"\n\
             [pool.prod]\nurl = \"ws://127.0.0.1:7302/x\"\n",
        );
        std::fs::write(&path, &text).unwrap();
        let keys = TokenKeys::new(
            &crate::core::secret::Secret::new(SECRET),
            None,
            Duration::ZERO,
        );
        let pools = |tok: &str| keys.verify(tok, SystemTime::now()).unwrap().pools;
        // One bound pool: it is the default of a token minted without --pool.
        assert_eq!(pools(&mint_token(&path, "phone-7", None).unwrap()), ["dev"]);
        let dev = ["dev".to_string()];
        let tok = mint_token_for(&path, "phone-7", None, &dev, None).unwrap();
        assert_eq!(pools(&tok), dev);
        let err = mint_token_for(&path, "phone-7", None, &["prod".into()], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tokens.pools binds the token secret to pools dev: it cannot mint a token for prod"
        );
        let err = mint_token_for(&path, "phone-7", None, &["default".into()], None).unwrap_err();
        assert!(
            err.to_string().contains("cannot mint a token for default"),
            "{err}"
        );
        let err = mint_token_for(&path, "phone-7", None, &["eu".into()], None).unwrap_err();
        assert!(
            err.to_string().contains("--pool eu: no such pool in")
                && err.to_string().ends_with("(pools: default, dev, prod)"),
            "{err}"
        );
        // Unbound: any declared pool, several at once.
        std::fs::write(&path, text.replace("pools = [\"dev\"]\n", "")).unwrap();
        let both = ["prod".to_string(), "dev".to_string()];
        let tok = mint_token_for(&path, "phone-7", None, &both, None).unwrap();
        assert_eq!(pools(&tok), both);
        assert_eq!(
            pools(&mint_token(&path, "phone-7", None).unwrap()),
            ["default"]
        );
    }

    #[test]
    fn mint_token_needs_no_account_keys() {
        let path = write_config("nokeys");
        std::fs::remove_file(path.with_file_name("key")).unwrap();
        assert!(check_config(&path).is_err());
        assert!(mint_token(&path, "phone-7", None).is_ok());
        // But the file must still be a valid file, and [tokens] valid.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}typo = 1\n")).unwrap();
        let err = mint_token(&path, "phone-7", None).unwrap_err();
        assert!(err.to_string().contains("unknown field `typo`"), "{err}");
        std::fs::write(&path, text.replace("max_ttl = \"1h\"", "max_ttl = \"5m\"")).unwrap();
        let err = mint_token(&path, "phone-7", None).unwrap_err();
        assert!(err.to_string().contains("tokens.default_ttl"), "{err}");
    }

    #[test]
    fn mint_token_for_a_tier_needs_no_account_keys() {
        let path = write_config("tierkeys");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!("{text}[devices.tier.pro]\nmax_concurrent_streams = 3\n"),
        )
        .unwrap();
        std::fs::remove_file(path.with_file_name("key")).unwrap();
        assert!(check_config(&path).is_err());
        let keys = TokenKeys::new(
            &crate::core::secret::Secret::new(SECRET),
            None,
            Duration::ZERO,
        );
        let tok = mint_token_with_tier(&path, "phone-8", "pro", None).unwrap();
        let c = keys.verify(&tok, SystemTime::now()).unwrap();
        assert_eq!(c.tier.as_deref(), Some("pro"));
        let err = mint_token_with_tier(&path, "phone-8", "gold", None).unwrap_err();
        assert!(err.to_string().contains("no [devices.tier.gold]"), "{err}");
    }

    #[test]
    fn mint_token_bad_device() {
        let path = write_config("baddev");
        let err = mint_token(&path, "bad device", None).unwrap_err();
        assert!(err.to_string().contains("device id"), "{err}");
        assert!(!err.to_string().contains(SECRET));
    }

    /// `mint-token --ttl` uses the config file's duration parser.
    #[test]
    fn parse_duration_matches_config_syntax() {
        use crate::core::config::parse_duration;
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("15x").is_err());
    }
}
