#!/usr/bin/env node
// A kvgraph export in Node.js: onnxruntime-node under the shared contract driver (../js/kvgraph.js).
//   node generate.js EXPORT_DIR VECTORS_DIR                        reproduce golden vectors (kvgraph vectors)
//   node generate.js EXPORT_DIR --ids 5,9,17 [--max-new-tokens 8] [--temperature T --top-p P --seed S] [--stream] [--time]
//       print the new token ids (greedy unless --temperature; one session, so the weights once in memory);
//       --stream prints each id as it is chosen first, --time adds a JSON line of timings
// Exit codes: 0 ok, 1 the run differs from the vectors, 2 unusable input (not an export, newer format).
import fs from 'node:fs';
import path from 'node:path';
import ort from 'onnxruntime-node';
import { Export, ExportError, checkCase, generate } from '../js/kvgraph.js';

function fail(code, message) { console.error(`generate.js: ${message}`); process.exit(code); }

/** The export's files on disk; onnxruntime-node finds model.onnx.data beside each graph file. */
export function directoryStore(dir) {
  return {
    json(name) {
      const file = path.join(dir, name);
      if (!fs.existsSync(file)) {
        throw new ExportError(name === 'kvgraph.json' ? `${file}: no manifest here; is ${dir} a kvgraph export directory?` : `${file}: not found`);
      }
      try { return JSON.parse(fs.readFileSync(file, 'utf8')); } catch (err) { throw new ExportError(`${file}: ${err.message}`); }
    },
    session: (ortModule, file, options) => ortModule.InferenceSession.create(path.join(dir, file), options),
  };
}

async function main([dir, second, ...rest]) {
  if (!dir || !second) fail(2, 'usage: node generate.js EXPORT_DIR VECTORS_DIR | EXPORT_DIR --ids 1,2,3 [--max-new-tokens N]');
  const t0 = performance.now();
  if (second === '--ids') {
    // an option left out comes from the export's generation_config.json, then the driver's defaults (greedy, 16 new tokens)
    const option = (name) => { const i = rest.indexOf(name); return i > 0 ? Number(rest[i + 1]) : undefined; };
    const sampling = { maxNewTokens: option('--max-new-tokens'), temperature: option('--temperature'), topP: option('--top-p'), seed: option('--seed') };
    for (const [name, value] of Object.entries(sampling)) {
      if (value !== undefined && (!Number.isFinite(value) || value < 0)) fail(2, `${name}: a number >= 0, got ${value}`);
    }
    const model = await Export.open(ort, directoryStore(dir), { oneGraph: true });
    if (model.unapplied.length) console.error(`generate.js: generation_config.json: not applied by this driver: ${model.unapplied.join(', ')}`);
    await model.session(model.graphFor('prefill'));
    const loaded = performance.now(), stream = rest.includes('--stream');
    let first = null;
    const onToken = (_, id) => { first ??= performance.now(); if (stream) console.log(id); };
    const { tokens } = await generate(model, [rest[0].split(',').map(Number)], { ...sampling, onToken });
    const done = performance.now();
    console.log(JSON.stringify(tokens[0]));
    if (rest.includes('--time')) {
      console.log(JSON.stringify({ load_seconds: (loaded - t0) / 1000, first_token_seconds: (first - loaded) / 1000,
        tokens_per_second: (tokens[0].length - 1) / ((done - first) / 1000), new_tokens: tokens[0].length }));
    }
    return;
  }
  const model = await Export.open(ort, directoryStore(dir));
  const file = path.join(second, 'vectors.json');
  if (!fs.existsSync(file)) fail(2, `${file}: no golden vectors here (make them with kvgraph vectors)`);
  const vectors = JSON.parse(fs.readFileSync(file, 'utf8'));
  for (const want of vectors.cases) {
    const { got, reason } = await checkCase(model, want, vectors.tolerance);
    if (reason) fail(1, `${second} vs ${dir}: ${reason}`);
    console.log(`case '${want.name}': ${got.calls.length} graph calls match, greedy tokens ${JSON.stringify(got.tokens)}`);
  }
}

main(process.argv.slice(2)).catch((err) => fail(2, err instanceof ExportError ? err.message : String(err.message || err)));
