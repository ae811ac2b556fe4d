// The kvgraph contract (graphs/README.md) written once, for onnxruntime-node and onnxruntime-web alike.
//
//   import * as kvgraph from './kvgraph.js';
//   const model = await kvgraph.Export.open(ort, store);            // store: how this runtime reads the export's files
//   const { tokens } = await kvgraph.generate(model, [[1, 2, 3]], { maxNewTokens: 16, onToken: (row, id) => ... });
//
// `ort` is the onnxruntime-node or onnxruntime-web module (both have Tensor and InferenceSession.create).
// A store has two methods: json(name) -> the parsed file, and session(ort, file, options) -> an InferenceSession
// of the graph file `file` with the export's weights as its external data. Everything else is here: the manifest
// and its version, padding, positions, mask growth, dynamic and static caches, encoder-decoders with cross K/V,
// float16, the verify graph, greedy and sampled decoding with a callback per token, and golden-vector checks.

export const READS_MAJOR = 1; // this driver implements manifest format 1.x

/** An export this driver cannot use (not an export, a newer format, a bad file): one line, no stack needed. */
export class ExportError extends Error {}

export function checkManifest(m, origin) {
  if (!m || typeof m !== 'object') throw new ExportError(`${origin}: not a kvgraph manifest`);
  const major = Number(String(m.format_version).split('.')[0]);
  if (m.format !== 'kvgraph' || !Number.isInteger(major)) throw new ExportError(`${origin}: not a kvgraph manifest (format_version ${m.format_version})`);
  if (major > READS_MAJOR) throw new ExportError(`${origin}: format_version ${m.format_version} is newer than this driver reads (${READS_MAJOR}.x)`);
  if (!m.contract || !m.graphs) throw new ExportError(`${origin}: the manifest has no contract or graphs`);
  if (!['float32', 'float16'].includes(m.contract.dtype || 'float32')) throw new ExportError(`${origin}: contract.dtype ${m.contract.dtype} is not float32 or float16`);
  return m;
}

// -- tensors ---------------------------------------------------------------------------------------

const half = (h) => { // IEEE 754 half bits -> number
  const e = (h >> 10) & 31, f = h & 1023, sign = h >> 15 ? -1 : 1;
  if (e === 31) return f ? NaN : sign * Infinity;
  return sign * (e ? (1 + f / 1024) * 2 ** (e - 15) : (f / 1024) * 2 ** -14);
};

/** logits (B, Q, V) -> position p of row b (the last when p is undefined), as a Float32Array of V. */
export function logitsRow(logits, b, p) {
  const [, q, v] = logits.dims, at = b * q + (p ?? q - 1);
  const row = logits.data.subarray(at * v, (at + 1) * v);
  // float16 arrives as raw IEEE half bits in a Uint16Array (Node), or as a Float16Array where the JavaScript engine has one
  return row instanceof Uint16Array ? Float32Array.from(row, half) : row;
}

export const argmax = (row) => { // lowest id on ties
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
};

// (ids, mask) as row arrays, padded on `side` with padId to the longest prompt
function pad(prompts, padId, side) {
  const width = Math.max(...prompts.map((p) => p.length));
  const fill = (p, v, w) => (side === 'left' ? [...Array(width - p.length).fill(w), ...v] : [...v, ...Array(width - p.length).fill(w)]);
  return [prompts.map((p) => fill(p, p, padId)), prompts.map((p) => fill(p, p.map(() => 1), 0))];
}

// position of each token = real tokens before it; padded columns get 1
const positions = (mask) => mask.map((row) => { let n = -1; return row.map((m) => (m ? ++n : 1)); });

// -- the export ------------------------------------------------------------------------------------

export class Export {
  /**
   * Read and check the manifest; sessions open on first use.
   * oneGraph: decoder-only exports run every step with one graph (dynamic: extend, prefill being extend after an
   * empty past; static: prefill at write_indices), so the weights are loaded once. Golden vectors name the contract's
   * graphs, so checking them needs oneGraph false.
   * exact: a quantized export runs its DequantizeLinear + MatMul as written (golden vectors record that).
   */
  static async open(ort, store, { oneGraph = false, exact = true, sessionOptions = {} } = {}) {
    const manifest = checkManifest(await store.json('kvgraph.json'), 'kvgraph.json');
    return new Export(ort, store, manifest, { oneGraph, exact, sessionOptions });
  }

