// A kvgraph export in a web page: onnxruntime-web (WebGPU where the browser has it, else WebAssembly) under the shared
// contract driver (../js/kvgraph.js), the export's own tokenizer and chat template in the browser.
//
//   index.html?export=URL                   chat with the export (URL: its directory, default ../export/)
//   index.html?export=URL&prompt=TEXT       ask TEXT at once (max_new_tokens=N, backend=wasm|webgpu optional)
//   ...&temperature=T&top_p=P&seed=S         sample instead of greedy decoding (seeded: the same seed, the same answer)
//   index.html?export=URL&vectors=URL       reproduce golden vectors (kvgraph vectors) and show each case's result
//
// The outcome is also in #result (data-state running|done|error), which the headless test reads.
import * as ort from 'onnxruntime-web';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { Export, ExportError, checkCase, generate } from '../js/kvgraph.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const started = performance.now();
const seconds = (t0) => (performance.now() - t0) / 1000;
const mb = (bytes) => (bytes / 1e6).toFixed(1);
const CACHE = 'kvgraph-weights-v1';

function directoryUrl(value) {
  const url = new URL(value || '../export/', location.href);
  if (!url.pathname.endsWith('/')) url.pathname += '/';
  return url;
}

function status(text) { $('status').textContent = text; }

function finish(state, text, details = {}) {
  const result = $('result');
  Object.assign(result.dataset, details, { state });
  result.textContent = text;
  if (state === 'error') status('');
}

// Every failure ends here as one line in the page (not a blank page or a console-only stack).
const fail = (err) => finish('error', `error: ${err instanceof ExportError ? err.message : err && err.message ? err.message : String(err)}`);
window.addEventListener('error', (event) => fail(event.error || event.message));
window.addEventListener('unhandledrejection', (event) => fail(event.reason));

async function fetchOk(url, what, hint = '') {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new ExportError(`${url}: cannot fetch ${what} (${err.message})`);
  }
  if (!response.ok) throw new ExportError(`${url}: HTTP ${response.status}: ${what} is not there${hint}`);
  return response;
}

async function fetchJson(url, what, hint = '') {
  const text = await (await fetchOk(url, what, hint)).text();
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ExportError(`${url}: ${what} is not JSON (${err.message})`);
  }
}

// The weights file, downloaded once: the Cache API keeps it, so a reload reads it from the browser's cache. The
// size is checked against weights.json when the export has one; a short or broken download is an error, not stored.
async function fetchWeights(url, expectedSize) {
  const cache = 'caches' in self ? await caches.open(CACHE) : null;
  const cached = cache && (await cache.match(url));
  if (cached) {
    const bytes = new Uint8Array(await cached.arrayBuffer());
    if (!expectedSize || bytes.length === expectedSize) return { bytes, source: 'cache' };
    await cache.delete(url);
  }
  const response = await fetchOk(url, 'the weights file');
  // weights.json's size first: a server that compresses announces the compressed length, the stream gives the bytes
  const total = expectedSize || Number(response.headers.get('content-length')) || 0;
  // the cache reads its own copy of the stream while the page reads the other: nothing is buffered twice
  const stored = cache ? cache.put(url, response.clone()).then(() => null, (err) => err) : Promise.resolve(null);
  let bytes;
  try {
    bytes = await readAll(response, total, url);
    if (expectedSize && bytes.length !== expectedSize) {
      throw new ExportError(`${url}: the download ended at ${mb(bytes.length)} of ${mb(expectedSize)} MB; reload to try again`);
    }
  } catch (err) {
    await stored;
    if (cache) await cache.delete(url); // never keep a partial file
    throw err;
  }
  const failed = await stored;
  if (failed) console.warn(`${url}: not kept in the browser's cache (${failed.message}); a reload downloads it again`);
  return { bytes, source: 'network', cached: !failed };
}

