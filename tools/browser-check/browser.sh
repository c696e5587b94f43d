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
  ( cd "$work" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null )
  cp "$(dirname "${BASH_SOURCE[0]}")/browser.mjs" "$work/"
}
