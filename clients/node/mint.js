#!/usr/bin/env node
// Reference minter for clio-relay session tokens (format clio1).
//
// Node.js 16+, standard library only. Use it as a module in your app backend:
//
//   const { mint } = require("./mint.js");
//   const token = mint({ secret, deviceId: "iphone-42", ttlSeconds: 900 });
//
// or from the command line, with the secret in an environment variable or a
// file, never on the command line:
//
//   CLIO_RELAY_TOKEN_SECRET=... node mint.js --device iphone-42 --ttl 15m
//
// The format is specified in clients/README.md; the test vectors there are
// reproduced with --issued-at and --token-id.
"use strict";

const crypto = require("crypto");
const fs = require("fs");

const PREFIX = "clio1";
const MIN_SECRET_BYTES = 32;
const ID = /^[A-Za-z0-9._:@-]{1,128}$/;
const POOL = /^[A-Za-z0-9._-]{1,64}$/;

function b64url(buf) {
  return Buffer.from(buf).toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}

function secretBytes(secret) {
  const key = Buffer.isBuffer(secret) ? secret : Buffer.from(String(secret), "utf8");
  if (key.length < MIN_SECRET_BYTES) {
    throw new Error(`the token secret must be at least ${MIN_SECRET_BYTES} bytes`);
  }
  return key;
}

/** The kid: 8 hex digits, HMAC-SHA256(secret, "clio-relay token key id")[:4]. */
function keyId(secret) {
  return crypto.createHmac("sha256", secretBytes(secret)).update("clio-relay token key id").digest().subarray(0, 4).toString("hex");
}

/**
 * A session token for deviceId, valid for ttlSeconds (whole seconds, at
 * least 1) from now (Unix seconds, default the current time, rounded down).
 *
 * secret: the relay's tokens.secret, as a string (its UTF-8 bytes are the
 * key) or a Buffer. tier: a [devices.tier.NAME] of the relay, or undefined.
 * pools: the relay's pools ([pool.NAME] or "default") whose accounts may
 * carry the streams, or undefined for the default pool only.
 * tokenId: 16 hex digits from a CSPRNG unless given (only test vectors fix it).
 */
function mint({ secret, deviceId, ttlSeconds, tier, pools, now, tokenId }) {
  const key = secretBytes(secret);
  if (typeof deviceId !== "string" || !ID.test(deviceId)) {
    throw new Error("device id must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -");
  }
  if (tier !== undefined && tier !== null && !ID.test(tier)) {
    throw new Error("tier must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -");
  }
  if (pools !== undefined && pools !== null) {
    if (!Array.isArray(pools) || pools.length === 0 || !pools.every((p) => typeof p === "string" && POOL.test(p))) {
      throw new Error("pools must be a non-empty list of pool names (1 to 64 characters of A-Z a-z 0-9 . _ -)");
    }
  }
  const ttl = Math.floor(Number(ttlSeconds));
  if (!Number.isSafeInteger(ttl) || ttl < 1) throw new Error("ttl must be at least 1 second");
  const issued = now === undefined || now === null ? Math.floor(Date.now() / 1000) : Math.floor(Number(now));
  if (!Number.isSafeInteger(issued) || issued < 0) throw new Error("issue time must be Unix seconds");
  if (tokenId === undefined || tokenId === null) {
    tokenId = crypto.randomBytes(8).toString("hex");
  } else if (!ID.test(tokenId)) {
    throw new Error("token id must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -");
  }
  // Key order is part of the format: d, i, e, t, then r if there is a
  // tier, then p if there are pools.
  const claims = { d: deviceId, i: issued, e: issued + ttl, t: tokenId };
  if (tier !== undefined && tier !== null) claims.r = tier;
  if (pools !== undefined && pools !== null) claims.p = pools;
  const signed = `${PREFIX}.${keyId(key)}.${b64url(Buffer.from(JSON.stringify(claims), "utf8"))}`;
  const sig = crypto.createHmac("sha256", key).update(signed, "ascii").digest();
  return `${signed}.${b64url(sig)}`;
}

const UNITS = { s: 1, m: 60, h: 3600, d: 86400 };

/** Seconds from "900", "900s", "15m", "2h" or "1d". */
function parseTtl(text) {
  const m = /^\s*(\d+)\s*([smhd]?)\s*$/.exec(String(text));
  if (!m) throw new Error(`ttl ${JSON.stringify(text)}: write it like 900, 15m, 2h or 1d`);
  return Number(m[1]) * UNITS[m[2] || "s"];
}

const USAGE = `usage: node mint.js --device ID [--ttl 15m] [--tier NAME] [--pool NAME]...
                    [--secret-env VAR | --secret-file FILE]
                    [--issued-at UNIX] [--token-id ID]

Mint a clio-relay session token (printed on stdout).
  --device ID         device id the token is for
  --ttl T             lifetime: 900, 15m, 2h (default 15m)
  --tier NAME         device tier ([devices.tier.NAME] on the relay)
  --pool NAME         pool whose accounts may carry the streams ([pool.NAME]
                      on the relay); repeat for several (default: the default pool)
  --secret-env VAR    environment variable holding the secret (default CLIO_RELAY_TOKEN_SECRET)
  --secret-file FILE  file holding the secret (trailing newline ignored)
  --issued-at UNIX    issue time, Unix seconds (default now; for test vectors)
  --token-id ID       token id (default 16 random hex digits; for test vectors)
`;

function main(argv) {
  const opts = { ttl: "15m", secretEnv: "CLIO_RELAY_TOKEN_SECRET" };
  const names = {
    "--device": "device", "--ttl": "ttl", "--tier": "tier", "--secret-env": "secretEnv",
    "--secret-file": "secretFile", "--issued-at": "issuedAt", "--token-id": "tokenId",
  };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "-h" || argv[i] === "--help") {
      process.stdout.write(USAGE);
      return 0;
    }
    if (argv[i] === "--pool" && i + 1 < argv.length) {
      (opts.pools = opts.pools || []).push(argv[++i]);
      continue;
    }
    const name = names[argv[i]];
    if (!name || i + 1 >= argv.length) {
      process.stderr.write(`mint.js: unexpected argument ${JSON.stringify(argv[i])}\n${USAGE}`);
      return 2;
    }
    opts[name] = argv[++i];
  }
  if (!opts.device) {
    process.stderr.write(`mint.js: --device is required\n${USAGE}`);
    return 2;
  }
  try {
    let secret;
    if (opts.secretFile) {
      // Like the relay: a file's trailing newline is not part of the secret.
      secret = fs.readFileSync(opts.secretFile, "utf8").replace(/[\r\n]+$/, "");
    } else {
      secret = process.env[opts.secretEnv];
      if (!secret) throw new Error(`environment variable ${opts.secretEnv} is not set`);
    }
    const token = mint({
      secret,
      deviceId: opts.device,
      ttlSeconds: parseTtl(opts.ttl),
      tier: opts.tier,
      pools: opts.pools,
      now: opts.issuedAt === undefined ? undefined : Number(opts.issuedAt),
      tokenId: opts.tokenId,
    });
    process.stdout.write(token + "\n");
    return 0;
  } catch (e) {
    process.stderr.write(`mint.js: ${e.message}\n`);
    return 1;
  }
}

module.exports = { mint, keyId, parseTtl };

if (require.main === module) {
  process.exitCode = main(process.argv.slice(2));
}
