#!/usr/bin/env bash
# Head-to-head: clio-relay against nginx and the seed's Node.js proxy.
#
#   bash tools/head-to-head.sh [--quick] [--write-readme]
#
# Runs the same workloads, one proxy after another, through
#   direct  relay-load -> fake-soniox (the baseline)
#   floor   relay-load -> tools/head-to-head/floor-proxy.c (bytes copied, nothing
#           read; built with cc) -> fake-soniox: the least a proxy costs
#   clio    relay-load -> clio-relay -> fake-soniox
#   nginx   relay-load -> nginx (Upgrade proxying, key injected as a header) -> fake-soniox
#   node    relay-load -> tools/head-to-head/node-proxy.js (npm `ws`) -> fake-soniox
# Workloads: W1s real time at 1,500 streams, W1 real time at 5,000, W2 flood,
# W3 churn, W4 idle (see benches/README.md).
# Samples each proxy's CPU time (utime+stime, /proc/PID/stat, nginx master +
# workers) before/after each workload and its RSS (VmRSS) during it. During
# W1s, W1, W2 and W3 it also runs `perf record -g` on each proxy for a window
# in the middle of the run, and counts the share of the proxy's samples spent
# in the kernel's socket send and receive paths
# (tools/head-to-head/kernel_floor.py): the kernel socket floor per echoed
# frame and per churn cycle, beside each ratio. Then it
# prints one markdown table (tools/head-to-head/summary.py). Raw outputs
# (perf data and reports included) stay in the work dir (printed at the
# start; H2H_WORK=DIR to choose it).
#
# Everything listens on 127.0.0.1; every load run is bounded in time; every
# process started here is stopped on exit, failure included.
#
# Environment: CARGO_TARGET_DIR (default ./target), H2H_WORK, H2H_PROXIES
# (default "direct clio nginx node"; add floor for the floor proxy), H2H_WORKLOADS (default "W1s W1 W2 W3 W4"),
# H2H_W1_STREAMS and H2H_W1_SECONDS (W1's size), H2H_CLIO_SHARDS (default: cores;
# more shards than cores leaves them unpinned), H2H_PERF=0 (no perf windows),
# H2H_FRESH=1 (a fresh proxy process for every workload, not one per proxy),
# H2H_PIN_PEERS=1 (relay-load on the first core, fake-soniox's threads on the
# last, with taskset: the proxies' run-to-run spread is smaller with the
# peers in place; the proxies themselves are placed as they place themselves),
# H2H_BIN=DIR (clio-relay, fake-soniox and relay-load from DIR, not built).
# nginx and node (with npm `ws`) are needed, and installed, only when
# H2H_PROXIES names them. Every server listens on a port free when the
# script starts; one that exits at its start (its port taken meanwhile)
# ends the run there.
set -euo pipefail

# The whole script is one compound command, parsed before it runs: editing
# this file during a run cannot change what the run does.
{
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
WRITE_README=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    --write-readme) WRITE_README=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "head-to-head: unknown argument $a" >&2; exit 2 ;;
  esac
done
COMMAND="bash tools/head-to-head.sh${*:+ $*}"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
NPROC=$(nproc)
CLK_TCK=$(getconf CLK_TCK)
PROXIES=${H2H_PROXIES:-direct clio nginx node}
WORKLOADS=${H2H_WORKLOADS:-W1s W1 W2 W3 W4}
FRESH=${H2H_FRESH:-0}
PIN_PEERS=${H2H_PIN_PEERS:-0}
case "$PIN_PEERS" in
  0) LOAD_PIN=() ;;
  1)
    command -v taskset > /dev/null \
      || { echo "head-to-head: H2H_PIN_PEERS=1 needs taskset (util-linux)" >&2; exit 2; }
    [ "$NPROC" -ge 2 ] \
      || { echo "head-to-head: H2H_PIN_PEERS=1 needs 2 cores or more (this machine has $NPROC)" >&2; exit 2; }
    LOAD_PIN=(taskset -c 0) ;;
  *) echo "head-to-head: H2H_PIN_PEERS is 0 or 1 (got '$PIN_PEERS')" >&2; exit 2 ;;
