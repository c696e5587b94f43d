#!/usr/bin/env bash
# Idle-stream memory and CPU of clio-relay builds, side by side in one session.
#
#   bash tools/ab-idle.sh [-n STREAMS] [-r ROUNDS] DIR [DIR...]
#
# Each DIR holds a `clio-relay` binary (e.g. target/release of two worktrees).
# For each round and each DIR in turn: a 2-shard relay in front of
# fake-soniox (echo mode), `relay-load --idle -n STREAMS --ramp 1000
# --duration 20s` through it (keepalives only), VmRSS sampled every 0.5 s,
# the relay's CPU (utime + stime) at the end. Prints, per run, RSS per stream
# while held (median of the samples in the second half of the hold, minus
# the RSS before), including the closing (peak minus before), and CPU
# seconds. fake-soniox and relay-load come from ./target/release (built if
# missing). Everything listens on 127.0.0.1; every run is bounded in time.
set -euo pipefail
{
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=3000
ROUNDS=2
while getopts "n:r:h" o; do
  case "$o" in
    n) N=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "ab-idle: give at least one directory with a clio-relay binary" >&2; exit 2; }
for d in "$@"; do [ -x "$d/clio-relay" ] || { echo "ab-idle: no $d/clio-relay" >&2; exit 2; }; done

BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
[ -x "$BIN/fake-soniox" ] && [ -x "$BIN/relay-load" ] \
  || (cd "$ROOT" && cargo build --release --bin fake-soniox --bin relay-load)
WORK=$(mktemp -d /tmp/ab-idle.XXXXXX)
FAKE_PORT=17400 RELAY_PORT=17401 ADMIN_PORT=17402
export AB_SECRET AB_KEY
AB_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
AB_KEY="ab-key-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/fake-soniox" --echo --shards 2 --max-concurrent 20000 --key "$AB_KEY" \
  --listen "127.0.0.1:$FAKE_PORT" > "$WORK/fake.log" 2>&1 &
PIDS+=($!)
cat > "$WORK/relay.toml" <<EOF
[server]
listen = "127.0.0.1:$RELAY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
shards = 2
max_streams = 9500
[upstream]
url = "ws://127.0.0.1:$FAKE_PORT/transcribe-websocket"
connect_timeout = "30s"
[tokens]
secret_env = "AB_SECRET"
[limits]
idle_timeout = "60s"
[admin]
state_dir = "$WORK/state"
health_interval = "0s"
[[account]]
id = "ab"
key_env = "AB_KEY"
max_concurrent_streams = 20000
EOF

rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

echo "| round | build | streams held | failed | KiB / stream held | KiB / stream incl. closing | relay CPU s |"
echo "|---:|---|---:|---:|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
  for dir in "$@"; do
    rm -rf "$WORK/state"; mkdir -p "$WORK/state"
    "$dir/clio-relay" run --config "$WORK/relay.toml" > "$WORK/relay.log" 2>&1 &
    rp=$!
    PIDS+=("$rp")
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$RELAY_PORT") 2>/dev/null && break; sleep 0.1; done
    before=$(rss "$rp")
    : > "$WORK/samples"
    timeout --kill-after=10 60 "$BIN/relay-load" --relay-config "$WORK/relay.toml" \
      --target "127.0.0.1:$RELAY_PORT" --idle -n "$N" --ramp 1000 --duration 20s -q --json \
      > "$WORK/load.json" 2> "$WORK/load.err" &
    lp=$!
    while kill -0 "$lp" 2>/dev/null; do rss "$rp" >> "$WORK/samples"; sleep 0.5; done
    wait "$lp" || true
    ticks=$(awk '{ print $14 + $15 }' "/proc/$rp/stat")
    kill -INT "$rp"; wait "$rp" 2>/dev/null || true
    python3 - "$WORK" "$before" "$ticks" "$(getconf CLK_TCK)" "$round" "$dir" <<'PY'
import json, statistics, sys
work, before, ticks, tck, rnd, build = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
report = json.load(open(f"{work}/load.json"))
held, failed = report["idle_held"], report["streams_failed"]
rs = [int(l) for l in open(f"{work}/samples") if l.strip()]
# The hold is the flat middle: the second half of the samples, minus the last
# two (the closing), and its median.
hold = statistics.median(rs[len(rs) // 2:-2] or rs)
per = lambda v: (v - before) / max(held, 1)
print(f"| {rnd} | {build} | {held} | {failed} | {per(hold):.1f} | {per(max(rs)):.1f} | {ticks / tck:.2f} |")
PY
  done
done
}
