#!/usr/bin/env bash
# A soak: real-time streams through clio-relay for a long while, with clients
# vanishing, clients stalling and upstream connections dropping, all on
# loopback. It reports the relay's memory (RSS), open descriptors and the
# devices it remembers over the run, and the frames lost on completed streams.
#
#   tools/soak.sh                       # 10 minutes, 100 streams
#   tools/soak.sh --minutes 1 --streams 20
#
# What runs:
# - fake-soniox in echo mode, dropping the TCP connection (a reset) of
#   --drop-share of its sessions at a random audio frame (--fail-share with
#   --fail-kinds drop);
# - the relay (release build), idle timeout 10 s;
# - relay-load: --streams streams of 20 s real-time audio, each slot starting
#   a new stream when one ends, for the whole run: the streams that count;
# - every 5 s, 10 clients that vanish: a relay-load killed (SIGKILL) 1 to 4 s
#   into its streams;
# - every 20 s, 10 clients that stall: a relay-load stopped (SIGSTOP) 2 s in,
#   neither reading nor sending, until the relay's idle timeout ends its
#   streams; then killed.
#
# Pass: RSS at the end within 5% of RSS after the first minute (both under
# the same load), 0 frames lost, duplicated or reordered on completed
# streams, and the relay's open descriptors back to their number before the
# load once every stream has ended. Exit status 0 on a pass, 3 on a fail, 1
# when it could not run. Work files (logs, samples.tsv, load.json) go in
# SOAK_WORK or a new /tmp/soak.XXXXXX.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

minutes=10
streams=100
drop_share=0.05
# Exits with a clear line unless option $1 has a value ($2, the count of
# arguments left, is 2 or more) that matches the regex $4 ($5 says what).
check() {
  if [ "$2" -lt 2 ] || ! [[ "$3" =~ $4 ]]; then
    echo "soak.sh: $1 needs $5 (got '$3'); see tools/soak.sh --help" >&2
    exit 1
  fi
}
count='^[1-9][0-9]*$'
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) check "$1" $# "${2-}" "$count" 'a whole number of minutes, 1 or more'
      minutes=$2; shift 2 ;;
    --streams) check "$1" $# "${2-}" "$count" 'a number of streams, 1 or more'
      streams=$2; shift 2 ;;
    --drop-share) check "$1" $# "${2-}" '^(0(\.[0-9]+)?|1(\.0*)?)$' 'a share from 0 to 1, such as 0.05'
      drop_share=$2; shift 2 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 1 ;;
  esac
done
SECS=$(( minutes * 60 ))
WARM=$(( SECS < 120 ? SECS / 4 : 60 ))

