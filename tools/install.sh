#!/bin/sh
# Installs clio-relay as a systemd service on this host (run as root).
#
#   tools/install.sh                      # build the release binary with cargo, then install
#   tools/install.sh path/to/clio-relay   # install a prebuilt binary
#
# Installs:
#   /usr/local/bin/clio-relay
#   /etc/systemd/system/clio-relay.service, clio-relay.socket, clio-relay-admin.socket
#   /etc/clio-relay/clio-relay.toml       only if absent (from config/example.toml,
#                                         secrets switched to systemd credentials)
#   /etc/clio-relay/credentials/          root-only (0700): the secret files
#                                         (token-secret, admin-token, master-key, soniox-01)
#   /usr/local/share/doc/clio-relay/README.md, example.toml (every key, the
#                                         optional sections the installed config leaves out)
# Then it reloads systemd (if it is running) and enables the units; it
# starts nothing.
#
# Environment: DESTDIR (stage into a directory instead of /, e.g. for
# packaging or tests; then systemctl is not called), CARGO (default cargo).
set -eu

here=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
root=${DESTDIR:-}
cargo=${CARGO:-cargo}

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or set DESTDIR to stage the files)"
fi

# 1. The binary.
if [ $# -ge 1 ]; then
    bin=$1
    [ -x "$bin" ] || die "$bin: not an executable file"
else
    say "building the release binary (cargo build --release --bin clio-relay) ..."
    (cd "$here" && "$cargo" build --release --locked --bin clio-relay) || die "cargo build failed"
    target=${CARGO_TARGET_DIR:-$here/target}
    bin=$target/release/clio-relay
fi
"$bin" --version >/dev/null 2>&1 || die "$bin does not run here"

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system" \
    "$root/usr/local/share/doc/clio-relay" "$root/etc/clio-relay"
install -m 0755 "$bin" "$root/usr/local/bin/clio-relay.new"
mv -f "$root/usr/local/bin/clio-relay.new" "$root/usr/local/bin/clio-relay"
say "installed $root/usr/local/bin/clio-relay ($("$bin" --version | head -n 1))"

# 2. The units (always replaced: local changes belong in drop-ins,
#    `systemctl edit clio-relay`).
for u in clio-relay.service clio-relay.socket clio-relay-admin.socket; do
    install -m 0644 "$here/systemd/$u" "$root/etc/systemd/system/$u"
done
install -m 0644 "$here/README.md" "$root/usr/local/share/doc/clio-relay/README.md"
install -m 0644 "$here/config/example.toml" "$root/usr/local/share/doc/clio-relay/example.toml"
say "installed $root/etc/systemd/system/clio-relay.{service,socket} and clio-relay-admin.socket"

# 3. The config, only if there is none: the example, with its secrets read
#    from the credentials the unit loads (LoadCredential=), one account.
conf=$root/etc/clio-relay/clio-relay.toml
creds=/run/credentials/clio-relay.service
if [ -e "$conf" ]; then
    say "kept the existing $conf"
else
    awk -v creds="$creds" '
        NR == 1 && /^# clio-relay configuration/ { $0 = "# clio-relay configuration, installed by tools/install.sh from config/example.toml." }
        /^# Check it with:/ { $0 = "# Check it with:   clio-relay check-config --config /etc/clio-relay/clio-relay.toml" }
        /^\[\[account\]\]/ { accounts++ }
        accounts >= 2 { next }   # one account; add more with a credential each
        /^secret_env *=/ { $0 = "secret_file = \"" creds "/token-secret\"   # LoadCredential=token-secret" }
        /^key_env *=/    { $0 = "key_file = \"" creds "/soniox-01\"         # LoadCredential=soniox-01" }
        { print }
        END {
            print ""
            print "# More accounts: add an [[account]] with"
            print "#   key_file = \"" creds "/soniox-02\""
            print "# and, in `systemctl edit clio-relay`:"
            print "#   [Service]"
            print "#   LoadCredential=soniox-02:/etc/clio-relay/credentials/soniox-02"
            print "#"
            print "# The optional sections ([tls], [cluster] for a fleet, [devices], [usage],"
            print "# [alerts], [pool.NAME], and [limits] drain_timeout and finalize_wait), each"
            print "# key with its default, are in /usr/local/share/doc/clio-relay/example.toml."
            print ""
            print "[admin]"
            print "token_file = \"" creds "/admin-token\""
            print "# The key store (StateDirectory= in the unit): accounts added, rotated,"
            print "# disabled or removed at runtime survive restarts."
            print "state_dir = \"/var/lib/clio-relay\""
            print "master_key_file = \"" creds "/master-key\""
        }
    ' "$here/config/example.toml" > "$conf.new"
    chmod 0644 "$conf.new"
    mv "$conf.new" "$conf"
    say "installed $conf (from config/example.toml; review it)"
fi

# 4. The credentials directory: root-only; systemd hands the files to the
#    service under /run/credentials/clio-relay.service/.
install -d -m 0700 "$root/etc/clio-relay/credentials"
missing=
for c in token-secret admin-token master-key soniox-01; do
    [ -s "$root/etc/clio-relay/credentials/$c" ] || missing="$missing $c"
done

if [ -z "$root" ]; then
    # A daemon-reload needs a running systemd (the test sd_booted makes);
    # enabling is symlinks in /etc/systemd/system, which need none (a
    # container, an image being built: the units start at its next boot).
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    else
        say "systemd is not running here: the units are enabled for its next start (no daemon-reload)"
    fi
    systemctl enable clio-relay.socket clio-relay-admin.socket clio-relay.service
fi

cat <<MSG

Next steps
----------
MSG
if [ -n "$missing" ]; then
    say "1. Put the secrets in /etc/clio-relay/credentials/ (missing:$missing):"
    say "     cd /etc/clio-relay/credentials"
    say "     umask 077"
    say "     openssl rand -hex 32 > token-secret        # session-token signing secret"
    say "     openssl rand -hex 24 > admin-token         # bearer token for the admin API and \`clio-relay keys\`"
    say "     openssl rand -hex 32 > master-key          # key-store master key: runtime account changes survive restarts"
    say "     cat > soniox-01                            # paste the Soniox API key, then Ctrl-D"
    say "   In a fleet (README, \"Running a fleet\"), token-secret and master-key must be the"
    say "   same on every node: make them once and copy them to each (a node with another"
    say "   master key cannot open the fleet's account set; another token secret refuses"
    say "   the tokens your backend mints)."
else
    say "1. The secrets in /etc/clio-relay/credentials/ are in place."
fi
cat <<'MSG'
2. Review /etc/clio-relay/clio-relay.toml; keep clio-relay.socket and
   clio-relay-admin.socket on the same addresses as server.listen and
   server.admin_listen (or change both).
3. Start:  systemctl start clio-relay.socket clio-relay-admin.socket clio-relay
   Check:  systemctl status clio-relay; curl -s http://127.0.0.1:9464/readyz
The runbook (reload, rotate a key, drain, upgrade) is in
/usr/local/share/doc/clio-relay/README.md, "Running under systemd".
MSG