esac
# Workloads profiled for the kernel socket floor.
PERF_WORKLOADS="W1s W1 W2 W3"
for w in $WORKLOADS; do
  case "$w" in
    W1s|W1|W2|W3|W4) ;;
    *) echo "head-to-head: unknown workload $w (W1s W1 W2 W3 W4)" >&2; exit 2 ;;
  esac
done

proxy_asked() { case " $PROXIES " in *" $1 "*) return 0 ;; esac; return 1; }

log() { printf '[h2h %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
CHILDREN=()
cleanup() {
  local rc=$?
  set +e
  for pid in "${CHILDREN[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${CHILDREN[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- install
if proxy_asked nginx && ! command -v nginx >/dev/null 2>&1; then
  log "installing nginx (Debian)"
  apt-get install -y nginx >/dev/null || { apt-get update >/dev/null && apt-get install -y nginx >/dev/null; } || true
  # Said here, before anything starts: a failed install went on to
  # "nginx: command not found" and "nginx config refused".
  command -v nginx >/dev/null 2>&1 \
    || die "nginx is missing and could not be installed (apt-get install -y nginx failed); install it, or leave nginx out of H2H_PROXIES (now \"$PROXIES\")"
fi
if proxy_asked node; then
  command -v node >/dev/null 2>&1 || die "node is missing (apt-get install -y nodejs npm)"
fi
if proxy_asked floor; then
  command -v cc >/dev/null 2>&1 || die "cc is missing for the floor proxy (apt-get install -y gcc)"
fi
command -v python3 >/dev/null 2>&1 || die "python3 is missing"
# Ports free now, one each (the kernel's pick, all held at once so they
# differ). Fixed ones were taken by another engineer's run, and the run
# then measured whatever listened there.
read -r FAKE_PORT CLIO_PORT CLIO_ADMIN_PORT NGINX_PORT NODE_PORT FLOOR_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(6)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))')
PERF_ON=${H2H_PERF:-1}
if [ "$PERF_ON" = 1 ] && ! command -v perf >/dev/null 2>&1; then
  log "installing linux-perf (Debian)"
  apt-get install -y linux-perf >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y linux-perf >/dev/null 2>&1; } || true
fi

NODE_DIR=$TARGET_DIR/h2h-node
if proxy_asked node && [ ! -d "$NODE_DIR/node_modules/ws" ]; then
  log "npm install ws into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  (cd "$NODE_DIR" && { [ -f package.json ] || echo '{"private":true}' > package.json; } \
    && npm install --no-audit --no-fund --loglevel=error ws@8 >/dev/null)
fi

if [ -n "${H2H_BIN:-}" ]; then
  BIN=$H2H_BIN
else
  log "cargo build --release --bins"
  (cd "$ROOT" && cargo build --release --bins --quiet)
fi

# ---------------------------------------------------------------- work dir
WORK=${H2H_WORK:-$(mktemp -d /tmp/h2h.XXXXXX)}
mkdir -p "$WORK"
log "work dir: $WORK"

# Can perf record here (installed, allowed by perf_event_paranoid, a kernel
# with callchains)? If not, the floor is skipped and the summary says why.
PERF_NOTE=""
if [ "$PERF_ON" != 1 ]; then
  PERF_NOTE="H2H_PERF=0"
elif ! command -v perf >/dev/null 2>&1; then
  PERF_NOTE="perf is not installed (apt-get install -y linux-perf failed)"
elif ! perf record -q -F 999 -g -e cpu-clock -o "$WORK/perf-probe.data" -- sleep 0.2 \
    > "$WORK/perf-probe.txt" 2>&1 || [ ! -s "$WORK/perf-probe.data" ]; then
  PERF_NOTE="perf cannot record: $(grep -m1 -v '^ *$' "$WORK/perf-probe.txt" | tr -d '"\\' | cut -c1-160)"
