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
  static async open(ort, store, { oneGraph = false, exact = true, sessionOptions = {}, generationConfig = true } = {}) {
    const manifest = checkManifest(await store.json('kvgraph.json'), 'kvgraph.json');
    const model = new Export(ort, store, manifest, { oneGraph, exact, sessionOptions });
    // the checkpoint's decoding settings (graphs/README.md 4.0): generate()'s defaults, as in transformers
    if (generationConfig && manifest.files && manifest.files.generation_config) {
      const config = await store.json(manifest.files.generation_config);
      model.generation = generationDefaults(config);
      model.unapplied = unappliedSettings(config); // fields this driver does not apply (a caller says so; none dropped silently)
    }
    return model;
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
    this.start = t.decoder_start_token_id;
    this.generation = {}; // generate()'s defaults from generation_config.json (open() reads it)
    this.unapplied = [];
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

// -- the checkpoint's decoding settings and the logits processors (graphs/README.md 4.0) ---------------------

const SETTINGS = { // generation_config.json field -> generate() option
  max_new_tokens: 'maxNewTokens', max_length: 'maxLength', min_new_tokens: 'minNewTokens', min_length: 'minLength',
  temperature: 'temperature', top_p: 'topP', repetition_penalty: 'repetitionPenalty', no_repeat_ngram_size: 'noRepeatNgramSize',
  bad_words_ids: 'badWordsIds', suppress_tokens: 'suppressTokens', begin_suppress_tokens: 'beginSuppressTokens',
  forced_bos_token_id: 'forcedBosTokenId', forced_eos_token_id: 'forcedEosTokenId',
};
const OFF = { repetition_penalty: 1, no_repeat_ngram_size: 0, min_length: 0, top_p: 1 };

// fields that do not steer this driver's greedy or sampled decoding (ids, bookkeeping), or that it cannot apply
const PASSIVE = new Set(['bos_token_id', 'eos_token_id', 'pad_token_id', 'decoder_start_token_id', 'transformers_version',
  '_from_model_config', 'do_sample', 'cache_implementation', 'use_cache', 'return_dict_in_generate', 'output_scores']);
const UNAPPLIED_DEFAULTS = { num_beams: 1, top_k: 50, min_p: null, typical_p: 1, length_penalty: 1, early_stopping: false, num_return_sequences: 1 };

/** The generation config's fields that steer decoding but that this driver does not apply (num_beams > 1, top_k, ...):
 * a caller names them rather than dropping them silently. */
export function unappliedSettings(config) {
  return Object.entries(config).filter(([field, value]) => !(field in SETTINGS) && !PASSIVE.has(field)
    && value !== null && value !== undefined && value !== UNAPPLIED_DEFAULTS[field]
    && !((field === 'top_k' || field === 'min_p' || field === 'typical_p') && !config.do_sample))
    .map(([field, value]) => `${field}=${JSON.stringify(value)}`);
}

/** generate()'s options from a generation config: what this driver applies (temperature only with do_sample). */
export function generationDefaults(config) {
  const out = {};
  for (const [field, option] of Object.entries(SETTINGS)) {
    const value = config[field];
    if (value === null || value === undefined || value === OFF[field]) continue;
    if ((field === 'temperature' || field === 'top_p') && !config.do_sample) continue;
    out[option] = value;
  }
  if (config.do_sample && out.temperature === undefined) out.temperature = 1;
  return out;
}

/** One row's scores after the processors, in transformers' order; seq: the row's decoder sequence so far (its padded
 * prompt, or the decoder start token, then the chosen ids), pads: the prompt's left pads, ctx: { eos, promptLength, maxLength }. */
export function processRow(row, seq, pads, ctx, s) {
  const scores = Float32Array.from(row), L = seq.length, ban = (id) => { if (id < scores.length) scores[id] = -Infinity; };
  if (s.repetitionPenalty && s.repetitionPenalty !== 1) {
    const p = Math.fround(s.repetitionPenalty);
    for (const id of new Set(seq.slice(pads))) if (id < scores.length) scores[id] = Math.fround(scores[id] < 0 ? scores[id] * p : scores[id] / p);
  }
  const n = s.noRepeatNgramSize || 0;
  if (n && L >= n) {
    const tail = seq.slice(L - n + 1);
    for (let i = 0; i + n <= L; i++) if (tail.every((t, k) => seq[i + k] === t)) ban(seq[i + n - 1]);
  }
  for (const word of s.badWordsIds || []) {
    if (word.length === 1 && ctx.eos.includes(word[0])) continue;
    const prefix = word.slice(0, -1);
    if (prefix.length <= L && prefix.every((t, k) => seq[L - prefix.length + k] === t)) ban(word.at(-1));
  }
  const newTokens = L - ctx.promptLength;
  if ((s.minLength && L < s.minLength) || (s.minNewTokens && newTokens < s.minNewTokens)) ctx.eos.forEach(ban);
  const only = (ids) => { scores.fill(-Infinity); for (const id of ids) scores[id] = 0; };
  if (s.forcedBosTokenId !== undefined && s.forcedBosTokenId !== null && L === 1) only([s.forcedBosTokenId]);
  if (s.forcedEosTokenId !== undefined && s.forcedEosTokenId !== null && L === ctx.maxLength - 1) only([s.forcedEosTokenId].flat());
  for (const id of s.suppressTokens || []) ban(id);
  const begin = ctx.promptLength + (ctx.promptLength === 1 && s.forcedBosTokenId !== undefined && s.forcedBosTokenId !== null ? 1 : 0);
  if (L === begin) for (const id of s.beginSuppressTokens || []) ban(id);
  return scores;
}

/**
 * Generate for a batch of prompts: greedy (the default) or sampled, every row until one of the export's eos ids or
 * the length. Options left out come from the export's generation_config.json (model.generation), then greedy and
 * 16 new tokens. onToken(row, id) is called (and awaited) for each new token as it is chosen; a finished row is fed pad
 * while the others continue. Returns { tokens: ids per row, calls: every graph call, steps: graph calls after the first }.
 */
export async function generate(model, prompts, options = {}) {
  const s = { ...(options.generationConfig === false ? {} : model.generation),
    ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) };
  const { temperature = 0, topP = 1, seed = 0, onToken = null } = s;
  const driver = new Driver(model), draw = random(seed);
  const seqs = model.seq2seq ? prompts.map(() => [model.start]) : pad(prompts, model.padId, 'left')[0];
  const pads = model.seq2seq ? prompts.map(() => 0) : seqs.map((seq, b) => seq.length - prompts[b].length);
  const promptLength = seqs[0].length;
  const maxNewTokens = s.maxNewTokens ?? (s.maxLength !== undefined ? Math.max(1, s.maxLength - promptLength) : 16);
  const ctx = { eos: model.eos, promptLength, maxLength: promptLength + maxNewTokens };
  let logits = await driver.first(prompts);
  const rows = prompts.map(() => []), done = prompts.map(() => false);
  for (;;) {
    for (const [b, row] of rows.entries()) {
      if (done[b]) continue;
      row.push(choose(processRow(logitsRow(logits, b), seqs[b], pads[b], ctx, s), { temperature, topP }, draw));
      done[b] = model.eos.includes(row.at(-1)) || row.length >= maxNewTokens;
      if (onToken) await onToken(b, row.at(-1)); // may return a promise (a page lets itself paint)
    }
    if (done.every(Boolean)) break;
    const fed = rows.map((row, b) => (done[b] ? model.padId : row.at(-1)));
    fed.forEach((id, b) => seqs[b].push(id));
    logits = await driver.next(fed);
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
  const settings = Object.fromEntries(Object.entries(want.settings || {}).map(([field, value]) => [SETTINGS[field] ?? field, value]));
  const got = want.draft ? await verifyDraft(model, want.prompts, want.draft)
    : await generate(model, want.prompts, { ...settings, maxNewTokens: want.max_new_tokens, generationConfig: false });
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