log() { printf '[soak %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "$*"; exit 1; }

CHILDREN=()
# The vanishing and stalling loops: each starts relay-loads of its own.
HELPERS=()
cleanup() {
  local rc=$?
  set +e
  # A loop's own relay-load (the stalling one's stopped) is not in
  # CHILDREN, and a Ctrl-C can end the loop first: each loop notes the pid
  # of its latest in $WORK/LOOP.pid, the loops are frozen so they start no
  # other, and those still running from $WORK are ended with the rest.
  # Before, a run stopped by Ctrl-C left the stopped relay-load behind for
  # good.
  local pid f
  [ -n "${SLEEPER:-}" ] && kill "$SLEEPER" 2>/dev/null
  for pid in "${HELPERS[@]}"; do kill -STOP "$pid" 2>/dev/null; done
  for f in "${WORK:-/nonexistent}/vanish.pid" "${WORK:-/nonexistent}/stall.pid"; do
    pid=$(cat "$f" 2>/dev/null) || continue
    grep -qF "$WORK/" "/proc/$pid/cmdline" 2>/dev/null && CHILDREN+=("$pid")
  done
  # TERM before CONT: a stopped loop wakes to its end, not to its next step.
  for pid in "${CHILDREN[@]}"; do kill -TERM "$pid" 2>/dev/null; kill -CONT "$pid" 2>/dev/null; done
  for pid in "${CHILDREN[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [ -n "${SOAK_BIN:-}" ]; then
  BIN=$SOAK_BIN
else
  log "cargo build --release --bins"
  (cd "$ROOT" && cargo build --release --bins --quiet)
  BIN=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
fi

WORK=${SOAK_WORK:-$(mktemp -d /tmp/soak.XXXXXX)}
mkdir -p "$WORK/state"
log "work dir: $WORK"
FAKE_PORT=$(free_port)
RELAY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
export CLIO_RELAY_TOKEN_SECRET SOAK_SONIOX_KEY
CLIO_RELAY_TOKEN_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
SOAK_SONIOX_KEY="soak-fake-key-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"

cat > "$WORK/relay.toml" <<EOF
[server]
listen = "127.0.0.1:$RELAY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
max_streams = 5000

[upstream]
url = "ws://127.0.0.1:$FAKE_PORT/transcribe-websocket"

[tokens]
secret_env = "CLIO_RELAY_TOKEN_SECRET"

[limits]
idle_timeout = "10s"

[admin]
state_dir = "$WORK/state"
health_interval = "0s"

[[account]]
id = "soak"
key_env = "SOAK_SONIOX_KEY"
max_concurrent_streams = 5000
EOF

"$BIN/fake-soniox" --listen "127.0.0.1:$FAKE_PORT" --key "$SOAK_SONIOX_KEY" --echo \
  --max-concurrent 5000 --fail-share "$drop_share" --fail-kinds drop --fail-within-frames 150 \
  > "$WORK/fake-soniox.log" 2>&1 &
CHILDREN+=($!)
"$BIN/clio-relay" run --config "$WORK/relay.toml" > "$WORK/relay.log" 2>&1 &
RELAY=$!
CHILDREN+=("$RELAY")
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$RELAY" 2>/dev/null || die "the relay exited: $(tail -n 5 "$WORK/relay.log")"
  sleep 0.1
done
curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || die "the relay is not ready"

rss() { awk '/^VmRSS/ {print $2}' "/proc/$RELAY/status"; }
fds() { ls "/proc/$RELAY/fd" | wc -l; }
active() {
  curl -fs "http://127.0.0.1:$ADMIN_PORT/metrics" \
    | awk '/^clio_relay_streams_active/ {s += $2} END {print s + 0}'
}
tracked() {
  curl -fs "http://127.0.0.1:$ADMIN_PORT/metrics" \
    | awk '/^clio_relay_devices_tracked / {print $2}'
}

sleep 1
RSS_IDLE0=$(rss)
FDS0=$(fds)
log "idle before: RSS ${RSS_IDLE0} kB, ${FDS0} fds; load: $streams streams for ${SECS}s"

load=("$BIN/relay-load" --target "127.0.0.1:$RELAY_PORT" --relay-config "$WORK/relay.toml" -q)
START=$(date +%s)
END=$(( START + SECS ))
"${load[@]}" -n "$streams" --stream-seconds 20 --loop --duration "${SECS}s" --timeout 15s --ramp 50 --json \
  > "$WORK/load.json" 2> "$WORK/load.err" &
LOAD=$!
CHILDREN+=("$LOAD")

# Clients that vanish: killed 1-4 s into their streams.
vanish() {
  local n=0
  while [ "$(date +%s)" -lt $(( END - 10 )) ]; do
    "${load[@]}" -n 10 --stream-seconds 30 --ramp 0 >/dev/null 2>&1 &
    local pid=$!
    echo "$pid" > "$WORK/vanish.pid"
    sleep $(( 1 + RANDOM % 4 ))
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    n=$(( n + 1 ))
    sleep 1
  done
  echo "$n" > "$WORK/vanish.count"
}
# Clients that stall: stopped 2 s in until the relay's idle timeout ends them.
stall() {
  local n=0
  while [ "$(date +%s)" -lt $(( END - 25 )) ]; do
    "${load[@]}" -n 10 --stream-seconds 30 --ramp 0 >/dev/null 2>&1 &
    local pid=$!
    echo "$pid" > "$WORK/stall.pid"
    sleep 2
    kill -STOP "$pid" 2>/dev/null || true
    sleep 15
    kill -KILL "$pid" 2>/dev/null || true
    kill -CONT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    n=$(( n + 1 ))
    sleep 3
  done
  echo "$n" > "$WORK/stall.count"
}
vanish & CHILDREN+=($!) HELPERS+=($!)
stall & CHILDREN+=($!) HELPERS+=($!)

printf 'seconds\trss_kb\tfds\tstreams_active\tdevices_tracked\n' > "$WORK/samples.tsv"
RSS_WARM=
while kill -0 "$LOAD" 2>/dev/null; do
  t=$(( $(date +%s) - START ))
  r=$(rss); f=$(fds); a=$(active || echo '?'); d=$(tracked || echo '?')
  printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$f" "$a" "$d" >> "$WORK/samples.tsv"
  if [ -z "$RSS_WARM" ] && [ "$t" -ge "$WARM" ]; then
    RSS_WARM=$r
    WARM_AT=$t
    log "after ${t}s: RSS ${r} kB, ${f} fds, ${a} streams"
  fi
  [ $(( t % 60 )) -lt 10 ] && log "${t}s: RSS ${r} kB, ${f} fds, ${a} streams, ${d} devices remembered"
  # In the background, waited for: bash runs a trap only between
  # commands, and a foreground sleep held SIGTERM's for up to 10 s.
  sleep 10 &
  SLEEPER=$!
  wait "$SLEEPER"
done
wait "$LOAD" || true
RSS_END=$(tail -n 1 "$WORK/samples.tsv" | cut -f2)
wait_helpers() { for _ in $(seq 60); do [ -f "$WORK/vanish.count" ] && [ -f "$WORK/stall.count" ] && return; sleep 1; done; }
wait_helpers

# Every stream ended: the descriptors must be back where they started.
for _ in $(seq 120); do
  [ "$(active)" = 0 ] && [ "$(fds)" -le "$FDS0" ] && break
  sleep 0.5
done
FDS1=$(fds)
# The devices map forgets a device within a second of its last stream.
for _ in $(seq 10); do [ "$(tracked)" = 0 ] && break; sleep 0.5; done
DEV1=$(tracked || echo '?')
DEV_MAX=$(awk -F'\t' 'NR > 1 && $5 ~ /^[0-9]+$/ && $5 > m {m = $5} END {print m + 0}' "$WORK/samples.tsv")
RSS_IDLE1=$(rss)

python3 - "$WORK" "$RSS_WARM" "$RSS_END" "$RSS_IDLE0" "$RSS_IDLE1" "$FDS0" "$FDS1" "$SECS" "$WARM_AT" "$DEV_MAX" "$DEV1" <<'EOF'
import json, sys
work, warm, end, idle0, idle1, fds0, fds1, secs, warm_s, dev_max, dev1 = sys.argv[1:]
warm, end, idle0, idle1, fds0, fds1 = map(int, (warm, end, idle0, idle1, fds0, fds1))
r = json.load(open(f"{work}/load.json"))
vanish = open(f"{work}/vanish.count").read().strip()
stall = open(f"{work}/stall.count").read().strip()
drift = (end - warm) / warm * 100
ok_rss = abs(drift) < 5
ok_lost = r["lost"] == 0 and r["duplicated"] == 0 and r["reordered"] == 0
ok_fds = fds1 <= fds0
print(f"soak: {int(secs)//60} min, {r['streams_started']} streams started by the steady load "
      f"({r['streams_ok']} completed, {r['streams_failed']} failed {json.dumps(r['streams_failed_by_code'])}, {r['streams_cut']} cut at the end)")
print(f"  vanishing-client rounds: {vanish} (10 clients each); stalling-client rounds: {stall} (10 clients each)")
print(f"  frames: {r['frames_sent']} sent, {r['frames_received']} echoed; rtt p50 {r['rtt']['p50_ms']:.2f} ms, p99 {r['rtt']['p99_ms']:.2f} ms")
print(f"  RSS after {warm_s}s {warm} kB, at the end {end} kB: drift {drift:+.2f}%  [{'ok' if ok_rss else 'FAIL'}: under 5%]")
print(f"  lost {r['lost']}, duplicated {r['duplicated']}, reordered {r['reordered']} on completed streams  [{'ok' if ok_lost else 'FAIL'}: 0]")
print(f"  fds before the load {fds0}, after every stream ended {fds1}  [{'ok' if ok_fds else 'FAIL'}: back to the start]")
print(f"  idle RSS before {idle0} kB, after {idle1} kB")
print(f"  devices remembered: at most {dev_max} in a sample, {dev1} once every stream ended")
print("PASS" if ok_rss and ok_lost and ok_fds else "FAIL")
sys.exit(0 if ok_rss and ok_lost and ok_fds else 3)
EOF