fi
rm -f "$WORK/perf-probe.data"
[ -z "$PERF_NOTE" ] || log "no kernel floor: $PERF_NOTE"

export CLIO_RELAY_TOKEN_SECRET
CLIO_RELAY_TOKEN_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export H2H_SONIOX_KEY="h2h-fake-key-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
NODE_TOKEN="h2h-node-token-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"

mkdir -p "$WORK/relay-state"
cat > "$WORK/relay.toml" <<EOF
[server]
listen = "127.0.0.1:$CLIO_PORT"
admin_listen = "127.0.0.1:$CLIO_ADMIN_PORT"
shards = ${H2H_CLIO_SHARDS:-$NPROC}
max_streams = 9500

[upstream]
url = "ws://127.0.0.1:$FAKE_PORT/transcribe-websocket"
auth = "header"
# The relay is given nginx's patience below: proxy_connect_timeout's
# default (60 s) for the open, proxy_send_timeout (3600 s) for an upstream
# that stops reading. On a host the 5,000-stream W1 overloads, fake-soniox
# answers upgrades seconds late and stops reading for seconds at a time;
# with its defaults (5 s to open, 10 s stalled) the relay ended or moved
# those streams, which nginx waited out.
connect_timeout = "60s"

[tokens]
secret_env = "CLIO_RELAY_TOKEN_SECRET"
default_ttl = "15m"
max_ttl = "24h"

[limits]
idle_timeout = "60s"
stall_timeout = "3600s"
# nginx's client_header_timeout default (60 s) for the client's request
# head: at 5,000 streams relay-load sends its heads seconds late, and the
# relay's default (10 s) refused 169 of them with 408 where nginx waited.
handshake_timeout = "60s"

[admin]
state_dir = "$WORK/relay-state"
health_interval = "0s"

[[account]]
id = "h2h-account-1"
key_env = "H2H_SONIOX_KEY"
region = "local"
enabled = true
max_concurrent_streams = 20000
EOF
"$BIN/clio-relay" check-config --config "$WORK/relay.toml" > "$WORK/relay-check.txt" 2>&1 \
  || { cat "$WORK/relay-check.txt" >&2; die "relay config refused"; }

mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
cat > "$WORK/nginx.conf" <<EOF
worker_processes $NPROC;
worker_rlimit_nofile 20000;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events {
    worker_connections 19000;
    multi_accept on;
}
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      close;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT reuseport backlog=4096;
        location /v1/transcribe {
            proxy_pass http://127.0.0.1:$FAKE_PORT/transcribe-websocket;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host 127.0.0.1:$FAKE_PORT;
            proxy_set_header Authorization "Bearer $H2H_SONIOX_KEY";
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }
    }
}
EOF
if proxy_asked nginx; then
  nginx -t -q -c "$WORK/nginx.conf" -p "$WORK/nginx/" 2> "$WORK/nginx-t.txt" \
    || { cat "$WORK/nginx-t.txt" >&2; die "nginx config refused"; }
fi
if proxy_asked floor; then
  cc -O2 -o "$WORK/floor-proxy" "$ROOT/tools/head-to-head/floor-proxy.c" 2> "$WORK/floor-cc.txt" \
    || { cat "$WORK/floor-cc.txt" >&2; die "the floor proxy did not build"; }
fi

# ---------------------------------------------------------------- helpers
# wait_port PORT PID: until something accepts on 127.0.0.1:PORT (at most
# 10 s) with PID still running a moment later; fails as soon as PID has
# exited (a server that could not listen: another process's port).
wait_port() {
  for _ in $(seq 100); do
    kill -0 "$2" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
      sleep 0.2
      kill -0 "$2" 2>/dev/null
      return
    fi
    sleep 0.1
  done
  return 1
}

# The pids whose CPU and RSS are the proxy's: the process and its children
# (nginx's workers).
PROXY_PID=""
proxy_pids() {
  [ -n "$PROXY_PID" ] || return 0
  echo "$PROXY_PID"
  ps -o pid= --ppid "$PROXY_PID" 2>/dev/null | tr -d ' ' || true
}

