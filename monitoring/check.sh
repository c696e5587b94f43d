#!/usr/bin/env bash
# Checks the monitoring files:
#   1. promtool check rules  prometheus/clio-relay.rules.yml
#   2. promtool test rules   prometheus/clio-relay.rules.test.yml
#   3. the Grafana dashboard: valid JSON (python3 -m json.tool), imports with a
#      ${DS_PROMETHEUS} datasource, every panel has a datasource and queries,
#      every query names only known metrics (KNOWN below) and parses as PromQL
#      (promtool check rules on a throwaway rules file made of the queries);
#      the rules file names only known metrics too; live streams in all
#      read clio_relay_streams_live (streams_active per shard, or as its
#      fallback).
# Exits non-zero on any problem.
#
# promtool: $PROMTOOL, else `promtool` on PATH, else it is taken from Debian's
# `prometheus` package: `apt-get download` + `dpkg-deb -x` into a temporary
# directory. That installs nothing system-wide and never starts a Prometheus
# server; apt-get update runs first if apt has no package lists.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rules="$here/prometheus/clio-relay.rules.yml"
tests="$here/prometheus/clio-relay.rules.test.yml"
dash="$here/grafana/clio-relay-dashboard.json"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

promtool=${PROMTOOL:-$(command -v promtool || true)}
if [ -z "$promtool" ]; then
  echo "== promtool not found: extracting it from Debian's prometheus package"
  if ! apt-cache show prometheus >/dev/null 2>&1; then
    apt-get update -qq
  fi
  # A directory apt's unprivileged _apt user can write to.
  chmod 0755 "$work" && mkdir -m 0777 "$work/deb"
  (cd "$work/deb" && apt-get download -qq prometheus && dpkg-deb -x prometheus_*.deb "$work/root")
  promtool="$work/root/usr/bin/promtool"
fi
"$promtool" --version 2>&1 | head -1

echo "== promtool check rules"
"$promtool" check rules "$rules"

echo "== promtool test rules"
"$promtool" test rules "$tests"

echo "== python3 -m json.tool (dashboard)"
python3 -m json.tool "$dash" >/dev/null
echo "  valid JSON"

echo "== dashboard panels and metric names"
python3 - "$dash" "$rules" "$work/dashboard-queries.rules.yml" <<'PY'
import json, re, sys

dash_path, rules_path, out_path = sys.argv[1:4]

# Every metric a query may name: what the relay exports (src/core/metrics/render.rs,
# src/control/admin/api.rs, src/control/admin/mod.rs and the metrics being added, see
# monitoring/README.md), plus Prometheus's own `up` and `ALERTS`.
KNOWN = {
    "clio_relay_streams_active", "clio_relay_streams_live", "clio_relay_streams_total", "clio_relay_streams_rejected_total",
    "clio_relay_account_streams_active", "clio_relay_account_streams_total",
    "clio_relay_account_retries_total", "clio_relay_account_max_concurrent_streams",
    "clio_relay_frames_total", "clio_relay_bytes_total", "clio_relay_errors_total",
    "clio_relay_max_streams", "clio_relay_draining",
    "clio_relay_accounts_healthy", "clio_relay_accounts", "clio_relay_accounts_total",
    "clio_relay_key_age_seconds", "clio_relay_keys_due_for_rotation",
    "clio_relay_key_streams_active", "clio_relay_health_checks_total",
    "clio_relay_audio_seconds_total", "clio_relay_usage_month_audio_seconds",
    "clio_relay_cost_month", "clio_relay_budget_month",
    "clio_relay_device_rejections_total", "clio_relay_usage_drift_seconds",
    "clio_relay_usage_ledger_failing", "clio_relay_account_errors_total",
    "clio_relay_account_first_result_seconds",
    "clio_relay_account_first_result_seconds_bucket",
    "clio_relay_account_first_result_seconds_sum",
    "clio_relay_account_first_result_seconds_count",
    "clio_relay_alerts_firing", "clio_relay_upstream_config_fault", "clio_relay_refusals_total",
    "clio_relay_account_info", "clio_relay_account_healthy", "clio_relay_pool_streams_active",
    "clio_relay_pool_max_concurrent_streams", "clio_relay_pool_accounts",
    "clio_relay_pool_accounts_healthy", "clio_relay_pool_max_streams",
    "clio_relay_pool_refusals_total", "clio_relay_resume_copy_bytes",
    "clio_relay_resume_copy_limit_bytes", "clio_relay_resume_copies_dropped_total",
    "clio_relay_tls_certificate_expiry_timestamp_seconds",
    "up", "ALERTS",
}
for summary in ("frame_forward_seconds", "client_handshake_seconds",
                "upstream_connect_seconds", "first_result_seconds"):
    for suffix in ("", "_sum", "_count", "_max"):
        KNOWN.add(f"clio_relay_{summary}{suffix}")

# PromQL words that are not metric names.
KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}

problems = []

