//! The `clio-relay` binary: parse flags, call into the library, map errors
//! to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};
use clio_relay::cli::CliError;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Relay between Clio clients and Soniox real-time transcription: devices
/// connect with short-lived session tokens; Soniox API keys stay here.
///
/// `clio-relay --config FILE` with no command runs the relay (`run`).
#[derive(Parser, Debug)]
#[command(name = "clio-relay", version, about, long_about, after_help = EXIT_STATUS)]
struct Cli {
    /// The relay's TOML config file (see config/example.toml): with no
    /// command, the one `run` serves; before a command, that command's
    /// (each command that reads one takes its own --config too).
    #[arg(long, short = 'c', value_name = "FILE", action = ArgAction::Append)]
    config: Vec<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// What each exit status means (README's table; `CliError::exit_code`).
const EXIT_STATUS: &str = "\
Exit status:
  0  done (run: stopped by SIGTERM or SIGINT)
  1  the command started and then failed
  2  the command line (a missing --config, an unknown flag, a tier, pool or TTL the file does not allow,
     or an account id for keys that the admin API would refuse)
  3  the config file is missing, unreadable or invalid, or its master key does not open the key store
     (or the key store or revocations.json in admin.state_dir is damaged)
  4  a port the relay needs is taken
     (the systemd unit restarts on neither 3 nor 4: RestartPreventExitStatus=3 4)
  5  keys: the relay's admin API could not be reached
  6  keys: the admin API answered and refused";

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve streams (the default when only --config is given).
    Run {
        /// The relay's TOML config file (see config/example.toml).
        #[arg(long, short = 'c', value_name = "FILE", action = ArgAction::Append)]
        config: Vec<PathBuf>,
        /// Share the client port with a relay already listening on it (a
        /// hand-over restart: start this one, then SIGTERM the old one). The
        /// admin port is never shared, so it needs another server.admin_listen.
        /// Without this flag a client port in use is an error.
        #[arg(long)]
        join_client_port: bool,
    },
    /// Validate the config file and print a summary; exit 3 with one line per problem.
    CheckConfig {
        /// The relay's TOML config file (see config/example.toml).
        #[arg(long, short = 'c', value_name = "FILE", action = ArgAction::Append)]
        config: Vec<PathBuf>,
    },
    /// Print one session token for a device on stdout.
    MintToken {
        /// The relay's TOML config file (see config/example.toml).
        #[arg(long, short = 'c', value_name = "FILE", action = ArgAction::Append)]
        config: Vec<PathBuf>,
        /// Device id the token is for.
        #[arg(long)]
        device: String,
        /// Lifetime, like 15m or 2h (default: tokens.default_ttl).
        #[arg(long, value_parser = clio_relay::core::config::parse_duration)]
        ttl: Option<Duration>,
        /// Device tier the token grants ([devices.tier.NAME] limits).
        #[arg(long)]
        tier: Option<String>,
        /// Pool whose accounts may carry the token's streams ([pool.NAME], or
        /// default); repeat for several. Default: the default pool, or the one
        /// pool tokens.pools binds the secret to.
        #[arg(long = "pool", value_name = "NAME")]
        pools: Vec<String>,
    },
    /// Manage accounts and keys of a running relay (through its admin API).
    Keys {
        /// The relay's TOML config file (see config/example.toml): its
        /// server.admin_listen and admin token say how to reach the relay.
        // Each action takes it too (`parse` gives each its own: a global
        // argument keeps only its last value); an id of its own, or clap
        // would hand its value up to the top level's --config.
        #[arg(
            id = "keys_config",
            long = "config",
            short = 'c',
            value_name = "FILE",
            action = ArgAction::Append
        )]
        config: Vec<PathBuf>,
        #[command(subcommand)]
        action: clio_relay::cli::keys::KeysAction,
    },
    /// Start a fake Soniox, a relay and a short load on loopback, and print
    /// what happened (needs no config file and reads none).
    #[cfg(feature = "demo")]
    Demo {
        #[command(flatten)]
        args: clio_relay::cli::demo::DemoArgs,
        /// Taken only to be refused with the reason (demo reads no config
        /// file), so not in demo's help.
        #[arg(long, short = 'c', value_name = "FILE", hide = true, action = ArgAction::Append)]
        config: Vec<PathBuf>,
    },
}

