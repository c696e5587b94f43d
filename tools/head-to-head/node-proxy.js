// The seed's Node.js proxy (shared/seed/production-api-key-strategy.md,
// "Simple Node.js Proxy Example"), built as the seed describes it with the
// npm `ws` package, for the head-to-head benchmark (tools/head-to-head.sh):
//   - basic authentication of the client: a static token in `?token=`;
//   - one upstream WebSocket per client connection;
//   - the account's API key injected as `api_key` into the first (config)
//     JSON message;
//   - messages relayed both ways (text stays text, binary stays binary);
//     messages a client sends before the upstream is open are buffered.
//
// Environment: LISTEN_PORT, UPSTREAM_URL, CLIENT_TOKEN, API_KEY.
'use strict';
const WebSocket = require('ws');

const port = parseInt(process.env.LISTEN_PORT || '8082', 10);
const upstreamUrl = process.env.UPSTREAM_URL || 'ws://127.0.0.1:7300/transcribe-websocket';
const clientToken = process.env.CLIENT_TOKEN || '';
const apiKey = process.env.API_KEY || '';

const wss = new WebSocket.WebSocketServer({
  host: '127.0.0.1',
  port,
  perMessageDeflate: false,
  maxPayload: 1 << 20,
  backlog: 4096,
  verifyClient: (info, cb) => {
    const url = new URL(info.req.url, 'http://x');
    if (url.pathname !== '/v1/transcribe') return cb(false, 404);
    if (!clientToken || url.searchParams.get('token') !== clientToken) return cb(false, 401);
    cb(true);
  },
});

wss.on('connection', (client) => {
  const upstream = new WebSocket(upstreamUrl, { perMessageDeflate: false, maxPayload: 1 << 20 });
  const pending = []; // [data, isBinary] sent before the upstream opened
  let first = true;

  const toUpstream = (data, isBinary) => {
    if (first && !isBinary) {
      first = false;
      try {
        const msg = JSON.parse(data.toString('utf8'));
        msg.api_key = apiKey;
        data = JSON.stringify(msg);
      } catch (e) {
        client.close(1002, 'bad first message');
        upstream.terminate();
        return;
      }
    }
    upstream.send(data, { binary: isBinary });
  };

  client.on('message', (data, isBinary) => {
    if (upstream.readyState === WebSocket.OPEN) toUpstream(data, isBinary);
    else if (upstream.readyState === WebSocket.CONNECTING) pending.push([data, isBinary]);
  });
  upstream.on('open', () => {
    for (const [d, b] of pending) toUpstream(d, b);
    pending.length = 0;
  });
  upstream.on('message', (data, isBinary) => {
    if (client.readyState === WebSocket.OPEN) client.send(data, { binary: isBinary });
  });
  const validCode = (c) => (c >= 1000 && c <= 1014 && c !== 1004 && c !== 1005 && c !== 1006) || (c >= 3000 && c <= 4999);
  upstream.on('close', (code, reason) => {
    if (client.readyState === WebSocket.OPEN) client.close(validCode(code) ? code : 1011, reason);
  });
  client.on('close', (code, reason) => {
    if (upstream.readyState === WebSocket.OPEN) upstream.close(validCode(code) ? code : 1000, reason);
    else if (upstream.readyState === WebSocket.CONNECTING) upstream.terminate();
  });
  upstream.on('error', () => {
    if (client.readyState === WebSocket.OPEN) client.close(1011, 'upstream error');
  });
  client.on('error', () => upstream.terminate());
});

wss.on('listening', () => console.log(`node-proxy listening on 127.0.0.1:${port}`));
process.on('SIGTERM', () => process.exit(0));