def metric_names(expr):
    """The metric names in a PromQL expression (a simple scan, not a parser)."""
    e = re.sub(r'\$\{?\w+(:\w+)?\}?', "x", expr)             # Grafana variables
    e = re.sub(r'"(\\.|[^"\\])*"', '""', e)                  # strings
    e = re.sub(r"\{[^}]*\}", "", e)                          # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                         # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\S+", " ", e)
    e = re.sub(r"\b\d[\w.]*", " ", e)                        # numbers, durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", e):
        word = m.group(0)
        if word.lower() in KEYWORDS:
            continue
        if re.match(r"\s*\(", e[m.end():]):                  # a function call
            continue
        names.add(word)
    return names

def promql(expr):
    """The query with Grafana's variables replaced, for promtool to parse."""
    e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r'\$\{?\w+(:\w+)?\}?', ".*", e)            # $instance etc. sit in =~ matchers

with open(dash_path) as f:
    d = json.load(f)

inputs = [i.get("name") for i in d.get("__inputs", []) if i.get("pluginId") == "prometheus"]
if inputs != ["DS_PROMETHEUS"]:
    problems.append(f"__inputs: want one prometheus input named DS_PROMETHEUS, got {inputs}")
if not 36 <= d.get("schemaVersion", 0) <= 41:
    problems.append(f"schemaVersion {d.get('schemaVersion')}: want about 39")

DS = "${DS_PROMETHEUS}"
def ds_ok(ds):
    return isinstance(ds, dict) and ds.get("type") == "prometheus" and ds.get("uid") == DS

panels = []
for p in d.get("panels", []):
    panels.append(p)
    panels.extend(p.get("panels", []))               # panels inside collapsed rows

queries, ids, n = [], set(), 0
for p in panels:
    where = f"panel {p.get('id')} {p.get('title')!r}"
    if p.get("id") in ids:
        problems.append(f"{where}: duplicate id")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    n += 1
    if not {"h", "w", "x", "y"} <= set(p.get("gridPos", {})):
        problems.append(f"{where}: no gridPos")
    if not ds_ok(p.get("datasource")):
        problems.append(f"{where}: datasource is not {DS}")
    targets = p.get("targets") or []
    if not targets:
        problems.append(f"{where}: no targets")
    for t in targets:
        expr = (t.get("expr") or "").strip()
        if not expr:
            problems.append(f"{where} {t.get('refId')}: empty expr")
            continue
        if "datasource" in t and not ds_ok(t["datasource"]):
            problems.append(f"{where} {t.get('refId')}: target datasource is not {DS}")
        names = metric_names(expr)
        if not names:
            problems.append(f"{where} {t.get('refId')}: names no metric: {expr}")
        for name in sorted(names - KNOWN):
            problems.append(f"{where} {t.get('refId')}: unknown metric {name!r} in {expr}")
        # Live streams in all are the streams admitted (streams_live, what
        # server.max_streams counts, those reconnecting upstream too), not
        # the upstream connections open; streams_active only per shard, or
        # as the fallback for a relay without streams_live.
        if ("clio_relay_streams_active" in names and "clio_relay_streams_live" not in names
                and not re.search(r"\bshard\b", expr)):
            problems.append(f"{where} {t.get('refId')}: live streams in all read clio_relay_streams_live "
                            f"(streams_active only as its fallback): {expr}")
        queries.append((where, t.get("refId"), expr))

for v in d.get("templating", {}).get("list", []):
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    if v.get("type") == "query":
        if not ds_ok(v.get("datasource")):
            problems.append(f"variable {v.get('name')}: datasource is not {DS}")
        m = re.match(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)", q)
        if m and m.group(1) not in KNOWN:
            problems.append(f"variable {v.get('name')}: unknown metric {m.group(1)!r}")

# The rules file: every clio_relay_* name (in expressions and annotations) is
# exported or recorded in the file itself.
with open(rules_path) as f:
    rules_text = f.read()
recorded = set(re.findall(r"^\s*-?\s*record:\s*(\S+)", rules_text, re.M))
for name in sorted(set(re.findall(r"[A-Za-z_:][\w:]*", rules_text))):
    if "clio_relay_" in name and name not in KNOWN | recorded:
        problems.append(f"{rules_path}: unknown metric {name!r}")

# A throwaway rules file made of the dashboard's queries, for promtool to parse.
with open(out_path, "w") as f:
    f.write("groups:\n  - name: dashboard-queries\n    rules:\n")
    for i, (where, ref, expr) in enumerate(queries):
        f.write(f"      # {where} {ref}\n")
        f.write(f"      - record: dashboard_query_{i}\n        expr: {json.dumps(promql(expr))}\n")

for p in problems:
    print("  PROBLEM:", p)
print(f"  {n} panels, {len(queries)} queries, {len(recorded)} recording rules; {len(problems)} problems")
sys.exit(1 if problems else 0)
PY

echo "== dashboard queries parse as PromQL (promtool)"
"$promtool" check rules "$work/dashboard-queries.rules.yml"

echo "== monitoring: all checks passed"
