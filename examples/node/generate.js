#!/usr/bin/env node
// Greedy generation over a kvgraph export with onnxruntime-node, written from graphs/README.md only.
//   node generate.js EXPORT_DIR VECTORS_DIR                        reproduce golden vectors (kvgraph vectors)
//   node generate.js EXPORT_DIR --ids 5,9,17 [--max-new-tokens 8]  print the greedy token ids
// Exit codes: 0 ok, 1 the run differs from the vectors, 2 unusable input (not an export, newer format).
'use strict';
const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');

const READS_MAJOR = 1; // this driver implements manifest format 1.x

function fail(code, message) { console.error(`generate.js: ${message}`); process.exit(code); }

function readManifest(dir) {
  const file = path.join(dir, 'kvgraph.json');
  if (!fs.existsSync(file)) fail(2, `${file}: no manifest here; is ${dir} a kvgraph export directory?`);
  const m = JSON.parse(fs.readFileSync(file, 'utf8'));
  const major = Number(String(m.format_version).split('.')[0]);
  if (m.format !== 'kvgraph' || !Number.isInteger(major)) fail(2, `${file}: not a kvgraph manifest (format_version ${m.format_version})`);
  if (major > READS_MAJOR) fail(2, `${file}: format_version ${m.format_version} is newer than this driver reads (${READS_MAJOR}.x)`);
  if (!['float32', 'float16'].includes(m.contract.dtype || 'float32')) fail(2, `${file}: contract.dtype ${m.contract.dtype} is not float32 or float16`);
  return m;
}

const ints = (rows) => new ort.Tensor('int64', BigInt64Array.from(rows.flat(), (v) => BigInt(v)), [rows.length, rows[0].length]);
const column = (values) => new ort.Tensor('int64', BigInt64Array.from(values, (v) => BigInt(v)), [values.length]);
const zeros = (dtype, dims) => { // float16 tensors hold raw IEEE half bits in a Uint16Array; 0 is +0.0 in both
  const size = dims.reduce((a, b) => a * b);
  return new ort.Tensor(dtype, dtype === 'float16' ? new Uint16Array(size) : new Float32Array(size), dims);
};
const half = (h) => { // IEEE 754 half bits -> number
  const e = (h >> 10) & 31, f = h & 1023, sign = h >> 15 ? -1 : 1;
  if (e === 31) return f ? NaN : sign * Infinity;
  return sign * (e ? (1 + f / 1024) * 2 ** (e - 15) : (f / 1024) * 2 ** -14);
};

// (ids, mask) as row arrays, padded on `side` with padId to the longest prompt
function pad(prompts, padId, side) {
  const width = Math.max(...prompts.map((p) => p.length));
  const fill = (p, v, w) => (side === 'left' ? [...Array(width - p.length).fill(w), ...v] : [...v, ...Array(width - p.length).fill(w)]);
  return [prompts.map((p) => fill(p, p, padId)), prompts.map((p) => fill(p, p.map(() => 1), 0))];
}

// position of each token = real tokens before it; padded columns get 1
const positions = (mask) => mask.map((row) => { let n = -1; return row.map((m) => (m ? ++n : 1)); });

class Driver {
  constructor(manifest, sessions) {
    const c = manifest.contract;
    Object.assign(this, { manifest, sessions, c, calls: [], past: {}, length: 0, static: c.cache === 'static' });
    this.seq2seq = c.kind === 'encoder-decoder';
    this.names = (prefix) => [...Array(c.num_layers).keys()].flatMap((i) => [`${prefix}.${i}.key`, `${prefix}.${i}.value`]);
  }

  async call(graph, pool, newTokens) { // feed the graph exactly the inputs it declares, keep its presents as pasts
    const feeds = {};
    for (const { name } of this.manifest.graphs[graph].inputs) feeds[name] = pool[name] || this.past[name];
    const out = await this.sessions[graph].run(feeds);
    this.names('past').forEach((name, k) => { if (out[this.names('present')[k]]) this.past[name] = out[this.names('present')[k]]; });
    this.length += newTokens;
    this.calls.push({ graph, feeds, out });
    return out;
  }

  staticFeeds(batch) { // zero (B, Hkv, N, D) buffers before the first call; write index = positions written so far
    const dim = (name) => (name.endsWith('.value') && this.c.value_head_dim) || this.c.head_dim; // Dv for values when set
    const length = (name) => (this.c.ring_windows && this.c.ring_windows[Number(name.split('.')[1])]) || this.c.max_length; // W for a ring
    if (!this.length) for (const name of this.names('past')) this.past[name] = zeros(this.c.dtype || 'float32', [batch, this.c.num_kv_heads, length(name), dim(name)]);
    return { write_indices: column(Array(batch).fill(this.length)) };
  }

  decoderMask() { // dynamic: (B, P+Q); static: (B, N) with the mask so far in front, zeros after
    return ints(this.static ? this.mask.map((row) => [...row, ...Array(this.c.max_length - row.length).fill(0)]) : this.mask);
  }

