#!/usr/bin/env bash
# Live streams on a TLS client port while a flood of ClientHellos hits it:
# what the flood costs the streams, same-session A/B of clio-relay builds.
#
#   bash tools/handshake-flood.sh [-k rsa4096|rsa2048|p256] [-f HELLOS_PER_S] [-n STREAMS] [-d SECONDS] [-r ROUNDS] DIR [DIR...]
#
# Each DIR holds a `clio-relay` binary (e.g. target/release of two
# worktrees). The script makes a certificate and key of the kind -k says
# (default rsa4096, the costliest signature the relay loads) with openssl,
# then, for each round and each DIR in turn: a 1-shard relay with [tls] in
# front of fake-soniox (echo mode); HAProxy on 127.0.0.1 taking plain
# connections and opening a TLS one to the relay for each (relay-load
# speaks ws:// only); `relay-load -n STREAMS --ramp 100 --stream-seconds
# SECONDS` through it (default 20; W1's 100 ms frames at real-time pace,
# echoed); and from the third second for SECONDS - 6 (at least 1),
# `tools/tls-hello-flood.py` sending
# HELLOS_PER_S ClientHellos a second (default 400) straight to the relay
# port, each waiting for the relay's first flight (its signature) and
# closing. Meanwhile the relay's /metrics is fetched every 250 ms: its
# answer needs the shard's, as the systemd watchdog's check does.
# One shard, so that the flood and the streams share it.
#
# Prints, per run: the streams' lost frames and failed streams, their
# round trip p50/p99/p99.9, the slowest /metrics answer, the hellos
# answered a second (what the shard still signs) and the relay's CPU.
# Everything listens on 127.0.0.1; every run is bounded in time. Needs
# haproxy and openssl; fake-soniox and relay-load come from
# ./target/release (built if missing). HF_KEEP=1 keeps the work directory.
set -euo pipefail
{
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIND=rsa4096
RATE=400
N=200
ROUNDS=2
SECONDS_=20
usage="handshake-flood: usage: bash tools/handshake-flood.sh [-k rsa4096|rsa2048|p256] [-f HELLOS_PER_S] [-n STREAMS] [-d SECONDS] [-r ROUNDS] DIR [DIR...] (-h for help)"
for a in "$@"; do
  [[ $a == --help ]] && { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0; }
  [[ $a == -- ]] && break
done
while getopts "k:f:n:d:r:h" o; do
  case "$o" in
    k) KIND=$OPTARG ;;
    f) RATE=$OPTARG ;;
    n) N=$OPTARG ;;
    d) SECONDS_=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    h) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
case "$KIND" in rsa4096|rsa2048|p256) ;; *) echo "handshake-flood: -k takes rsa4096, rsa2048 or p256 (got '$KIND')" >&2; exit 2 ;; esac
[[ $RATE =~ ^[1-9][0-9]*$ ]] || { echo "handshake-flood: -f needs a number of hellos a second, 1 or more (got '$RATE')" >&2; exit 2; }
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "handshake-flood: -n needs a number of streams, 1 or more (got '$N')" >&2; exit 2; }
[[ $SECONDS_ =~ ^[1-9][0-9]*$ ]] || { echo "handshake-flood: -d needs the streams' length in whole seconds, 1 or more (got '$SECONDS_')" >&2; exit 2; }
FLOOD_SECONDS=$(( SECONDS_ > 7 ? SECONDS_ - 6 : 1 ))
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "handshake-flood: -r needs a number of rounds, 1 or more (got '$ROUNDS')" >&2; exit 2; }
[ $# -ge 1 ] || { echo "handshake-flood: give at least one directory with a clio-relay binary" >&2; exit 2; }
for d in "$@"; do [ -x "$d/clio-relay" ] || { echo "handshake-flood: no $d/clio-relay" >&2; exit 2; }; done
for p in haproxy openssl python3 curl; do
  command -v "$p" > /dev/null || { echo "handshake-flood: $p is not installed (apt-get install $p)" >&2; exit 2; }
done

BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
[ -x "$BIN/fake-soniox" ] && [ -x "$BIN/relay-load" ] \
  || (cd "$ROOT" && cargo build --release --bin fake-soniox --bin relay-load)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/handshake-flood.XXXXXX")
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
FAKE_PORT=$(free_port) ADMIN_PORT=$(free_port)
export HF_SECRET HF_KEY HF_MASTER
HF_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
HF_MASTER=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
HF_KEY="hf-key-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${HF_KEEP:-0}" = 1 ]; then echo "handshake-flood: work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case "$KIND" in
  rsa4096) KEYOPT=(-newkey rsa:4096) ;;
  rsa2048) KEYOPT=(-newkey rsa:2048) ;;
  p256) KEYOPT=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
esac
openssl req -x509 "${KEYOPT[@]}" -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2> "$WORK/openssl.log" \
  || { cat "$WORK/openssl.log" >&2; exit 1; }

"$BIN/fake-soniox" --echo --shards 1 --max-concurrent 20000 --key "$HF_KEY" \
  --listen "127.0.0.1:$FAKE_PORT" > "$WORK/fake.log" 2>&1 &
PIDS+=($!)

