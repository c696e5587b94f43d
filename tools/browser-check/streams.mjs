// Streams audio from headless Chromium's own WebSocket through a relay
// whose upstream drops every connection at its 20th audio frame, and
// checks what the browser gets: for raw audio the whole transcript, once,
// as the same audio gives straight from a fake Soniox with no faults (the
// failover unseen); for the relay's own errors, frames and close codes a
// browser can read; and Soniox's own web SDK streaming through the relay.
// Usage: node streams.mjs CLIENT_ADDR ADMIN_ADDR REFERENCE_URL REFERENCE_KEY TOKEN
import { launch } from "./browser.mjs";

const [client, admin, refUrl, refKey, token] = process.argv.slice(2);
const relayUrl = `ws://${client}/v1/transcribe`;
let failed = false;
const fail = (msg) => { console.error(`browser-check: FAIL: ${msg}`); failed = true; };

// Runs in the page: one stream from the browser's WebSocket, real-time
// paced, its audio a function of `seed`. Returns what the page saw.
async function stream({ url, protocols, config, frames, seed }) {
  let x = (seed * 2654435761) >>> 0 || 1;
  const byte = () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x & 0xff; };
  const out = { protocol: null, messages: [], close: null, opened: false };
  const ws = protocols ? new WebSocket(url, protocols) : new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => out.messages.push(typeof e.data === "string" ? JSON.parse(e.data) : { binary: e.data.byteLength });
  const closed = new Promise((resolve) => { ws.onclose = (e) => { out.close = e.code; resolve(); }; });
  const opened = new Promise((resolve) => { ws.onopen = () => { out.opened = true; resolve(); }; });
  await Promise.race([opened, closed]);
  if (out.opened) {
    out.protocol = ws.protocol;
    ws.send(JSON.stringify(config));
    for (let i = 0; i < frames && ws.readyState === WebSocket.OPEN; i++) {
      const frame = new Uint8Array(3200);
      for (let j = 0; j < frame.length; j++) frame[j] = byte();
      ws.send(frame);
      await new Promise((r) => setTimeout(r, 100));
    }
    if (ws.readyState === WebSocket.OPEN) ws.send(new Uint8Array(0)); // end of audio
  }
  await Promise.race([closed, new Promise((r) => setTimeout(r, 30000))]);
  return out;
}

// Runs in the page: one stream through Soniox's own web SDK
// (@soniox/speech-to-text-web), from a tone made with Web Audio and
// encoded by MediaRecorder as the SDK does with a microphone, stopped
// after `ms`. Returns the SDK's callbacks as they came.
async function sdkStream({ url, token, ms }) {
  const { SonioxClient } = window["speech-to-text-web"];
  const audio = new AudioContext();
  const tone = audio.createOscillator();
  const dest = audio.createMediaStreamDestination();
  tone.connect(dest);
  tone.start();
  const out = { results: 0, finished: false, error: null, states: [] };
  const done = new Promise((resolve) => {
    const client = new SonioxClient({
      webSocketUri: url,
      apiKey: async () => token,
      onPartialResult: () => { out.results += 1; },
      onFinished: () => { out.finished = true; resolve(); },
      onError: (status, message, code) => { out.error = { status, message, code }; resolve(); },
      onStateChange: ({ newState }) => out.states.push(newState),
    });
    client.start({ model: "stt-rt-v4", stream: dest.stream });
    setTimeout(() => client.stop(), ms);
  });
  await Promise.race([done, new Promise((r) => setTimeout(r, ms + 20000))]);
  tone.stop();
  await audio.close();
  return out;
}

const raw = { model: "stt-rt-v4", audio_format: "pcm_s16le", sample_rate: 16000, num_channels: 1 };
const finals = (r) => r.messages.flatMap((m) => (m.tokens || []).filter((t) => t.is_final).map((t) => `${t.text}@${t.start_ms}-${t.end_ms}`));
const finished = (r) => r.messages.some((m) => m.finished === true);
const errorCode = (r) => r.messages.find((m) => m.error_code)?.error_code;