async function readAll(response, total, url) {
  const reader = response.body.getReader(), bar = $('progress');
  let bytes = new Uint8Array(total), received = 0;
  bar.hidden = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (received + value.length > bytes.length) {
        if (total) throw new ExportError(`${url}: more bytes than the ${mb(total)} MB announced`);
        const grown = new Uint8Array(Math.max(2 * bytes.length, received + value.length)); // no size known: grow
        grown.set(bytes.subarray(0, received));
        bytes = grown;
      }
      bytes.set(value, received);
      received += value.length;
      bar.value = total ? received / total : 0;
      status(`downloading the weights: ${mb(received)} of ${mb(total)} MB`);
    }
  } catch (err) {
    if (err instanceof ExportError) throw err;
    throw new ExportError(`${url}: the download failed after ${mb(received)} of ${mb(total)} MB (${err.message}); reload to try again`);
  } finally {
    bar.hidden = true;
  }
  if (!total) return bytes.subarray(0, received);
  if (received !== total) throw new ExportError(`${url}: the download ended at ${mb(received)} of ${mb(total)} MB; reload to try again`);
  return bytes;
}

// How kvgraph.js reads this export over HTTP: graph files as bytes, the weights once, handed to every session.
function webStore(base, backend, report) {
  let weights = null;
  const store = {
    manifest: null,
    async json(name) {
      const manifest = name === 'kvgraph.json';
      const data = await fetchJson(new URL(name, base), manifest ? 'the manifest' : name, manifest ? `; is ${base} a kvgraph export directory?` : '');
      if (name === 'kvgraph.json') store.manifest = data;
      return data;
    },
    forgetWeights() { weights = null; }, // once every session holds its copy: 538 MB less for SmolLM2
    async session(ortModule, file, options) {
      const name = store.manifest.files.weights;
      weights ??= (async () => {
        const index = store.manifest.files.weights_index ? await fetchJson(new URL(store.manifest.files.weights_index, base), 'the weights index') : {};
        const loaded = await fetchWeights(new URL(name, base).href, index.size);
        report.weightsSource = loaded.source;
        report.weightsMB = mb(loaded.bytes.length);
        return loaded.bytes;
      })();
      const graph = new Uint8Array(await (await fetchOk(new URL(file, base), file)).arrayBuffer());
      const data = await weights;
      status(`starting ${file} on ${backend}`);
      try {
        return await ortModule.InferenceSession.create(graph, { ...options, executionProviders: [backend], externalData: [{ path: name, data }] });
      } catch (err) {
        throw new ExportError(`${file}: onnxruntime-web cannot load it on ${backend}: ${String(err.message || err).split('\n')[0]}`);
      }
    },
  };
  return store;
}

// WebGPU where the browser offers an adapter, else WebAssembly (threads when the page is cross-origin isolated).
async function pickBackend() {
  const asked = params.get('backend');
  if (asked && !['webgpu', 'wasm'].includes(asked)) throw new ExportError(`backend=${asked}: choose webgpu or wasm`);
  ort.env.logLevel = 'error'; // onnxruntime's warnings would otherwise reach the console on every step
  ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', location.href).href;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  if (asked !== 'wasm' && navigator.gpu) {
    try {
      if (await navigator.gpu.requestAdapter()) return { ep: 'webgpu', label: 'WebGPU' };
    } catch { /* no adapter: WebAssembly */ }
  }
  if (asked === 'webgpu') throw new ExportError('backend=webgpu: this browser offers no WebGPU adapter');
  return { ep: 'wasm', label: `WebAssembly, ${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads > 1 ? 's' : ''}` };
}

async function checkVectors(base, backend) {
  const vectorsUrl = directoryUrl(params.get('vectors'));
  const vectors = await fetchJson(new URL('vectors.json', vectorsUrl), 'the golden vectors');
  const model = await Export.open(ort, webStore(base, backend.ep, {}));
  const lines = [];
  for (const want of vectors.cases) {
    status(`case '${want.name}'`);
    const { got, reason } = await checkCase(model, want, vectors.tolerance);
    if (reason) return finish('error', `error: ${vectorsUrl} vs ${base}: ${reason}`, { backend: backend.label });
    lines.push(`case '${want.name}': ${got.calls.length} graph calls match, greedy tokens ${JSON.stringify(got.tokens)}`);
  }
  status(`the golden vectors are reproduced on ${backend.label}`);
  return finish('done', lines.join('\n'), { backend: backend.label });
}