# cpu_ticks PID...: "ALL USER": utime + stime, and utime alone, summed
# (fields 14 and 15 of /proc/PID/stat).
cpu_ticks() {
  local total=0 user=0 pid rest
  for pid in "$@"; do
    rest=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${rest##*) }
    # after "comm) ": field 3 is state, so utime/stime are words 12 and 13.
    read -r -a f <<< "$rest"
    total=$((total + f[11] + f[12]))
    user=$((user + f[11]))
  done
  echo "$total $user"
}

# rss_kb PID...: VmRSS summed, in KiB.
rss_kb() {
  local total=0 pid v
  for pid in "$@"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# rss_sampler FILE: one line "MS KiB" (ms since it started) every 0.5 s,
# until killed.
rss_sampler() {
  local t0
  t0=$(date +%s%3N)
  while :; do
    # shellcheck disable=SC2046
    echo "$(( $(date +%s%3N) - t0 )) $(rss_kb $(proxy_pids))" >> "$1"
    sleep 0.5
  done
}

start_fake() {
  log "starting fake-soniox on 127.0.0.1:$FAKE_PORT"
  "$BIN/fake-soniox" --echo --shards 2 --max-concurrent 20000 --key "$H2H_SONIOX_KEY" \
    --listen "127.0.0.1:$FAKE_PORT" > "$WORK/fake-soniox.log" 2>&1 &
  FAKE_PID=$!
  CHILDREN+=("$FAKE_PID")
  wait_port "$FAKE_PORT" "$FAKE_PID" \
    || die "fake-soniox did not start: $(tail -n 1 "$WORK/fake-soniox.log")"
  if [ "$PIN_PEERS" = 1 ]; then
    # Its threads are all there once it listens.
    taskset -a -p -c $(( NPROC - 1 )) "$FAKE_PID" > /dev/null \
      || die "could not pin fake-soniox to core $(( NPROC - 1 ))"
    log "peers pinned: relay-load on core 0, fake-soniox on core $(( NPROC - 1 ))"
  fi
}

# start_proxy NAME: starts it, sets PROXY_PID and TARGET_ARGS.
start_proxy() {
  PROXY_PID=""
  case "$1" in
    direct)
      TARGET_ARGS=(--direct --target "127.0.0.1:$FAKE_PORT" --key "$H2H_SONIOX_KEY")
      return 0 ;;
    clio)
      "$BIN/clio-relay" run --config "$WORK/relay.toml" > "$WORK/clio-relay.log" 2>&1 &
      PROXY_PID=$!
      TARGET_ARGS=(--target "127.0.0.1:$CLIO_PORT" --relay-config "$WORK/relay.toml")
      port=$CLIO_PORT ;;
    nginx)
      nginx -c "$WORK/nginx.conf" -p "$WORK/nginx/" > "$WORK/nginx/stdout.log" 2>&1 &
      PROXY_PID=$!
      TARGET_ARGS=(--url "ws://127.0.0.1:$NGINX_PORT/v1/transcribe" --auth none)
      port=$NGINX_PORT ;;
    node)
      LISTEN_PORT=$NODE_PORT UPSTREAM_URL="ws://127.0.0.1:$FAKE_PORT/transcribe-websocket" \
        CLIENT_TOKEN="$NODE_TOKEN" API_KEY="$H2H_SONIOX_KEY" NODE_PATH="$NODE_DIR/node_modules" \
        node "$ROOT/tools/head-to-head/node-proxy.js" > "$WORK/node-proxy.log" 2>&1 &
      PROXY_PID=$!
      TARGET_ARGS=(--url "ws://127.0.0.1:$NODE_PORT/v1/transcribe" --auth query --key "$NODE_TOKEN")
      port=$NODE_PORT ;;
    floor)
      "$WORK/floor-proxy" "$FLOOR_PORT" "$FAKE_PORT" "$NPROC" > "$WORK/floor-proxy.log" 2>&1 &
      PROXY_PID=$!
      TARGET_ARGS=(--direct --target "127.0.0.1:$FLOOR_PORT" --key "$H2H_SONIOX_KEY")
      port=$FLOOR_PORT ;;
    *) die "unknown proxy $1" ;;
  esac
  CHILDREN+=("$PROXY_PID")
  wait_port "$port" "$PROXY_PID" || die "$1 did not start (its log is in $WORK)"
  sleep 1
}