  constructor(ort, store, manifest, { oneGraph, exact, sessionOptions }) {
    const c = manifest.contract;
    Object.assign(this, { ort, store, manifest, c, sessions: {} });
    this.seq2seq = c.kind === 'encoder-decoder';
    this.static = c.cache === 'static';
    this.oneGraph = oneGraph && !this.seq2seq ? (this.static ? 'prefill' : 'extend') : null;
    const t = manifest.special_tokens;
    this.padId = t.pad_token_id ?? t.eos_token_ids[0] ?? 0;
    this.eos = t.eos_token_ids;
    this.options = { logSeverityLevel: 3, ...(exact && manifest.quantization ? { graphOptimizationLevel: 'basic' } : {}), ...sessionOptions };
  }

  graphFor(graph) { return this.oneGraph && graph !== 'verify' ? this.oneGraph : graph; }

  async session(graph) {
    const spec = this.manifest.graphs[graph];
    if (!spec) throw new ExportError(`kvgraph.json: this export has no ${graph} graph`);
    this.sessions[graph] ??= this.store.session(this.ort, spec.file, this.options);
    return this.sessions[graph];
  }

  names(prefix) { return [...Array(this.c.num_layers).keys()].flatMap((i) => [`${prefix}.${i}.key`, `${prefix}.${i}.value`]); }

  ints(rows) { return new this.ort.Tensor('int64', BigInt64Array.from(rows.flat(), (v) => BigInt(v)), [rows.length, rows[0].length]); }

  column(values) { return new this.ort.Tensor('int64', BigInt64Array.from(values, (v) => BigInt(v)), [values.length]); }

  zeros(dims) { // float16 tensors hold raw IEEE half bits in a Uint16Array; 0 is +0.0 in both
    const size = dims.reduce((a, b) => a * b, 1), dtype = this.c.dtype || 'float32';
    return new this.ort.Tensor(dtype, dtype === 'float16' ? new Uint16Array(size) : new Float32Array(size), dims);
  }

  cacheDims(name, batch, length) { // (B, Hkv, length, D), Dv for values when set; a static ring layer holds W
    const dim = (name.endsWith('.value') && this.c.value_head_dim) || this.c.head_dim;
    const ring = this.c.ring_windows && this.c.ring_windows[Number(name.split('.')[1])];
    return [batch, this.c.num_kv_heads, length ?? (ring || this.c.max_length), dim];
  }

  release() { return Promise.all(Object.values(this.sessions).map(async (s) => (await s).release?.())); }
}

// -- one generation: the cache it owns and every call it made --------------------------------------

export class Driver {
  constructor(model) {
    Object.assign(this, { model, c: model.c, calls: [], past: {}, length: 0 });
  }

  async call(graph, pool, newTokens) { // feed the graph exactly the inputs it declares, keep its presents as pasts
    const m = this.model, name = m.graphFor(graph), feeds = {};
    if (name !== graph && !this.length && !m.static) for (const past of m.names('past')) this.past[past] = m.zeros(m.cacheDims(past, pool.input_ids.dims[0], 0));
    for (const { name: input } of m.manifest.graphs[name].inputs) feeds[input] = pool[input] || this.past[input];
    const out = await (await m.session(name)).run(feeds);
    const presents = m.names('present');
    m.names('past').forEach((past, k) => { if (out[presents[k]]) this.past[past] = out[presents[k]]; });
    this.length += newTokens;
    this.calls.push({ graph: name, feeds, out });
    return out;
  }

  staticFeeds(batch) { // zero (B, Hkv, N, D) buffers before the first call; write index = positions written so far
    const m = this.model;
    if (!this.length) for (const name of m.names('past')) this.past[name] = m.zeros(m.cacheDims(name, batch));
    return { write_indices: m.column(Array(batch).fill(this.length)) };
  }