async function loadChat(base, backend, report) {
  const store = webStore(base, backend.ep, report);
  // one session: the weights once in memory; a quantized export may use onnxruntime's fused int4/int8 kernel (not bit-exact)
  const model = await Export.open(ort, store, { oneGraph: true, exact: false });
  const files = model.manifest.files;
  if (model.seq2seq) throw new ExportError(`${base}: an encoder-decoder export; this page chats with decoder-only exports`);
  if (!files.tokenizer) throw new ExportError(`${base}: the export has no tokenizer.json, so the page cannot turn text into ids`);
  const [json, config] = await Promise.all([store.json(files.tokenizer), files.tokenizer_config ? store.json(files.tokenizer_config) : {}]);
  const tokenizer = new Tokenizer(json, config);
  const templateText = files.chat_template ? await (await fetchOk(new URL(files.chat_template, base), 'the chat template')).text() : config.chat_template;
  if (!templateText) throw new ExportError(`${base}: the export has no chat template`);
  const template = new Template(templateText);
  const special = (key) => (typeof config[key] === 'object' && config[key] ? config[key].content : config[key]) ?? '';
  await model.session(model.graphFor('prefill')); // the download and the session start are the load time
  store.forgetWeights();
  report.loadSeconds = seconds(started).toFixed(2);
  const encode = (question) => tokenizer.encode(template.render({
    messages: [{ role: 'user', content: question }], add_generation_prompt: true, bos_token: special('bos_token'), eos_token: special('eos_token'),
  }), { add_special_tokens: false }).ids;
  return { model, tokenizer, encode };
}

function samplingOptions() { // greedy unless temperature > 0; every value checked before anything runs
  const read = (name, fallback, ok) => {
    const raw = params.get(name), value = raw === null ? fallback : Number(raw);
    if (raw !== null && !(raw.trim() !== '' && Number.isFinite(value) && ok(value))) throw new ExportError(`${name}=${raw}: out of range`);
    return value;
  };
  return {
    maxNewTokens: read('max_new_tokens', 128, (v) => Number.isInteger(v) && v > 0),
    temperature: read('temperature', 0, (v) => v >= 0),
    topP: read('top_p', 1, (v) => v > 0 && v <= 1),
    seed: read('seed', 0, (v) => Number.isInteger(v) && v >= 0),
  };
}

async function ask(chat, question, backend, report, sampling) {
  const ids = chat.encode(question), answer = [];
  $('answer').textContent = '';
  let t0 = performance.now(), first = null;
  const { tokens } = await generate(chat.model, [ids], {
    ...sampling,
    onToken: async (_, id) => {
      first ??= seconds(t0);
      if (!chat.model.eos.includes(id)) answer.push(id);
      $('answer').textContent = chat.tokenizer.decode(answer, { skip_special_tokens: true });
      await new Promise((resolve) => setTimeout(resolve, 0)); // let the page paint the new token
    },
  });
  const total = seconds(t0), decoded = tokens[0].length - 1;
  const perSecond = decoded > 0 ? decoded / (total - first) : 0;
  const stats = { ...report, backend: backend.label, promptTokens: ids.length, newTokens: tokens[0].length, firstTokenSeconds: first.toFixed(3),
    tokensPerSecond: perSecond.toFixed(1), promptIds: JSON.stringify(ids), tokens: JSON.stringify(tokens[0]) };
  $('stats').textContent = `${backend.label} · loaded in ${report.loadSeconds} s (weights ${report.weightsMB} MB from ${report.weightsSource}) · `
    + `prompt ${ids.length} tokens, first token ${stats.firstTokenSeconds} s · ${stats.newTokens} tokens at ${stats.tokensPerSecond} tok/s`;
  finish('done', $('answer').textContent, { ...stats, mode: 'chat' });
}

async function main() {
  const base = directoryUrl(params.get('export'));
  $('where').textContent = `export: ${base}`;
  const backend = await pickBackend();
  status(`backend: ${backend.label}`);
  if (params.has('vectors')) return checkVectors(base, backend);
  const report = {}, sampling = samplingOptions();
  const chat = await loadChat(base, backend, report);
  status(`ready on ${backend.label} (loaded in ${report.loadSeconds} s)`);
  $('chat').hidden = false;
  $('ask').disabled = false;
  $('ask').onclick = () => {
    $('ask').disabled = true;
    ask(chat, $('prompt').value, backend, report, sampling).catch(fail).finally(() => { $('ask').disabled = false; });
  };
  if (params.has('prompt')) {
    $('prompt').value = params.get('prompt');
    $('ask').click();
  }
}

main().catch(fail);
