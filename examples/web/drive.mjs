#!/usr/bin/env node
// Open the page in headless Chromium (puppeteer-core) and print what it shows in #result, one JSON line per load.
//   node drive.mjs URL [URL ...] [--screenshot FILE] [--reload] [--timeout SECONDS]
// Each URL is loaded in turn in one browser. --reload loads the last URL a second time in the same profile (the
// weights then come from the Cache API) and prints another line; --screenshot saves the last page.
// The browser is $CHROMIUM, else /usr/bin/chromium; a missing browser is an error.
// Exit codes: 0 the page finished (its state may still be "error"), 2 no browser or the page never finished.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

function fail(message) { console.error(`drive.mjs: ${message}`); process.exit(2); }

const args = process.argv.slice(2), first = args.findIndex((a) => a.startsWith('--'));
const urls = first < 0 ? args : args.slice(0, first), rest = first < 0 ? [] : args.slice(first);
if (!urls.length) fail('usage: node drive.mjs URL [URL ...] [--screenshot FILE] [--reload] [--timeout SECONDS]');
const option = (name) => { const i = rest.indexOf(name); return i >= 0 ? rest[i + 1] : undefined; };
const screenshot = option('--screenshot'), timeout = Number(option('--timeout') || 300) * 1000, reload = rest.includes('--reload');
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
if (!fs.existsSync(executablePath)) fail(`no browser at ${executablePath} (install Debian's chromium, or set CHROMIUM)`);

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'kvgraph-chromium-'));
const browser = await puppeteer.launch({
  executablePath,
  headless: true,
  userDataDir: profile,
  // a closed network: no background connections, no component updates; no GPU here
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
});
let page;
try {
  page = await browser.newPage();
  await page.setViewport({ width: 900, height: 640 });
  page.on('console', (message) => { if (['error', 'warn'].includes(message.type())) console.error(`page ${message.type()}: ${message.text()}`); });
  page.on('pageerror', (err) => console.error(`page error: ${err.message}`));
  const result = async () => {
    await page.waitForFunction(() => ['done', 'error'].includes(document.querySelector('#result')?.dataset.state), { timeout, polling: 200 });
    return page.$eval('#result', (el) => ({ ...el.dataset, text: el.textContent, crossOriginIsolated: self.crossOriginIsolated }));
  };
  for (const url of urls) {
    await page.goto(url, { waitUntil: 'load' });
    console.log(JSON.stringify(await result()));
  }
  if (reload) {
    await page.reload({ waitUntil: 'load' });
    console.log(JSON.stringify(await result()));
  }
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
} catch (err) {
  fail(`${page?.url() ?? urls[0]}: ${err.message.split('\n')[0]}`);
} finally {
  await browser.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