stop_proxy() {
  [ -n "$PROXY_PID" ] || return 0
  kill -TERM "$PROXY_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$PROXY_PID" 2>/dev/null || true
  wait "$PROXY_PID" 2>/dev/null || true
  PROXY_PID=""
}

# Workload arguments and hard caps (seconds of wall time for relay-load).
# X_PERF="START LENGTH": the perf window, seconds after relay-load starts
# (after the ramp of 500 streams/s, before the streams end).
if [ "$QUICK" = 1 ]; then
  W1s_ARGS=(-n 300 --stream-seconds 10);                        W1s_CAP=60; W1s_PERF="3 5"
  W1_ARGS=(-n 500 --stream-seconds 10);                         W1_CAP=60; W1_PERF="3 5"
  W2_ARGS=(-n 200 --pace flood --stream-seconds 100000 --duration 10s); W2_CAP=40; W2_PERF="3 5"
  W3_ARGS=(--churn --concurrency 50 --duration 5s);             W3_CAP=40; W3_PERF="1 3"
  W4_ARGS=(--idle -n 1000 --ramp 1000 --duration 10s);          W4_CAP=40; W4_HOLD_S=10
  W1s_STREAMS=300; W1_STREAMS=500; W4_STREAMS=1000
else
  W1s_ARGS=(-n 1500 --stream-seconds 30);                       W1s_CAP=100; W1s_PERF="8 8"
  W1_ARGS=(-n 5000 --stream-seconds 60);                        W1_CAP=150; W1_PERF="25 10"
  W2_ARGS=(-n 200 --pace flood --stream-seconds 100000 --duration 30s); W2_CAP=90; W2_PERF="10 8"
  W3_ARGS=(--churn --concurrency 50 --duration 20s);            W3_CAP=80; W3_PERF="5 8"
  W4_ARGS=(--idle -n 9000 --ramp 1000 --duration 30s);          W4_CAP=100; W4_HOLD_S=30
  W1s_STREAMS=1500; W1_STREAMS=5000; W4_STREAMS=9000
fi
# W1 at another size (e.g. one the direct path is not saturated by):
# H2H_W1_STREAMS=N H2H_W1_SECONDS=S.
if [ -n "${H2H_W1_STREAMS:-}${H2H_W1_SECONDS:-}" ]; then
  W1_STREAMS=${H2H_W1_STREAMS:-$W1_STREAMS}
  W1_SECS=${H2H_W1_SECONDS:-${W1_ARGS[3]}}
  W1_ARGS=(-n "$W1_STREAMS" --stream-seconds "$W1_SECS")
  W1_CAP=$((W1_STREAMS / 500 + W1_SECS + 60))
  # The window: a third of the streams' time, after the ramp and a third.
  W1_PERF="$((W1_STREAMS / 500 + W1_SECS / 3)) $((W1_SECS / 3 > 0 ? W1_SECS / 3 : 1))"
fi

# Profiling a proxy: perf attaches before the run with its events disabled
# (attaching can take seconds on a busy machine), and a control FIFO turns
# the sampling on and off at the window's ends, so the window is exactly
# where it is asked for. 999 Hz of cpu-clock: a sample is about 1 ms of the
# proxy's CPU time (the VM has no hardware cycle counter), and the sampling
# costs the proxy little.
#
# perf_ctl OUT COMMAND [TIMEOUT]: sends COMMAND (enable, disable, ping) to
# the perf of OUT and waits for its ack.
perf_ctl() {
  # shellcheck disable=SC2016
  timeout "${3:-10}" sh -c 'echo "$1" > "$0.perf.ctl" && read -r _ < "$0.perf.ack"' "$1" "$2" \
    2>/dev/null
}

