//! The Prometheus text exposition format (0.0.4), written. Every producer
//! of `/metrics` (the shards' merged snapshots, keys, pools, usage, alerts,
//! health checks, file limits, the fleet) writes through [`family`], so each
//! family gets its `# HELP` and `# TYPE` lines and every label value is
//! escaped the same way.
//!
//! ```
//! use clio_relay::core::metrics::text::{family, Kind};
//!
//! let mut out = String::new();
//! family(&mut out, "clio_relay_pool_accounts", Kind::Gauge, "Accounts in the pool.")
//!     .sample(&[("pool", "eu \"west\"")], 2);
//! assert_eq!(
//!     out.lines().collect::<Vec<_>>(),
//!     [
//!         "# HELP clio_relay_pool_accounts Accounts in the pool.",
//!         "# TYPE clio_relay_pool_accounts gauge",
//!         r#"clio_relay_pool_accounts{pool="eu \"west\""} 2"#,
//!     ]
//! );
//! ```

use std::fmt::{self, Write as _};

/// A metric family's type, the `# TYPE` line's last word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until a restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Quantiles, `_sum` and `_count`.
    Summary,
    /// Cumulative `_bucket`s by `le`, `_sum` and `_count`.
    Histogram,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family being written: its samples follow its `# HELP` and
/// `# TYPE` lines.
#[derive(Debug)]
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

/// Starts the family `name` in `out`: writes its `# HELP` line (with
/// `help`, backslashes and newlines escaped) and its `# TYPE` line.
pub fn family<'a>(out: &'a mut String, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind.word());
    out.push('\n');
    Family { out, name }
}

impl Family<'_> {
    /// Writes one sample of the family: `name{labels} value`. Label names
    /// are the caller's identifiers; label values are escaped.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl fmt::Display) -> &mut Self {
        self.sample_named("", labels, value)
    }

    /// Writes one sample named `{name}{suffix}`: a summary's or a
    /// histogram's `_sum`, `_count` and `_bucket`s.
    pub fn sample_named(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        value: impl fmt::Display,
    ) -> &mut Self {
        let out = &mut *self.out;
        out.push_str(self.name);
        out.push_str(suffix);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(k);
                out.push_str("=\"");
                escape_label_value(out, v);
                out.push('"');
            }
            out.push('}');
        }
        // Writing to a String cannot fail.
        let _ = writeln!(out, " {value}");
        self
    }
}

/// Escapes a label value per the exposition format: `\`, `"` and newline.
pub fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_then_its_samples() {
        let mut out = String::new();
        family(&mut out, "x_total", Kind::Counter, "Xs, by \\ and\nmore.")
            .sample(&[], 1)
            .sample(&[("a", "b"), ("c", "d")], 2.5);
        family(&mut out, "y_seconds", Kind::Summary, "Ys.")
            .sample(&[("quantile", "0.5")], f64::NAN)
            .sample_named("_sum", &[], 0.25)
            .sample_named("_count", &[], 3);
        assert_eq!(
            out,
            "# HELP x_total Xs, by \\\\ and\\nmore.\n\
             # TYPE x_total counter\n\
             x_total 1\n\
             x_total{a=\"b\",c=\"d\"} 2.5\n\
             # HELP y_seconds Ys.\n\
             # TYPE y_seconds summary\n\
             y_seconds{quantile=\"0.5\"} NaN\n\
             y_seconds_sum 0.25\n\
             y_seconds_count 3\n"
        );
    }

    #[test]
    fn an_account_id_with_a_quote_is_escaped() {
        let mut out = String::new();
        family(&mut out, "clio_relay_cost_month", Kind::Gauge, "Cost.").sample(
            &[("account", "acme \"eu\"\\2\nx"), ("currency", "EUR")],
            1.5,
        );
        assert_eq!(
            out.lines().nth(2),
            Some(r#"clio_relay_cost_month{account="acme \"eu\"\\2\nx",currency="EUR"} 1.5"#)
        );
    }
}
