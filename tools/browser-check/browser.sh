# Shared by the browser checks (tools/browser-check/run.sh and
# tools/dashboard-check/run.sh); sourced, not run. Installs Debian's
# chromium if it is missing, and playwright-core into $1 (a temp dir).
browser_setup() {
  local work=$1
  if ! command -v chromium >/dev/null 2>&1; then
    echo "browser-check: installing chromium"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
  fi
  command -v node >/dev/null 2>&1 || { echo "browser-check: node is required" >&2; exit 1; }
  # Debian's nodejs comes without npm (a package of its own).
  command -v npm >/dev/null 2>&1 || { echo "browser-check: npm is required (apt-get install npm)" >&2; exit 1; }
  ( cd "$work" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null )
  cp "$(dirname "${BASH_SOURCE[0]}")/browser.mjs" "$work/"
}

# Starts the relay ($bin/clio-relay) with the config $1, logging to $2,
# its PID added to $pids; sets $client and $admin to its two ports once
# it listens.
start_relay() {
  RUST_LOG=info "$bin/clio-relay" run --config "$1" > "$2" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do grep -q "listening" "$2" && break; sleep 0.1; done
  client=$(grep -o 'client=[^ ]*' "$2" | head -1 | cut -d= -f2)
  admin=$(grep -o 'admin=[^ ]*' "$2" | head -1 | cut -d= -f2)
}
