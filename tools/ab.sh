#!/usr/bin/env bash
# Same-session A/B of clio-relay builds on one workload, alternating them.
#
#   bash tools/ab.sh [-w idle|churn|realtime|flood] [-n STREAMS] [-r ROUNDS] [-c] [-t] DIR [DIR...]
#
# Each DIR holds a `clio-relay` binary (e.g. target/release of two worktrees).
# -c also runs each DIR with a [cluster] section, against a redis-server the
# script starts on 127.0.0.1 (labelled "DIR +cluster"): the cost of the
# fleet's shared store, from the same run.
# -t adds a column: the relay's CPU by thread (shards, cluster, admin, ...;
# ticks from /proc/PID/task/*/stat), in µs per cycle for churn and in ms
# otherwise.
# For each round and each DIR in turn: a 2-shard relay in front of
# fake-soniox (echo mode), one relay-load run through it, the relay's CPU
# (utime + stime) at the end. Workloads:
#   idle   (default) `relay-load --idle -n STREAMS --ramp 1000 --duration 20s`
#          (keepalives only), VmRSS sampled every 0.5 s. Prints RSS per stream
#          while held (median of the samples in the second half of the hold,
#          minus the RSS before), including the closing (peak minus before),
#          and CPU seconds.
#   churn  `relay-load --churn --concurrency 50 --duration 10s` (open,
#          authenticate, first result, close; W3 of the head-to-head). Prints
#          cycles/s, CPU ms per cycle and open-to-result p50/p99.
#   realtime `relay-load -n STREAMS --ramp 500 --stream-seconds 20` (W1:
#          100 ms frames at real-time pace, echoed). Prints lost frames,
#          CPU s per 1,000 audio-seconds and round-trip p50/p99/p99.9.
#   flood  `relay-load -n 200 --pace flood --duration 15s` (W2 of the
#          head-to-head: frames as fast as the sockets take them). Prints
#          frames/s, failed streams and CPU s per 1,000 audio-seconds.
# fake-soniox and relay-load come from ./target/release (built if missing).
# Everything listens on 127.0.0.1, on ports free when the script starts
# (each relay run on a new one); every run is bounded in time. The work
# directory (logs, configs, state) is removed at the end; AB_KEEP=1 keeps
# it and prints where it is. A relay that does not start, or exits during
# a run, ends the script (exit 1) with the end of its log.
set -euo pipefail
{
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=3000
ROUNDS=2
WORKLOAD=idle
CLUSTER=0
THREADS=0
# --help as the other tools take it (getopts knows only -h).
for a in "$@"; do
  [[ $a == --help ]] && { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0; }
  [[ $a == -- ]] && break
done
while getopts "w:n:r:cth" o; do
  case "$o" in
    c) CLUSTER=1 ;;
    t) THREADS=1 ;;
    w) WORKLOAD=$OPTARG ;;
    n) N=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    h) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    # getopts has said which option it did not know, or which lacks its value.
    *) echo "ab: usage: bash tools/ab.sh [-w idle|churn|realtime|flood] [-n STREAMS] [-r ROUNDS] [-c] [-t] DIR [DIR...] (-h for help)" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
# A count that is not one ends the run before anything starts: -n abc
# ended in a Python traceback once the relay ran, -r 0 in an empty table
# and exit 0.
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "ab: -n needs a number of streams, 1 or more (got '$N')" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ab: -r needs a number of rounds, 1 or more (got '$ROUNDS')" >&2; exit 2; }
case "$WORKLOAD" in idle|churn|realtime|flood) ;; *) echo "ab: unknown workload $WORKLOAD (idle, churn, realtime or flood)" >&2; exit 2 ;; esac
[ $# -ge 1 ] || { echo "ab: give at least one directory with a clio-relay binary" >&2; exit 2; }
for d in "$@"; do [ -x "$d/clio-relay" ] || { echo "ab: no $d/clio-relay" >&2; exit 2; }; done

BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
[ -x "$BIN/fake-soniox" ] && [ -x "$BIN/relay-load" ] \
  || (cd "$ROOT" && cargo build --release --bin fake-soniox --bin relay-load)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ab.XXXXXX")
# A port nothing listens on now (the kernel's pick).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
FAKE_PORT=$(free_port) ADMIN_PORT=$(free_port) REDIS_PORT=$(free_port) RELAY_PORT=$(free_port)
export AB_SECRET AB_KEY AB_MASTER
AB_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
AB_MASTER=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
AB_KEY="ab-key-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${AB_KEEP:-0}" = 1 ]; then echo "ab: work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
# Ctrl-C or SIGTERM to the script alone ends the run too: with no trap,
# bash went on after its foreground sleep, to the end of every round.
trap 'exit 130' INT
trap 'exit 143' TERM

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
master_key_env = "AB_MASTER"
[[account]]
id = "ab"
key_env = "AB_KEY"
max_concurrent_streams = 20000
EOF