const browser = await launch();
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => fail(`page error: ${e}`));
  // A page on loopback (the relay's own /healthz): Chromium lets a page
  // reach loopback addresses only from a loopback origin.
  await page.goto(`http://${client}/healthz`);
  const run = (args) => page.evaluate(stream, { frames: 30, ...args });

  const sdkFile = new URL("./node_modules/@soniox/speech-to-text-web/dist/speech-to-text-web.umd.cjs", import.meta.url);
  await page.addScriptTag({ path: sdkFile.pathname });
  const sdk = (args) => page.evaluate(sdkStream, args);

  const seeds = [1, 2, 3, 4, 5];
  const [refs, relayed] = await Promise.all([
    // The same audio straight to a fake Soniox with no faults.
    Promise.all(seeds.map((seed) => run({ url: refUrl, protocols: ["soniox-api-key", refKey], config: raw, seed }))),
    Promise.all([
      // Raw audio, the token as a browser sends it: a subprotocol.
      ...seeds.slice(0, 4).map((seed) => run({ url: relayUrl, protocols: ["soniox-api-key", token], config: raw, seed })),
      // Raw audio, the token in the first message as Soniox's api_key.
      run({ url: relayUrl, config: { ...raw, api_key: token }, seed: 5 }),
      // Compressed audio cannot resume: the relay's 503, close 1011.
      run({ url: relayUrl, protocols: ["soniox-api-key", token], config: { model: "stt-rt-v4", audio_format: "ogg" }, seed: 6 }),
      // A bad token in the first message: the relay's 401, close 1008.
      run({ url: relayUrl, config: { ...raw, api_key: "not-a-session-token" }, seed: 7 }),
      // A bad token on the request: HTTP 401, which a browser sees as 1006.
      run({ url: relayUrl, protocols: ["soniox-api-key", "not-a-session-token"], config: raw, seed: 8 }),
    ]),
  ]);
  // The SDK sends a chunk every 120 ms, and its end of audio as an empty
  // text message: 1.2 s stays under the 20 messages upstream takes.
  const [sdkOk, sdkLost, sdkBadToken] = await Promise.all([
    sdk({ url: relayUrl, token, ms: 1200 }),
    sdk({ url: relayUrl, token, ms: 4000 }),
    sdk({ url: relayUrl, token: "not-a-session-token", ms: 1000 }),
  ]);
  // Finished from upstream's `finished` (the SDK also says finished when
  // stopped before its socket opened: not that).
  if (!sdkOk.finished || sdkOk.error || !sdkOk.states.includes("FinishingProcessing") || sdkOk.results < 1) {
    fail(`the web SDK's stream: ${JSON.stringify(sdkOk)}`);
  }
  if (sdkLost.error?.status !== "api_error" || sdkLost.error?.code !== 503) fail(`the web SDK's lost stream: ${JSON.stringify(sdkLost)} (want api_error 503)`);
  if (sdkBadToken.error?.status !== "api_error" || sdkBadToken.error?.code !== 401) fail(`the web SDK with a bad token: ${JSON.stringify(sdkBadToken)} (want api_error 401)`);

  for (const [i, seed] of seeds.entries()) {
    const ref = refs[i], got = relayed[i];
    const how = i < 4 ? "subprotocol token" : "api_key token";
    if (!finished(ref) || finals(ref).length < 5) fail(`reference stream ${seed}: ${JSON.stringify(ref).slice(0, 300)}`);
    if (i < 4 && got.protocol !== "soniox-api-key") fail(`stream ${seed}: subprotocol ${JSON.stringify(got.protocol)}, not soniox-api-key`);
    if (errorCode(got) !== undefined) fail(`stream ${seed} (${how}): error ${errorCode(got)}`);
    if (!finished(got) || got.close !== 1000) fail(`stream ${seed} (${how}): finished ${finished(got)}, close ${got.close}`);
    if (finals(got).join("") !== finals(ref).join("")) {
      fail(`stream ${seed} (${how}): transcript differs from the fault-free one:\n  got  ${finals(got).join("")}\n  want ${finals(ref).join("")}`);
    }
  }
  const [ogg, badFirst, badRequest] = relayed.slice(5);
  if (errorCode(ogg) !== 503 || ogg.close !== 1011) fail(`compressed stream: error ${errorCode(ogg)}, close ${ogg.close} (want 503, 1011)`);
  if (errorCode(badFirst) !== 401 || badFirst.close !== 1008) fail(`bad api_key: error ${errorCode(badFirst)}, close ${badFirst.close} (want 401, 1008)`);
  if (badRequest.opened || badRequest.close !== 1006) fail(`bad subprotocol token: opened ${badRequest.opened}, close ${badRequest.close} (want refused, 1006)`);

  // The failover happened: each raw stream was resumed (the relay counts it).
  const metrics = await (await fetch(`http://${admin}/metrics`)).text();
  const resumed = Number(/^clio_relay_streams_resumed_total (\d+)/m.exec(metrics)?.[1] ?? 0);
  if (resumed < 5) fail(`the relay resumed ${resumed} streams; the 5 raw ones each lost a connection`);
  console.log(`browser-check: the web SDK stream: ${JSON.stringify(sdkOk)}`);
  if (!failed) console.log(`browser-check: ok: 5 raw streams whole through ${resumed} resumes, the relay's errors as a browser reads them, and Soniox's web SDK streaming`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