# perf_attach OUT PIDS: perf record -g on PIDS (comma-separated), events
# off, into OUT.perf.data; sets PERF_PID. Fails if perf is not ready in 60 s.
perf_attach() {
  rm -f "$1.perf.ctl" "$1.perf.ack"
  mkfifo "$1.perf.ctl" "$1.perf.ack"
  perf record -D -1 --control "fifo:$1.perf.ctl,$1.perf.ack" -q -F 999 -g -e cpu-clock \
    -p "$2" -o "$1.perf.data" > "$1.perf.txt" 2>&1 &
  PERF_PID=$!
  CHILDREN+=("$PERF_PID")
  perf_ctl "$1" ping 60
}

# perf_window OUT START LENGTH: from START seconds from now, samples for
# LENGTH seconds; notes when the window really opened and closed
# (OUT.perf.t0, OUT.perf.t1: ms since the epoch).
perf_window() {
  sleep "$2"
  perf_ctl "$1" enable || exit 0
  date +%s%3N > "$1.perf.t0"
  sleep "$3"
  perf_ctl "$1" disable || exit 0
  date +%s%3N > "$1.perf.t1"
}

# perf_detach: perf writes its file and exits (at most 30 s).
perf_detach() {
  kill -INT "$PERF_PID" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$PERF_PID" 2>/dev/null || break; sleep 0.1; done
  kill -TERM "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
}

# perf_floor OUT: the share of OUT.perf.data's samples in the kernel's socket
# send and receive paths (OUT.floor.json), and `perf report --children` of
# it to read (OUT.perf-report.txt).
perf_floor() {
  local out=$1
  if [ ! -s "$out.perf.data" ]; then
    echo '{"error": "perf wrote no data (see '"$(basename "$out")"'.perf.txt)"}' > "$out.floor.json"
    return 0
  fi
  perf script -i "$out.perf.data" -F comm,tid,ip,sym 2> "$out.perf-script.err" \
    | python3 "$ROOT/tools/head-to-head/kernel_floor.py" > "$out.floor.json" \
    || echo '{"error": "perf script failed"}' > "$out.floor.json"
  perf report -i "$out.perf.data" --children --stdio --percent-limit 0.5 -g none --sort dso,sym \
    > "$out.perf-report.txt" 2>/dev/null || true
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print("  kernel socket share %.1f%% of %d samples" % (100 * j["share"], j["samples"]))' \
    "$out.floor.json" >&2 2>/dev/null || log "  no kernel floor; see $out.floor.json"
}