CONFIGS=(relay)
if [ "$CLUSTER" = 1 ]; then
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    > "$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && break; sleep 0.1; done
  { cat "$WORK/relay.toml"; printf '[cluster]\nredis_url = "redis://127.0.0.1:%s/0"\nnode_id = "ab"\n' "$REDIS_PORT"; } \
    > "$WORK/relay-cluster.toml"
  CONFIGS+=(relay-cluster)
fi

rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# relay_gone WHAT: the run ends (exit 1), naming the build, the round and
# the end of the relay's log; its CPU and RSS cannot be read.
relay_gone() {
  echo "ab: $dir/clio-relay $1 (round $round, $label); the end of its log:" >&2
  tail -n 5 "$WORK/relay.log" >&2
  exit 1
}
# "NAME TICKS" for each thread of process $1.
thread_ticks() {
  for t in /proc/"$1"/task/*; do
    printf '%s %s\n' "$(cat "$t/comm")" "$(awk '{ print $14 + $15 }' "$t/stat")"
  done 2>/dev/null
}
# The -t column's header and its rule.
THEAD= TRULE=
[ "$THREADS" = 1 ] && THEAD=" CPU by thread |" TRULE="---|"

if [ "$WORKLOAD" = idle ]; then
  LOAD_ARGS=(--idle -n "$N" --ramp 1000 --duration 20s)
  echo "| round | build | streams held | failed | KiB / stream held | KiB / stream incl. closing | relay CPU s |$THEAD"
  echo "|---:|---|---:|---:|---:|---:|---:|$TRULE"
elif [ "$WORKLOAD" = realtime ]; then
  LOAD_ARGS=(-n "$N" --ramp 500 --stream-seconds 20)
  echo "| round | build | lost | failed | relay CPU s / 1,000 audio-s | rtt p50 (ms) | p99 (ms) | p99.9 (ms) |$THEAD"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|$TRULE"
elif [ "$WORKLOAD" = flood ]; then
  LOAD_ARGS=(-n 200 --pace flood --stream-seconds 100000 --duration 15s)
  echo "| round | build | frames/s | failed | relay CPU s / 1,000 audio-s |$THEAD"
  echo "|---:|---|---:|---:|---:|$TRULE"
else
  LOAD_ARGS=(--churn --concurrency 50 --duration 10s)
  echo "| round | build | cycles/s | failed | relay CPU ms / cycle | open-to-result p50 (ms) | p99 (ms) |$THEAD"
  echo "|---:|---|---:|---:|---:|---:|---:|$TRULE"
fi
for round in $(seq 1 "$ROUNDS"); do
  for dir in "$@"; do
  for conf in "${CONFIGS[@]}"; do
    label=$dir
    if [ "$conf" = relay-cluster ]; then
      label="$dir +cluster"
      redis-cli -p "$REDIS_PORT" FLUSHALL > /dev/null
    fi
    rm -rf "$WORK/state"; mkdir -p "$WORK/state"
    # A new client port each run: the last run's closing connections hold
    # its port for a while, and a relay refuses a port in use.
    RELAY_PORT=$(free_port)
    sed -E "s/^listen = \"127.0.0.1:[0-9]+\"/listen = \"127.0.0.1:$RELAY_PORT\"/" \
      "$WORK/$conf.toml" > "$WORK/run.toml"
    "$dir/clio-relay" run --config "$WORK/run.toml" > "$WORK/relay.log" 2>&1 &
    rp=$!
    PIDS+=("$rp")
    for _ in $(seq 50); do
      (exec 3<>"/dev/tcp/127.0.0.1/$RELAY_PORT") 2>/dev/null && break
      kill -0 "$rp" 2>/dev/null || break
      sleep 0.1
    done
    # A relay that exited (a config it refused, a build that does not
    # run) or does not listen is said, with its log: before, the script
    # died on "awk: cannot open /proc/PID/status" with no row.
    kill -0 "$rp" 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$RELAY_PORT") 2>/dev/null \
      || relay_gone "did not start listening on 127.0.0.1:$RELAY_PORT"
    before=$(rss "$rp")
    ticks0=$(awk '{ print $14 + $15 }' "/proc/$rp/stat")
    thread_ticks "$rp" > "$WORK/threads0"
    : > "$WORK/samples"
    timeout --kill-after=10 60 "$BIN/relay-load" --relay-config "$WORK/relay.toml" \
      --target "127.0.0.1:$RELAY_PORT" "${LOAD_ARGS[@]}" -q --json \
      > "$WORK/load.json" 2> "$WORK/load.err" &
    lp=$!
    # `timeout` passes the cleanup's TERM on to relay-load.
    PIDS+=("$lp")
    # A relay gone mid-run has no RSS to read: its run is not measured.
    while kill -0 "$lp" 2>/dev/null; do
      rss "$rp" >> "$WORK/samples" 2>/dev/null || { kill -TERM "$lp" 2>/dev/null; break; }
      sleep 0.5
    done
    wait "$lp" || true
    kill -0 "$rp" 2>/dev/null || relay_gone "exited during the run"
    # relay-load that could not run (the file limit for -n, a locked-memory
    # limit) printed no report, and said why on stderr: before, a Python
    # traceback (JSONDecodeError) stood in for its reason.
    if [ ! -s "$WORK/load.json" ]; then
      echo "ab: relay-load printed no report (round $round, $label):" >&2
      tail -n 5 "$WORK/load.err" >&2
      exit 1
    fi
    ticks=$(( $(awk '{ print $14 + $15 }' "/proc/$rp/stat") - ticks0 ))
    if [ "$THREADS" = 1 ]; then thread_ticks "$rp" > "$WORK/threads1"; else : > "$WORK/threads1"; fi
    kill -INT "$rp"; wait "$rp" 2>/dev/null || true
    python3 - "$WORK" "$before" "$ticks" "$(getconf CLK_TCK)" "$round" "$label" "$WORKLOAD" <<'PY'
import builtins, collections, json, re, statistics, sys
work, before, ticks, tck, rnd, build, workload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
report = json.load(open(f"{work}/load.json"))
failed = report["streams_failed"]

def by_thread(name):
    """Ticks per thread kind (clio-shard-0-1 and clio-shard-1-2 are "shards")."""
    out = collections.Counter()
    for line in open(f"{work}/{name}"):
        comm, _, t = line.rstrip("\n").rpartition(" ")
        kind = "shards" if comm.startswith("clio-shard") else re.sub(r"^clio-|-[0-9]+$", "", comm)
        out[kind] += int(t)
    return out

def thread_column():
    """The -t column: µs per cycle (churn) or ms per thread kind."""
    after = by_thread("threads1")
    if not after:
        return ""
    first = by_thread("threads0")
    cycles = report.get("streams_ok", 0) if workload == "churn" else 0
    parts = []
    for kind, t in sorted(after.items(), key=lambda kv: -kv[1]):
        d = (t - first.get(kind, 0)) * 1000.0 / tck
        if d > 0:
            parts.append(f"{kind} {d * 1000 / cycles:.1f} µs" if cycles else f"{kind} {d:.0f} ms")
    return " " + ", ".join(parts) + " |"

def print(row):
    builtins.print(row + thread_column())
if workload == "realtime":
    audio_s = report["frames_received"] * 0.1
    cpu = ticks / tck / max(audio_s / 1000.0, 1e-9)
    r = report["rtt"]
    print(f"| {rnd} | {build} | {report['lost']} | {failed} | {cpu:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} |")
    sys.exit(0)
if workload == "flood":
    audio_s = report["frames_received"] * 0.1
    cpu = ticks / tck / max(audio_s / 1000.0, 1e-9)
    print(f"| {rnd} | {build} | {report['frames_per_sec']:.0f} | {failed} | {cpu:.3f} |")
    sys.exit(0)
if workload == "churn":
    cycles = report["streams_ok"]
    cpu_ms = ticks * 1000.0 / tck / max(cycles, 1)
    c = report["connect"]
    print(f"| {rnd} | {build} | {report['cycles_per_sec']:.0f} | {failed} | {cpu_ms:.4f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} |")
    sys.exit(0)
held = report["idle_held"]
rs = [int(l) for l in open(f"{work}/samples") if l.strip()]
# The hold is the flat middle: the second half of the samples, minus the last
# two (the closing), and its median.
hold = statistics.median(rs[len(rs) // 2:-2] or rs)
per = lambda v: (v - before) / max(held, 1)
print(f"| {rnd} | {build} | {held} | {failed} | {per(hold):.1f} | {per(max(rs)):.1f} | {ticks / tck:.2f} |")
PY
  done
  done
done
}