impl Command {
    /// The command's own `--config`, each time it is given.
    fn config(&self) -> &[PathBuf] {
        match self {
            Command::Run { config, .. }
            | Command::CheckConfig { config }
            | Command::MintToken { config, .. }
            | Command::Keys { config, .. } => config,
            #[cfg(feature = "demo")]
            Command::Demo { config, .. } => config,
        }
    }
}

/// The one config file the command line names, however often: `--config`
/// goes before the command or after it (after `keys` or after its
/// action), and may be given more than once if each names the same file
/// (the same text, or one file by two paths: a wrapper's own `--config`
/// and the operator's). Files that differ are refused, each named, as
/// the command could only guess which was meant.
fn one_config(given: &[PathBuf]) -> Result<Option<PathBuf>, String> {
    let same = |a: &PathBuf, b: &PathBuf| {
        a == b
            || matches!(
                (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                (Ok(x), Ok(y)) if x == y
            )
    };
    let mut files: Vec<&PathBuf> = Vec::new();
    for path in given {
        if !files.iter().any(|f| same(f, path)) {
            files.push(path);
        }
    }
    match files.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((*one).clone())),
        many => Err(format!(
            "--config is given more than once, for different files ({}): give it once, for \
             the file to use",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The command line, and each `--config` given after a `keys` action.
///
/// `keys` takes `--config` after its action too (`keys list --config
/// FILE`): a global argument would do, but clap keeps only a global's
/// last value, so `keys --config A list --config B` would run with B
/// without a word. Each action is given a `--config` of its own instead
/// (the one `keys` takes), read here beside that of `keys`.
fn parse() -> (Cli, Vec<PathBuf>) {
    use clap::{CommandFactory, FromArgMatches};
    let mut cmd = Cli::command().mut_subcommand("keys", |keys| {
        let arg = keys
            .get_arguments()
            .find(|a| a.get_id() == "keys_config")
            .cloned()
            .expect("keys takes --config");
        let actions: Vec<String> = keys
            .get_subcommands()
            .map(|a| a.get_name().to_owned())
            .collect();
        actions.into_iter().fold(keys, |keys, action| {
            keys.mut_subcommand(action, |a| a.arg(arg.clone()))
        })
    });
    let matches = cmd
        .try_get_matches_from_mut(std::env::args_os())
        .unwrap_or_else(|e| exit_without_values(e));
    let cli =
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| exit_without_values(e.format(&mut cmd)));
    let after_action = matches
        .subcommand_matches("keys")
        .and_then(|keys| keys.subcommand())
        .and_then(|(_, action)| action.get_many::<PathBuf>("keys_config"))
        .map(|paths| paths.cloned().collect())
        .unwrap_or_default();
    (cli, after_action)
}

/// Exits as clap would with `e`, except that a usage error does not
/// repeat a word of the command line it refuses (an unexpected argument,
/// a value an option does not take): keys never come on the command line,
/// and one put there by mistake (`keys rotate ID KEY`) is not printed
/// back to a terminal or a job's log. A refused option's name (`--kye`)
/// is still shown.
fn exit_without_values(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue};
    if !e.use_stderr() {
        e.exit(); // --help, --version
    }
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let given = |v: &str| {
        argv.iter()
            .any(|a| a == v || a.split_once('=').is_some_and(|(_, x)| x == v))
    };
    let mut text = e.render().to_string();
    for kind in [
        ContextKind::InvalidArg,
        ContextKind::InvalidValue,
        ContextKind::InvalidSubcommand,
    ] {
        let values = match e.get(kind) {
            Some(ContextValue::String(v)) => vec![v.clone()],
            Some(ContextValue::Strings(v)) => v.clone(),
            _ => Vec::new(),
        };
        for value in values {
            if !value.is_empty() && !value.starts_with('-') && given(&value) {
                text = text.replace(&value, "(not shown: it may be a key)");
            }
        }
    }
    eprint!("{text}");
    std::process::exit(e.exit_code());
}

fn main() -> ExitCode {
    let (cli, after_action) = parse();
    // --config goes before the command or after it (after `keys` or after
    // its action), once or more, for one file.
    let own = cli.command.as_ref().map_or(&[][..], Command::config);
    let config = match one_config(&[&cli.config[..], own, &after_action].concat()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if cli.command.is_none() && config.is_none() {
        // Bare `clio-relay`: the help, not just the missing flag.
        let _ = <Cli as clap::CommandFactory>::command().print_help();
        return ExitCode::from(2);
    }
    #[cfg(feature = "demo")]
    if matches!(cli.command, Some(Command::Demo { .. })) && config.is_some() {
        eprintln!(
            "demo reads no config file: it runs its own fake Soniox and relay on loopback; \
             drop --config (to serve with a config, use `clio-relay run --config FILE`)"
        );
        return ExitCode::from(2);
    }
    #[cfg(feature = "demo")]
    let demo = matches!(cli.command, Some(Command::Demo { .. }));
    #[cfg(not(feature = "demo"))]
    let demo = false;
    // The relay's own threads log through a queue (`core::log_sink`); a
    // command that ends at once writes its lines itself.
    let serving = matches!(cli.command, None | Some(Command::Run { .. }));
    let sink = init_logging(demo, serving);
    let need_config = || -> Result<PathBuf, CliError> {
        config.clone().ok_or_else(|| {
            CliError::Usage(
                "--config FILE is required: the relay's TOML config (config/example.toml \
                     is a commented example; `clio-relay demo` runs without one)"
                    .to_string(),
            )
        })
    };
    let result: Result<(), CliError> = match &cli.command {
        None => need_config().and_then(|path| clio_relay::cli::run::run(&path, false)),
        Some(Command::Run {
            join_client_port, ..
        }) => need_config().and_then(|path| clio_relay::cli::run::run(&path, *join_client_port)),
        Some(Command::CheckConfig { .. }) => {
            need_config().and_then(|path| match clio_relay::cli::check_config(&path) {
                Ok(summary) => {
                    print!("{summary}");
                    println!("{}: configuration is valid", path.display());
                    Ok(())
                }
                Err(e) => Err(clio_relay::cli::config_error(&path, &e)),
            })
        }
        Some(Command::MintToken {
            device,
            ttl,
            tier,
            pools,
            ..
        }) => need_config().and_then(|path| {
            let token =
                clio_relay::cli::mint_token_for(&path, device, tier.as_deref(), pools, *ttl)
                    .map_err(|e| {
                        // The file's problems are a configuration error; a
                        // tier, pool or TTL the file does not allow is the
                        // command line's.
                        if let Some(e) = e.downcast_ref::<clio_relay::core::config::ConfigError>() {
                            clio_relay::cli::config_error(&path, e)
                        } else {
                            CliError::Usage(e.to_string())
                        }
                    })?;
            println!("{token}");
            Ok(())
        }),
        Some(Command::Keys { action, .. }) => need_config().and_then(|path| {
            print!("{}", clio_relay::cli::keys::run(&path, action)?);
            Ok(())
        }),
        #[cfg(feature = "demo")]
        Some(Command::Demo { args, .. }) => {
            clio_relay::cli::demo::run(args).map_err(CliError::from)
        }
    };
    if let Some(sink) = sink {
        // The last lines (the drain's) before the process ends, unless
        // stderr has stalled.
        sink.flush(Duration::from_secs(2));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs to stderr, as text or, with `CLIO_RELAY_LOG_FORMAT=json`, one
/// JSON object a line (`timestamp`, `level`, `target`, `message` and the
/// line's fields), for a fleet's log shipper. Any other value: text, and a
/// WARN that says so. With `queued` (the relay serving), through the
/// process's log sink, which it returns: a thread that logs never waits
/// for stderr.
fn init_logging(quiet: bool, queued: bool) -> Option<&'static clio_relay::core::log_sink::LogSink> {
    let default = if quiet { "warn" } else { "info" };
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, note) = log_filter(&asked, default);
    let format = std::env::var("CLIO_RELAY_LOG_FORMAT").unwrap_or_default();
    use std::io::IsTerminal;
    let sink = if queued {
        match clio_relay::core::log_sink::install() {
            Ok(sink) => Some(sink),
            Err(e) => {
                eprintln!("the log's thread did not start ({e}); each thread writes its lines");
                None
            }
        }
    } else {
        None
    };
    use tracing_subscriber::fmt::writer::EitherWriter;
    use tracing_subscriber::fmt::MakeWriter;
    // A line stderr refuses (EPIPE: its reader is gone) is lost, not
    // reported: tracing-subscriber reports it with `eprintln!`, which
    // panics when stderr fails, so each thread that logged (a shard at a
    // refused request, the admin thread) died of it.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(move || match sink {
            Some(sink) => EitherWriter::A(sink.make_writer()),
            None => EitherWriter::B(std::io::stderr()),
        });
    if format == "json" {
        fmt.json().flatten_event(true).init();
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).init();
        if !format.is_empty() && format != "text" {
            tracing::warn!(
                value = %format,
                "CLIO_RELAY_LOG_FORMAT is neither text nor json; logging text"
            );
        }
    }
    if let Some(note) = note {
        tracing::warn!(rust_log = %asked, "RUST_LOG {note}");
    }
    sink
}