  decoderMask() { // dynamic: (B, P+Q); static: (B, N) with the mask so far in front, zeros after
    return this.model.ints(this.model.static ? this.mask.map((row) => [...row, ...Array(this.c.max_length - row.length).fill(0)]) : this.mask);
  }

  room(q) { // a static cache holds N positions
    if (this.model.static && this.length + q > this.c.max_length) {
      throw new ExportError(`${this.length} + ${q} tokens do not fit the static cache of ${this.c.max_length} positions`);
    }
  }

  /** The prompts (one row each) through prefill (an encoder-decoder: the encoder, then its start token) -> logits. */
  async first(prompts) {
    const m = this.model, padId = m.padId;
    const s = m.static ? this.staticFeeds(prompts.length) : {};
    if (m.seq2seq) {
      const [ids, mask] = pad(prompts, padId, 'right');
      this.sourceMask = m.ints(mask);
      const hidden = (await this.call('encoder', { input_ids: m.ints(ids), attention_mask: this.sourceMask }, 0)).encoder_hidden_states;
      const start = prompts.map(() => [m.manifest.special_tokens.decoder_start_token_id]);
      const out = await this.call('prefill', { ...s, input_ids: m.ints(start), encoder_hidden_states: hidden, encoder_attention_mask: this.sourceMask }, 1);
      this.cross = Object.fromEntries(m.names('cross').map((name) => [name, out[name]]));
      return out.logits;
    }
    const [ids, mask] = pad(prompts, padId, 'left');
    this.room(ids[0].length);
    this.mask = mask;
    return (await this.call('prefill', { ...s, input_ids: m.ints(ids), attention_mask: this.decoderMask(), position_ids: m.ints(positions(mask)) }, ids[0].length)).logits;
  }

  /** Q tokens per row after what is cached, through `graph`: a decode step (Q = 1) or a verify call. */
  async more(tokens, graph) {
    const m = this.model, q = tokens[0].length;
    this.room(q);
    const s = m.static ? this.staticFeeds(tokens.length) : {};
    if (m.seq2seq) return (await this.call('decode', { ...s, ...this.cross, input_ids: m.ints(tokens), encoder_attention_mask: this.sourceMask }, 1)).logits;
    this.mask = this.mask.map((row) => [...row, ...tokens[0].map(() => 1)]);
    const position = positions(this.mask).map((row) => row.slice(row.length - q));
    return (await this.call(graph, { ...s, input_ids: m.ints(tokens), attention_mask: this.decoderMask(), position_ids: m.ints(position) }, q)).logits;
  }

  next(tokens) { return this.more(tokens.map((t) => [t]), 'decode'); } // one id per row

  /** Speculative decoding's check (graphs/README.md 4.2): Q drafted ids per row -> logits (B, Q, V), one per drafted token. */
  verify(draft) { return this.more(draft, 'verify'); }
}

// -- decoding ----------------------------------------------------------------------------------------

/** A seeded generator of uniform numbers in [0, 1) (mulberry32): the same seed, the same draws. */
export function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The next id from one row of logits: argmax when temperature is 0, else a draw from softmax(logits / T) cut to top_p. */
export function choose(row, { temperature = 0, topP = 1 } = {}, draw = Math.random) {
  if (!temperature) return argmax(row);
  const order = Array.from(row.keys()).sort((i, j) => row[j] - row[i] || i - j);
  const top = row[order[0]] / temperature;
  const weights = order.map((i) => Math.exp(row[i] / temperature - top));
  const total = weights.reduce((a, b) => a + b, 0);
  let kept = 0, mass = 0;
  while (kept < order.length && (mass < topP * total || kept === 0)) mass += weights[kept++];
  let u = draw() * mass;
  for (let k = 0; k < kept; k++) if ((u -= weights[k]) < 0) return order[k];
  return order[kept - 1];
}

/**
 * Generate for a batch of prompts: greedy (the default) or sampled, every row until one of the export's eos ids or
 * maxNewTokens. onToken(row, id) is called (and awaited) for each new token as it is chosen; a finished row is fed pad while the
 * others continue. Returns { tokens: ids per row, calls: every graph call, steps: graph calls after the first }.
 */
