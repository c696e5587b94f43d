#!/usr/bin/env bash
# Streams audio from a real browser (Debian's headless Chromium, driven by
# playwright-core) through a relay whose upstream, a fake Soniox, drops
# every connection at its 20th audio frame; checks that raw-audio streams
# come out whole, as the same audio gives with no faults, and that the
# relay's errors reach the browser as frames and close codes it can read
# (streams.mjs says which).
#
# Usage: bash tools/browser-check/run.sh
# Installs chromium (apt) and playwright-core (npm, into a temp dir) if missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/tools/browser-check/browser.sh"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

browser_setup "$work"
cp "$root/tools/browser-check/streams.mjs" "$work/"
# Soniox's own browser SDK, at the version this check was written against.
( cd "$work" && npm install --silent --no-audit --no-fund @soniox/speech-to-text-web@1.4.0 >/dev/null )

cd "$root"
cargo build --quiet --bins
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

# $1: log file; prints the fake's URL once it listens.
fake_url() {
  for _ in $(seq 100); do grep -q "listening on" "$1" && break; sleep 0.1; done
  grep -o 'ws://[^ ,]*' "$1" | head -1
}
# The fault-free reference, and the upstream that drops connections.
"$bin/fake-soniox" --listen 127.0.0.1:0 --key browser-ref-key --max-concurrent 50 > "$work/ref.log" 2>&1 &
pids+=($!)
"$bin/fake-soniox" --listen 127.0.0.1:0 --key browser-key --max-concurrent 50 --close-after-frames 20 > "$work/fake.log" 2>&1 &
pids+=($!)
ref_url=$(fake_url "$work/ref.log")
up_url=$(fake_url "$work/fake.log")

export BROWSER_TOKEN_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export BROWSER_KEY=browser-key
cat > "$work/relay.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shards = 2
max_streams = 50
[upstream]
url = "$up_url"
[tokens]
secret_env = "BROWSER_TOKEN_SECRET"
[admin]
state_dir = "$work/state"
[[account]]
id = "browser"
key_env = "BROWSER_KEY"
max_concurrent_streams = 50
TOML
start_relay "$work/relay.toml" "$work/relay.log"
token=$("$bin/clio-relay" mint-token --config "$work/relay.toml" --device browser-check --ttl 10m)

trap 'rc=$?; if [ $rc -ne 0 ]; then echo "--- relay log"; tail -20 "$work/relay.log"; fi; cleanup' EXIT
node "$work/streams.mjs" "$client" "$admin" "$ref_url" browser-ref-key "$token"