# run_workload PROXY W: one relay-load run with CPU and RSS samples around it.
run_workload() {
  local proxy=$1 w=$2 args cap out pids cpu0 cpu1 fcpu0 fcpu1 rss0 sampler rc=0
  local perf_win="" perf_job="" perf_attached=0 perf_cut=0 t_start t_end perf_t0=0 perf_t1=0
  eval "args=(\"\${${w}_ARGS[@]}\")"
  eval "cap=\$${w}_CAP"
  eval "perf_win=\${${w}_PERF:-}"
  case " $PERF_WORKLOADS " in *" $w "*) ;; *) perf_win="" ;; esac
  [ -n "$PROXY_PID" ] && [ -z "$PERF_NOTE" ] || perf_win=""
  out=$WORK/$proxy-$w
  rm -f "$out.rss" "$out.perf.data" "$out.floor.json" "$out.perf.t0" "$out.perf.t1"
  # shellcheck disable=SC2046
  pids=$(proxy_pids | tr '\n' ' ')
  if [ -n "$perf_win" ]; then
    # shellcheck disable=SC2086
    if perf_attach "$out" "$(echo $pids | tr ' ' ',')"; then
      perf_attached=1
    else
      log "  perf did not attach (see $out.perf.txt): no kernel floor for this run"
      perf_detach
      echo '{"error": "perf did not attach (see '"$(basename "$out")"'.perf.txt)"}' \
        > "$out.floor.json"
      perf_win=""
    fi
  fi
  # shellcheck disable=SC2086
  read -r cpu0 ucpu0 < <(cpu_ticks $pids); rss0=$(rss_kb $pids)
  read -r fcpu0 _ < <(cpu_ticks "$FAKE_PID")
  rss_sampler "$out.rss" &
  sampler=$!
  if [ -n "$perf_win" ]; then
    # shellcheck disable=SC2086
    perf_window "$out" $perf_win &
    perf_job=$!
    CHILDREN+=("$perf_job")
  fi
  log "$proxy $w: relay-load ${args[*]}${perf_win:+ (perf from ${perf_win% *} s for ${perf_win#* } s)}"
  t_start=$(date +%s%3N)
  timeout --kill-after=10 "$cap" "${LOAD_PIN[@]}" "$BIN/relay-load" "${TARGET_ARGS[@]}" "${args[@]}" --json -q \
    > "$out.json" 2> "$out.err" || rc=$?
  t_end=$(date +%s%3N)
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
  # A proxy or fake-soniox that exited during the run has no CPU to read
  # after it: before, its CPU read as 0 ticks, the table showed a negative
  # CPU per frame as a measure, and its later workloads measured nothing.
  if [ -n "$PROXY_PID" ] && ! kill -0 "$PROXY_PID" 2>/dev/null; then
    die "$proxy exited during $w (relay-load exit $rc): nothing of its run can be measured; its log is in $WORK"
  fi
  kill -0 "$FAKE_PID" 2>/dev/null \
    || die "fake-soniox exited during $proxy $w: $(tail -n 1 "$WORK/fake-soniox.log")"
  if [ -n "$perf_job" ]; then
    # The window should close inside the run. If the run ended first, the
    # samples stop here and include its end (the summary says so).
    if [ ! -s "$out.perf.t1" ]; then
      perf_cut=1
      log "  the run ended before the perf window closed"
      kill -TERM "$perf_job" 2>/dev/null || true
      perf_ctl "$out" disable || true
    fi
    wait "$perf_job" 2>/dev/null || true
    perf_t0=$(cat "$out.perf.t0" 2>/dev/null || echo "$t_end")
    perf_t1=$(cat "$out.perf.t1" 2>/dev/null || echo "$t_end")
    perf_t0=$(( perf_t0 - t_start )); perf_t1=$(( perf_t1 - t_start ))
  fi
  # shellcheck disable=SC2046
  pids=$(proxy_pids | tr '\n' ' ')
  # shellcheck disable=SC2086
  read -r cpu1 ucpu1 < <(cpu_ticks $pids)
  read -r fcpu1 _ < <(cpu_ticks "$FAKE_PID")
  # Peak over the whole run; "held" only over samples taken before the
  # workload's hold ends, i.e. with all streams open and idle. relay-load
  # holds idle streams until a fifth of --duration (at most 5 s) before
  # its end, then closes every one at once; half a second's margin.
  local peak held hold_ms hold_s
  hold_s=$(eval "echo \${${w}_HOLD_S:-0}")
  hold_ms=$(( hold_s * 1000 - (hold_s * 200 < 5000 ? hold_s * 200 : 5000) - 500 ))
  peak=$(awk '$2 > m { m = $2 } END { print m + 0 }' "$out.rss" 2>/dev/null || echo 0)
  held=$(awk -v lim="$hold_ms" 'lim <= 0 || $1 <= lim { if ($2 > m) m = $2 } END { print m + 0 }' \
    "$out.rss" 2>/dev/null || echo 0)
  cat > "$out.meta.json" <<EOF
{"proxy": "$proxy", "workload": "$w", "rc": $rc, "clk_tck": $CLK_TCK,
 "cpu_ticks_before": $cpu0, "cpu_ticks_after": $cpu1,
 "user_ticks_before": $ucpu0, "user_ticks_after": $ucpu1,
 "fake_cpu_ticks_before": $fcpu0, "fake_cpu_ticks_after": $fcpu1,
 "rss_kb_before": $rss0, "rss_kb_peak": ${peak:-0}, "rss_kb_held": ${held:-0},
 "streams": $(eval "echo \${${w}_STREAMS:-0}"), "proxy_pids": "$pids",
 "run_ms": $(( t_end - t_start )), "perf_window_s": "$perf_win", "perf_cut": $perf_cut,
 "perf_from_ms": $perf_t0, "perf_to_ms": $perf_t1}