relay_gone() {
  echo "handshake-flood: $dir/clio-relay $1 (round $round); the end of its log:" >&2
  tail -n 5 "$WORK/relay.log" >&2
  exit 1
}
wait_port() { # PORT PID
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

echo "$KIND key, $RATE hellos/s for ${FLOOD_SECONDS} s, $N streams of ${SECONDS_} s"
echo
echo "| round | build | lost | failed | rtt p50 (ms) | p99 (ms) | p99.9 (ms) | slowest /metrics (ms) | hellos answered/s | unanswered | relay CPU s |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
  for dir in "$@"; do
    RELAY_PORT=$(free_port) HAP_PORT=$(free_port)
    rm -rf "$WORK/state"; mkdir -p "$WORK/state"
    cat > "$WORK/relay.toml" <<EOF
[server]
listen = "127.0.0.1:$RELAY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
shards = 1
max_streams = 9500
[tls]
cert_file = "$WORK/cert.pem"
key_file = "$WORK/key.pem"
[upstream]
url = "ws://127.0.0.1:$FAKE_PORT/transcribe-websocket"
connect_timeout = "30s"
[tokens]
secret_env = "HF_SECRET"
[limits]
idle_timeout = "60s"
[admin]
state_dir = "$WORK/state"
health_interval = "0s"
master_key_env = "HF_MASTER"
[[account]]
id = "hf"
key_env = "HF_KEY"
max_concurrent_streams = 20000
EOF
    cat > "$WORK/haproxy.cfg" <<EOF
global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend plain
  bind 127.0.0.1:$HAP_PORT
  default_backend relay
backend relay
  server relay 127.0.0.1:$RELAY_PORT ssl verify none sni str(localhost) alpn http/1.1
EOF
    "$dir/clio-relay" run --config "$WORK/relay.toml" > "$WORK/relay.log" 2>&1 &
    rp=$!
    PIDS+=("$rp")
    wait_port "$RELAY_PORT" "$rp" || relay_gone "did not start listening on 127.0.0.1:$RELAY_PORT"
    haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
    hp=$!
    PIDS+=("$hp")
    wait_port "$HAP_PORT" "$hp" || { echo "handshake-flood: haproxy did not start:" >&2; tail -n 5 "$WORK/haproxy.log" >&2; exit 1; }
    ticks0=$(awk '{ print $14 + $15 }' "/proc/$rp/stat")
    # /metrics every 250 ms, each answer's time in ms, until told to stop.
    (
      while [ ! -e "$WORK/stop" ]; do
        curl -s -o /dev/null -m 10 -w '%{time_total}\n' "http://127.0.0.1:$ADMIN_PORT/metrics" || echo 10
        sleep 0.25
      done
    ) > "$WORK/metrics_times" &
    mp=$!
    PIDS+=("$mp")
    (sleep 3; timeout $(( FLOOD_SECONDS + 20 )) python3 "$ROOT/tools/tls-hello-flood.py" "127.0.0.1:$RELAY_PORT" \
      --rate "$RATE" --seconds "$FLOOD_SECONDS" > "$WORK/flood.json" 2> "$WORK/flood.log") &
    fp=$!
    timeout --kill-after=10 $(( SECONDS_ + 40 )) "$BIN/relay-load" --relay-config "$WORK/relay.toml" \
      --url "ws://127.0.0.1:$HAP_PORT/v1/transcribe" -n "$N" --ramp 100 --stream-seconds "$SECONDS_" \
      --json --quiet > "$WORK/load.json" 2> "$WORK/load.log" || true
    wait "$fp" || true
    touch "$WORK/stop"; wait "$mp" 2>/dev/null || true; rm -f "$WORK/stop"
    kill -0 "$rp" 2>/dev/null || relay_gone "exited during the run"
    ticks=$(( $(awk '{ print $14 + $15 }' "/proc/$rp/stat") - ticks0 ))
    kill "$hp" "$rp" 2>/dev/null || true
    wait "$hp" "$rp" 2>/dev/null || true
    [ -s "$WORK/load.json" ] || { echo "handshake-flood: relay-load said nothing; its log:" >&2; tail -n 5 "$WORK/load.log" >&2; exit 1; }
    [ -s "$WORK/flood.json" ] || { echo "handshake-flood: the flood said nothing; its log:" >&2; tail -n 5 "$WORK/flood.log" >&2; exit 1; }
    python3 - "$WORK/load.json" "$WORK/flood.json" "$WORK/metrics_times" "$round" "$dir" "$ticks" "$(getconf CLK_TCK)" <<'PY'
import json, sys
load, flood = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
times = [float(l) for l in open(sys.argv[3]) if l.strip()]
round_, build, ticks, hz = sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
rtt = load.get("rtt") or {}
def ms(v):
    return "-" if v is None else f"{v:.2f}"
print(f"| {round_} | {build} | {load.get('lost', '-')} | {load.get('streams_failed', '-')} "
      f"| {ms(rtt.get('p50_ms'))} | {ms(rtt.get('p99_ms'))} | {ms(rtt.get('p999_ms'))} "
      f"| {max(times) * 1000 if times else float('nan'):.0f} "
      f"| {flood['answered'] / flood['seconds']:.0f} | {flood['unanswered']} | {ticks / hz:.1f} |")
PY
  done
done
exit 0
}
