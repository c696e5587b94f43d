#!/usr/bin/env bash
# Checks the admin dashboard in a real browser (Debian's headless Chromium,
# driven by playwright-core): it starts fake-soniox and a relay on loopback,
# keeps a few streams open with relay-load, opens the page, checks it shows
# live data and the alerts firing, clicks "disable" on an account and checks that the account then
# takes no new stream.
#
# Usage: bash tools/dashboard-check/run.sh [--screenshot FILE]
# Installs chromium (apt) and playwright-core (npm, into a temp dir) if missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
shot="${CARGO_TARGET_DIR:-${root}/target}/dashboard.png"
[ "${1:-}" = "--screenshot" ] && shot="$2"

. "$root/tools/browser-check/browser.sh"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

browser_setup "$work"
cp "$root/tools/dashboard-check/check.mjs" "$work/"

cd "$root"
cargo build --quiet --bins
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

"$bin/fake-soniox" --echo --listen 127.0.0.1:0 --key dash-key-a --key dash-key-b --max-concurrent 100 > "$work/fake.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do grep -q "listening on" "$work/fake.log" && break; sleep 0.1; done
fake_url=$(grep -o 'ws://[^ ,]*' "$work/fake.log" | head -1)

export DASH_TOKEN_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export DASH_ADMIN_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export DASH_KEY_A=dash-key-a DASH_KEY_B=dash-key-b
cat > "$work/relay.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shards = 2
[upstream]
url = "$fake_url"
[tokens]
secret_env = "DASH_TOKEN_SECRET"
[admin]
token_env = "DASH_ADMIN_TOKEN"
state_dir = "$work/state"   # not the host's /var/lib/clio-relay
[alerts]
interval = "1s"
# 3 of 50 streams per account is over it: the page must list the alert.
concurrency_ratio = 0.05
[[account]]
id = "acct-a"
key_env = "DASH_KEY_A"
max_concurrent_streams = 50
[[account]]
id = "acct-b"
key_env = "DASH_KEY_B"
max_concurrent_streams = 50
TOML
start_relay "$work/relay.toml" "$work/relay.log"

# Streams that stay open while the page is looked at.
"$bin/relay-load" --relay-config "$work/relay.toml" --target "$client" -n 6 --stream-seconds 25 --duration 30s -q > "$work/load.log" 2>&1 &
pids+=($!)

mkdir -p "$(dirname "$shot")"
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "--- relay log"; tail -20 "$work/relay.log"; echo "--- load log"; tail -20 "$work/load.log"; fi; cleanup' EXIT
node "$work/check.mjs" "$admin" "$DASH_ADMIN_TOKEN" "$shot" \
  "$bin/relay-load" --relay-config "$work/relay.toml" --target "$client" -n 4 --stream-seconds 1 --pace x4 -q