EOF
  if [ -s "$out.json" ]; then
    # The report has the measures of its mode only (no cycles/s but in
    # churn, no frames or round trips in idle): print those it has.
    python3 - "$out.json" >&2 <<'PY' || true
import json, sys
j = json.load(open(sys.argv[1]))
parts = []
if "frames_per_sec" in j:
    parts.append("frames/s %.0f" % j["frames_per_sec"])
if "cycles_per_sec" in j:
    parts.append("cycles/s %.1f" % j["cycles_per_sec"])
if "rtt" in j:
    parts.append("rtt p99 %.2f ms" % j["rtt"]["p99_ms"])
parts.append("failed %d" % j["streams_failed"])
if "lost" in j:
    parts.append("lost %d" % j["lost"])
if "idle_held" in j:
    parts.append("held %d" % j["idle_held"])
print("  " + "  ".join(parts))
PY
  else
    # relay-load's reason (a file limit too low for the workload's
    # streams, say) here, not only in the file.
    log "  $proxy $w: no JSON (exit $rc): $(tail -n 1 "$out.err" 2>/dev/null); see $out.err"
  fi
  # After the CPU sample: writing and reading the perf data is not the
  # proxy's cost.
  if [ "$perf_attached" = 1 ]; then
    perf_detach
    rm -f "$out.perf.ctl" "$out.perf.ack"
  fi
  [ -z "$perf_job" ] || perf_floor "$out"
  # Let the sockets of this run close everywhere before the next one.
  sleep 3
}

# ---------------------------------------------------------------- run
{
  echo "{\"date\": \"$(date -u +%Y-%m-%d)\", \"started\": \"$(date -u +%FT%TZ)\","
  echo " \"quick\": $QUICK, \"command\": \"$COMMAND\", \"nproc\": $NPROC,"
  echo " \"cpu\": \"$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)\","
  echo " \"mem_gib\": $(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo),"
  if proxy_asked nginx; then NGINX_V=$(nginx -v 2>&1 | sed 's/.*\///'); else NGINX_V=""; fi
  if proxy_asked node; then
    NODE_V=$(node --version) WS_V=$(node -p "require('$NODE_DIR/node_modules/ws/package.json').version")
  else
    NODE_V="" WS_V=""
  fi
  echo " \"kernel\": \"$(uname -r)\", \"nginx\": \"$NGINX_V\","
  echo " \"node\": \"$NODE_V\", \"ws\": \"$WS_V\","
  echo " \"proxies\": \"$PROXIES\", \"workloads\": \"$WORKLOADS\","
  echo " \"perf_workloads\": \"$PERF_WORKLOADS\", \"perf_note\": \"$PERF_NOTE\", \"fresh\": $FRESH,"
  echo " \"pin_peers\": $PIN_PEERS}"
} > "$WORK/run.json"

start_fake
for proxy in $PROXIES; do
  log "=== $proxy"
  start_proxy "$proxy"
  first=1
  for w in $WORKLOADS; do
    if [ "$FRESH" = 1 ] && [ "$first" = 0 ]; then
      stop_proxy
      start_proxy "$proxy"
    fi
    first=0
    run_workload "$proxy" "$w"
  done
  stop_proxy
done
echo "{\"finished\": \"$(date -u +%FT%TZ)\"}" > "$WORK/finished.json"

SUMMARY_ARGS=("$WORK")
[ "$WRITE_README" = 1 ] && SUMMARY_ARGS+=(--write-readme "$ROOT/benches/README.md")
python3 "$ROOT/tools/head-to-head/summary.py" "${SUMMARY_ARGS[@]}"
log "raw outputs in $WORK"
exit 0
}
