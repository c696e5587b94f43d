#!/usr/bin/env python3
"""Reference minter for clio-relay session tokens (format clio1).

Standard library only (Python 3.8+). Use it as a module in your app backend:

    from mint import mint
    token = mint(secret, "iphone-42", ttl_seconds=900)

or from the command line, with the secret in an environment variable or a
file, never on the command line:

    CLIO_RELAY_TOKEN_SECRET=... python3 mint.py --device iphone-42 --ttl 15m

The format is specified in clients/README.md; the test vectors there are
reproduced with --issued-at and --token-id.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import time

PREFIX = "clio1"
MIN_SECRET_BYTES = 32
_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_POOL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _secret_bytes(secret) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError("the token secret must be at least %d bytes" % MIN_SECRET_BYTES)
    return secret


def key_id(secret) -> str:
    """The kid: 8 hex digits, HMAC-SHA256(secret, "clio-relay token key id")[:4]."""
    mac = hmac.new(_secret_bytes(secret), b"clio-relay token key id", hashlib.sha256)
    return mac.digest()[:4].hex()


def mint(secret, device_id, ttl_seconds, tier=None, now=None, token_id=None, pools=None) -> str:
    """A session token for device_id, valid for ttl_seconds (whole seconds, at
    least 1) from now (Unix seconds, default the current time, rounded down).

    secret: the relay's tokens.secret, as str (its UTF-8 bytes are the key)
    or bytes. tier: a [devices.tier.NAME] of the relay, or None. pools: the
    relay's pools ([pool.NAME] or "default") whose accounts may carry the
    streams, or None for the default pool only. token_id:
    16 hex digits from a CSPRNG unless given (only test vectors fix it).
    """
    key = _secret_bytes(secret)
    if not isinstance(device_id, str) or not _ID.match(device_id):
        raise ValueError("device id must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -")
    if tier is not None and not _ID.match(tier):
        raise ValueError("tier must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -")
    if pools is not None:
        pools = list(pools)
        if not pools or not all(isinstance(p, str) and _POOL.match(p) for p in pools):
            raise ValueError("pools must be a non-empty list of pool names "
                             "(1 to 64 characters of A-Z a-z 0-9 . _ -)")
    ttl = int(ttl_seconds)
    if ttl < 1:
        raise ValueError("ttl must be at least 1 second")
    issued = int(time.time()) if now is None else int(now)
    if token_id is None:
        token_id = secrets.token_hex(8)
    elif not _ID.match(token_id):
        raise ValueError("token id must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -")
    claims = {"d": device_id, "i": issued, "e": issued + ttl, "t": token_id}
    if tier is not None:
        claims["r"] = tier
    if pools is not None:
        claims["p"] = pools
    payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    signed = "%s.%s.%s" % (PREFIX, key_id(key), _b64url(payload))
    sig = hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()
    return signed + "." + _b64url(sig)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """Seconds from "900", "900s", "15m", "2h" or "1d"."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError("ttl %r: write it like 900, 15m, 2h or 1d" % text)
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def _read_secret(args) -> str:
    if args.secret_file:
        with open(args.secret_file, "rb") as f:
            text = f.read().decode("utf-8")
        # Like the relay: a file's trailing newline is not part of the secret.
        return text.rstrip("\r\n")
    value = os.environ.get(args.secret_env)
    if not value:
        raise ValueError("environment variable %s is not set" % args.secret_env)
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Mint a clio-relay session token (printed on stdout).")
    p.add_argument("--device", required=True, help="device id the token is for")
    p.add_argument("--ttl", default="15m", help="lifetime: 900, 15m, 2h (default 15m)")
    p.add_argument("--tier", help="device tier ([devices.tier.NAME] on the relay)")
    p.add_argument("--pool", action="append", dest="pools", metavar="NAME",
                   help="pool whose accounts may carry the streams ([pool.NAME] on the relay); "
                        "repeat for several (default: the default pool)")
    p.add_argument("--secret-env", default="CLIO_RELAY_TOKEN_SECRET",
                   help="environment variable holding the secret (default CLIO_RELAY_TOKEN_SECRET)")
    p.add_argument("--secret-file", help="file holding the secret (trailing newline ignored)")
    p.add_argument("--issued-at", type=int, help="issue time, Unix seconds (default now; for test vectors)")
    p.add_argument("--token-id", help="token id (default 16 random hex digits; for test vectors)")
    args = p.parse_args(argv)
    try:
        token = mint(_read_secret(args), args.device, parse_ttl(args.ttl), tier=args.tier,
                     now=args.issued_at, token_id=args.token_id, pools=args.pools)
    except (ValueError, OSError) as e:
        print("mint.py: %s" % e, file=sys.stderr)
        return 1
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