  async first(prompts, padId) {
    const s = this.static ? this.staticFeeds(prompts.length) : {};
    if (this.seq2seq) {
      const [ids, mask] = pad(prompts, padId, 'right');
      this.sourceMask = ints(mask);
      const hidden = (await this.call('encoder', { input_ids: ints(ids), attention_mask: this.sourceMask }, 0)).encoder_hidden_states;
      const start = prompts.map(() => [this.manifest.special_tokens.decoder_start_token_id]);
      const out = await this.call('prefill', { ...s, input_ids: ints(start), encoder_hidden_states: hidden, encoder_attention_mask: this.sourceMask }, 1);
      this.cross = Object.fromEntries(this.names('cross').map((name) => [name, out[name]]));
      return out.logits;
    }
    const [ids, mask] = pad(prompts, padId, 'left');
    this.mask = mask;
    return (await this.call('prefill', { ...s, input_ids: ints(ids), attention_mask: this.decoderMask(), position_ids: ints(positions(mask)) }, ids[0].length)).logits;
  }

  async next(tokens) { // tokens: one id per row
    const s = this.static ? this.staticFeeds(tokens.length) : {};
    if (this.seq2seq) return (await this.call('decode', { ...s, ...this.cross, input_ids: ints(tokens.map((t) => [t])), encoder_attention_mask: this.sourceMask }, 1)).logits;
    this.mask = this.mask.map((row) => [...row, 1]);
    const position = positions(this.mask).map((row) => [row[row.length - 1]]);
    return (await this.call('decode', { ...s, input_ids: ints(tokens.map((t) => [t])), attention_mask: this.decoderMask(), position_ids: ints(position) }, 1)).logits;
  }
}

// logits (B, Q, V) -> the last position of row b, as a Float32Array of V
const lastRow = (logits, b) => {
  const [, q, v] = logits.dims;
  const row = logits.data.subarray((b * q + q - 1) * v, (b * q + q) * v);
  return logits.type === 'float16' ? Float32Array.from(row, half) : row;
};
const argmax = (row) => row.reduce((best, x, i) => (x > row[best] ? i : best), 0); // lowest id on ties

async function greedy(dir, manifest, prompts, maxNew) {
  const sessions = {};
  // A quantized export runs its DequantizeLinear + MatMul as written (no fusion into onnxruntime's kernel that
  // rounds activations to int8): the graphs' exact semantics, which golden vectors record.
  const options = { logSeverityLevel: 3, ...(manifest.quantization ? { graphOptimizationLevel: 'basic' } : {}) };
  for (const [graph, { file }] of Object.entries(manifest.graphs)) if (graph !== 'extend') sessions[graph] = await ort.InferenceSession.create(path.join(dir, file), options);
  const t = manifest.special_tokens;
  const padId = t.pad_token_id ?? t.eos_token_ids[0] ?? 0;
  const driver = new Driver(manifest, sessions);
  let logits = await driver.first(prompts, padId);
  const rows = prompts.map(() => []);
  const done = prompts.map(() => false);
  for (;;) {
    rows.forEach((row, b) => { if (!done[b]) { row.push(argmax(lastRow(logits, b))); done[b] = t.eos_token_ids.includes(row.at(-1)) || row.length >= maxNew; } });
    if (done.every(Boolean)) break;
    logits = await driver.next(rows.map((row, b) => (done[b] ? padId : row.at(-1)))); // finished rows are fed pad
  }
  return { tokens: rows, calls: driver.calls, padId };
}

function firstMismatch(name, want, got, tolerance) { // the first difference, in step order, or null
  const at = `case '${name}'`;
  if (want.pad_id !== got.padId) return `${at}: pad id ${got.padId}, the vectors used ${want.pad_id}`;
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
      for (const [b, ids] of output.top5.ids.entries()) {
        const row = lastRow(call.out.logits, b);
        for (const [k, id] of ids.entries()) {
          const value = output.top5.values[b][k];
          if (!(Math.abs(row[id] - value) <= tolerance.atol + tolerance.rtol * Math.abs(value))) return `${where}: output logits[${b}, ${id}] is ${row[id]}, expected ${value}`;
        }
        if (argmax(row) !== output.argmax[b]) return `${where}: output logits row ${b} has argmax ${argmax(row)}, expected ${output.argmax[b]}`;
      }
    }
  }
  if (got.calls.length !== want.steps.length) return `${at}: the vectors have ${want.steps.length} steps, the run took ${got.calls.length}`;
  if (JSON.stringify(got.tokens) !== JSON.stringify(want.greedy_tokens)) return `${at}: greedy tokens ${JSON.stringify(got.tokens)}, expected ${JSON.stringify(want.greedy_tokens)}`;
  return null;
}

async function main([dir, second, ...rest]) {
  if (!dir || !second) fail(2, 'usage: node generate.js EXPORT_DIR VECTORS_DIR | EXPORT_DIR --ids 1,2,3 [--max-new-tokens N]');
  const manifest = readManifest(dir);
  if (second === '--ids') {
    const maxNew = rest[1] === '--max-new-tokens' ? Number(rest[2]) : 16;
    console.log(JSON.stringify((await greedy(dir, manifest, [rest[0].split(',').map(Number)], maxNew)).tokens[0]));
    return;
  }
  const file = path.join(second, 'vectors.json');
  if (!fs.existsSync(file)) fail(2, `${file}: no golden vectors here (make them with kvgraph vectors)`);
  const vectors = JSON.parse(fs.readFileSync(file, 'utf8'));
  for (const want of vectors.cases) {
    const got = await greedy(dir, manifest, want.prompts, want.max_new_tokens);
    const reason = firstMismatch(want.name, want, got, vectors.tolerance);
    if (reason) fail(1, `${second} vs ${dir}: ${reason}`);
    console.log(`case '${want.name}': ${got.calls.length} graph calls match, greedy tokens ${JSON.stringify(got.tokens)}`);
  }
}

main(process.argv.slice(2)).catch((err) => fail(2, err.message));