export async function generate(model, prompts, { maxNewTokens = 16, temperature = 0, topP = 1, seed = 0, onToken = null } = {}) {
  const driver = new Driver(model), draw = random(seed);
  let logits = await driver.first(prompts);
  const rows = prompts.map(() => []), done = prompts.map(() => false);
  for (;;) {
    for (const [b, row] of rows.entries()) {
      if (done[b]) continue;
      row.push(choose(logitsRow(logits, b), { temperature, topP }, draw));
      done[b] = model.eos.includes(row.at(-1)) || row.length >= maxNewTokens;
      if (onToken) await onToken(b, row.at(-1)); // may return a promise (a page lets itself paint)
    }
    if (done.every(Boolean)) break;
    logits = await driver.next(rows.map((row, b) => (done[b] ? model.padId : row.at(-1))));
  }
  return { tokens: rows, calls: driver.calls };
}

/** The prompts' prefill, then one verify call fed each row's draft; tokens: the argmax after each drafted token. */
export async function verifyDraft(model, prompts, draft) {
  const driver = new Driver(model);
  await driver.first(prompts);
  const logits = await driver.verify(draft);
  return { tokens: draft.map((row, b) => row.map((_, p) => argmax(logitsRow(logits, b, p)))), calls: driver.calls };
}

// -- golden vectors (graphs/README.md section 8) ---------------------------------------------------------

/** Run one case of vectors.json again; the first difference, in step order, or null. */
export async function checkCase(model, want, tolerance) {
  const got = want.draft ? await verifyDraft(model, want.prompts, want.draft) : await generate(model, want.prompts, { maxNewTokens: want.max_new_tokens });
  return { got, reason: firstMismatch(want, got, tolerance, model.padId) };
}

function firstMismatch(want, got, tolerance, padId) {
  const at = `case '${want.name}'`;
  if (want.pad_id !== padId) return `${at}: pad id ${padId}, the vectors used ${want.pad_id}`;
  for (const [i, step] of want.steps.entries()) {
    const call = got.calls[i];
    const where = `${at}, step ${i} (${step.graph})`;
    if (!call || call.graph !== step.graph) return `${where}: the run called ${call ? call.graph : 'nothing'}`;
    for (const input of step.inputs.filter((x) => x.values)) {
      const mine = Array.from(call.feeds[input.name].data, Number), theirs = [input.values].flat(Infinity);
      const k = theirs.findIndex((v, j) => v !== mine[j]);
      if (k >= 0 || mine.length !== theirs.length) return `${where}: input ${input.name} differs at flat index ${k}: ${mine[k]} instead of ${theirs[k]}`;
    }
    for (const output of step.outputs.filter((x) => x.top5)) {
      const reason = logitsMismatch(step.graph, output, call.out.logits, tolerance);
      if (reason) return `${where}: ${reason}`;
    }
  }
  if (got.calls.length !== want.steps.length) return `${at}: the vectors have ${want.steps.length} steps, the run took ${got.calls.length}`;
  if (JSON.stringify(got.tokens) !== JSON.stringify(want.greedy_tokens)) return `${at}: greedy tokens ${JSON.stringify(got.tokens)}, expected ${JSON.stringify(want.greedy_tokens)}`;
  return null;
}

function logitsMismatch(graph, output, logits, tolerance) { // the last position's top 5 per row, or for verify per row and position
  const checks = output.top5.ids.flatMap((ids, b) => (graph === 'verify'
    ? ids.map((idsAt, p) => ({ b, p, ids: idsAt, values: output.top5.values[b][p], best: output.argmax[b][p], at: `${b}, ${p}` }))
    : [{ b, ids, values: output.top5.values[b], best: output.argmax[b], at: `${b}` }]));
  for (const { b, p, ids, values, best, at } of checks) {
    const row = logitsRow(logits, b, p);
    for (const [k, id] of ids.entries()) {
      if (!(Math.abs(row[id] - values[k]) <= tolerance.atol + tolerance.rtol * Math.abs(values[k]))) return `output logits[${at}, ${id}] is ${row[id]}, expected ${values[k]}`;
    }
    if (argmax(row) !== best) return `output logits row ${at} has argmax ${argmax(row)}, expected ${best}`;
  }
  return null;
}
