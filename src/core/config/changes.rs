//! What a reload changed, by name.

use super::Config;

impl Config {
    /// The settings a reload from `old` to this config changes live, by
    /// name (the reload's `changed:` log line), besides the accounts and
    /// the client port's certificate (their own lines name those) and
    /// what needs a restart (reported as kept): never a value, so never a
    /// secret.
    pub fn live_changes_from(&self, old: &Config) -> Vec<&'static str> {
        let new = self;
        let mut names = Vec::new();
        // Each field by name; a section that differs in none of them (a field
        // added since) is still named, as a whole.
        macro_rules! fields {
            ($section:ident, [$($field:ident),*]) => {{
                let before = names.len();
                $(
                    if old.$section.$field != new.$section.$field {
                        names.push(concat!(stringify!($section), ".", stringify!($field)));
                    }
                )*
                if names.len() == before && old.$section != new.$section {
                    names.push(concat!("[", stringify!($section), "]"));
                }
            }};
        }
        for (differs, name) in [
            (old.server.allow != new.server.allow, "server.allow"),
            (
                old.server.proxy_protocol_from != new.server.proxy_protocol_from,
                "server.proxy_protocol_from",
            ),
            (old.tokens.secret != new.tokens.secret, "tokens.secret"),
            (
                old.tokens.previous_secret != new.tokens.previous_secret,
                "tokens.previous_secret",
            ),
            (
                old.tokens.extra.len() != new.tokens.extra.len()
                    || old
                        .tokens
                        .extra
                        .iter()
                        .zip(&new.tokens.extra)
                        .any(|(a, b)| a.secret != b.secret || a.pools != b.pools),
                "tokens.extra",
            ),
            (
                old.tokens.default_ttl != new.tokens.default_ttl,
                "tokens.default_ttl",
            ),
            (old.tokens.max_ttl != new.tokens.max_ttl, "tokens.max_ttl"),
            (
                old.tokens.clock_skew != new.tokens.clock_skew,
                "tokens.clock_skew",
            ),
            (
                old.tokens.pools != new.tokens.pools
                    || old.tokens.previous_pools != new.tokens.previous_pools,
                "tokens.pools",
            ),
        ] {
            if differs {
                names.push(name);
            }
        }
        fields!(
            limits,
            [
                handshake_timeout,
                max_header_bytes,
                max_frame_bytes,
                max_first_message_bytes,
                idle_timeout,
                stall_timeout,
                socket_buffer,
                drain_timeout,
                finalize_wait,
                max_unauthenticated,
                max_unauthenticated_per_address
            ]
        );
        fields!(
            failover,
            [replay_bytes, resume_audio, max_resumes, resume_memory]
        );
        if old.devices != new.devices {
            names.push("[devices]");
        }
        // `[alerts]` is a section of the file of its own, though the
        // config keeps it with the usage settings: each is named apart.
        if old.usage.alerts != new.usage.alerts {
            names.push("[alerts]");
        }
        let without_alerts = |c: &Config| super::UsageConfig {
            alerts: old.usage.alerts.clone(),
            ..c.usage.clone()
        };
        if without_alerts(old) != without_alerts(new) {
            names.push("[usage]");
        }
        for (differs, name) in [
            (old.admin.token != new.admin.token, "admin.token"),
            (old.admin.allow != new.admin.allow, "admin.allow"),
            (
                old.admin.rotation_period != new.admin.rotation_period,
                "admin.rotation_period",
            ),
            (
                old.admin.rotation_overlap != new.admin.rotation_overlap,
                "admin.rotation_overlap",
            ),
            (
                old.admin.health_interval != new.admin.health_interval,
                "admin.health_interval",
            ),
        ] {
            if differs {
                names.push(name);
            }
        }
        names
    }
}