/// `filter` with rustls's own lines off, unless `asked` (`RUST_LOG`)
/// names rustls. A TLS peer makes those lines at will, several per
/// connection and outside the relay's log budget (a warning alert, a
/// renegotiation, an SNI no client may send, with its bytes); the relay
/// logs each failed handshake itself, with rustls's reason, within it.
fn quiet_rustls(filter: &str, asked: &str) -> String {
    let names_rustls = asked.split(',').any(|d| {
        let target = d.trim().split(['=', '[']).next().unwrap_or("");
        target == "rustls" || target.starts_with("rustls::")
    });
    if names_rustls {
        filter.to_string()
    } else {
        format!("{filter},rustls=off")
    }
}

/// The filter for `RUST_LOG` (`asked`), and why when it is not the one
/// asked for. Empty, it is `default`. A directive that would not do what
/// it seems to gives `default`: a bare word is a target (a module) in
/// `RUST_LOG`'s syntax, so `warning` or `inof` would silence every line,
/// ERROR included; one that is not a level must name a module (`::` or
/// `_` in it, or a crate that logs). And a filter with no level for every
/// line and none for the whole relay (`clio_relay` or a prefix of it)
/// would turn its lines off, all of them (`clio-relay=debug`,
/// `glommio=debug`) or all but one module's (`clio_relay::dataplane=debug`,
/// or a misspelt `clio_relay::sesion=debug`, ERROR lines included):
/// `default` is added for them, which leaves the modules named at the
/// level asked (the more specific directive wins).
fn log_filter(asked: &str, default: &str) -> (tracing_subscriber::EnvFilter, Option<String>) {
    use tracing_subscriber::EnvFilter;
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    const CRATES: [&str; 5] = ["glommio", "rustls", "tungstenite", "redis", "mimalloc"];
    const OURS: &str = "clio_relay";
    let quiet = |filter: &str| quiet_rustls(filter, asked);
    if asked.trim().is_empty() {
        return (EnvFilter::new(quiet(default)), None);
    }
    let unused = |why: String| {
        let note = format!("not used ({why}); logging at {default}");
        (EnvFilter::new(quiet(default)), Some(note))
    };
    let is_level = |d: &str| {
        LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)) || d.parse::<u8>().is_ok_and(|n| n <= 5)
    };
    // A directive for every line, or for every line of the relay.
    let mut covers_us = false;
    // Modules within the relay named by a directive.
    let mut within: Vec<&str> = Vec::new();
    for d in asked.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !d.contains(['=', '[']);
        let module = d.contains("::") || d.contains('_') || CRATES.contains(&d);
        if bare && !is_level(d) && !module {
            return unused(format!(
                "`{d}` is neither a level ({}) nor a module of this program",
                LEVELS.join(", ")
            ));
        }
        // A target matches the lines whose module path starts with it.
        let target = d.split(['=', '[']).next().unwrap_or("");
        covers_us |= (bare && is_level(d)) || (!target.is_empty() && OURS.starts_with(target));
        if target.starts_with(&format!("{OURS}::")) {
            within.push(target);
        }
    }
    let filter = if covers_us {
        asked.to_string()
    } else {
        format!("{default},{asked}")
    };
    let why = if within.is_empty() {
        format!("names no module of this relay ({OURS}), which would turn all its lines off")
    } else {
        format!(
            "names only {} of this relay, which would turn all its other lines off",
            within.join(", ")
        )
    };
    match EnvFilter::try_new(quiet(&filter)) {
        Err(e) => unused(e.to_string()),
        Ok(f) if covers_us => (f, None),
        Ok(f) => (
            f,
            Some(format!(
                "sets no level for every line and {why}; {default} added for them"
            )),
        ),
    }
}
