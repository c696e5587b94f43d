// Drives headless Chromium against a running relay's dashboard:
// the page shows live data and the alerts firing, and "disable" clicked on the page takes effect.
// Usage: node check.mjs ADMIN_ADDR ADMIN_TOKEN SCREENSHOT RELAY_LOAD_CMD...
import { launch } from "./browser.mjs";
import { execFileSync } from "node:child_process";

const [admin, token, shot, ...loadCmd] = process.argv.slice(2);
const api = async (path, init = {}) => {
  const r = await fetch(`http://${admin}${path}`, { ...init, headers: { Authorization: `Bearer ${token}`, ...(init.headers || {}) } });
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
};
const fail = (msg) => { console.error(`dashboard-check: FAIL: ${msg}`); process.exit(1); };

const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error" && !m.text().includes("404")) console.error("page console:", m.text()); });
  await page.goto(`http://${admin}/dashboard#token=${encodeURIComponent(token)}`);
  await page.waitForSelector('tr[data-account="acct-a"]', { timeout: 10000 });

  // Live data: the load started before this script keeps streams open.
  await page.waitForFunction(() => Number(document.getElementById("t-live").textContent) > 0, null, { timeout: 15000 })
    .catch(() => fail("the page never showed a live stream"));
  const live = await page.textContent("#t-live");
  const latencyRows = await page.$$eval("#latency tbody tr", (rows) => rows.map((r) => r.textContent));
  if (!latencyRows.some((t) => /frame client->upstream\s*\d+/.test(t) && !t.includes("no samples"))) fail(`no frame latency shown: ${latencyRows}`);
  if (!(await page.textContent('tr[data-account="acct-a"] .state')).includes("healthy")) fail("acct-a not shown healthy");
  // Each pool, with its live streams (both accounts are in the default pool).
  await page.waitForFunction(() => Number(document.querySelector('#pools tr[data-pool="default"] .live')?.textContent.split("/")[0]) > 0, null, { timeout: 5000 })
    .catch(() => fail("the pools table does not show the default pool's live streams"));

  // The alerts firing: the live streams are over the (low) concurrency ratio.
  await page.waitForSelector('#alerts tr[data-alert="account_near_concurrency"]', { timeout: 15000 })
    .catch(() => fail("the page does not list the firing account_near_concurrency alert"));

  // Disable acct-a from the page.
  await page.click('tr[data-account="acct-a"] button[data-act="disable"]');
  await page.waitForFunction(() => document.querySelector('tr[data-account="acct-a"] .state')?.textContent.includes("disabled"), null, { timeout: 5000 })
    .catch(() => fail("the page did not show acct-a disabled"));
  const after = await api("/admin/accounts");
  const a = after.accounts.find((x) => x.id === "acct-a");
  if (a.enabled !== false) fail("the API does not show acct-a disabled");

  // It takes effect: new streams all go to acct-b.
  const totals = (s) => Object.fromEntries(s.accounts.map((x) => [x.id, x.key.streams_total]));
  const before = totals(after);
  execFileSync(loadCmd[0], loadCmd.slice(1), { stdio: "inherit" });
  const now = totals(await api("/admin/accounts"));
  if (now["acct-a"] !== before["acct-a"]) fail(`a disabled account took new streams: ${before["acct-a"]} -> ${now["acct-a"]}`);
  if (!(now["acct-b"] > before["acct-b"])) fail("acct-b took no new stream");

  // Usage so far, per account: the streams that ended show up.
  await page.waitForFunction(() => Number(document.querySelector('tr[data-usage="acct-b"] .streams')?.textContent) > 0, null, { timeout: 5000 })
    .catch(() => fail("the usage table shows no stream for acct-b"));
  await page.waitForTimeout(1200); // one refresh, for the screenshot
  await page.screenshot({ path: shot, fullPage: true });
  if (errors.length) fail(`page errors: ${errors.join("; ")}`);
  console.log(`dashboard-check: ok (page showed ${live} live streams; disable from the page took effect; screenshot ${shot})`);
} finally {
  await browser.close();
}
