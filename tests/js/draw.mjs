// Draws from the JavaScript driver's sampler (examples/js/kvgraph.js) for tests/test_vectors.py: reads
// {logits, temperature, topP, seed, draws} as JSON on stdin, prints the count of each id drawn as JSON.
import { choose, random } from '../../examples/js/kvgraph.js';

let input = '';
for await (const chunk of process.stdin) input += chunk;
const { logits, temperature, topP, seed, draws } = JSON.parse(input);
const row = Float32Array.from(logits), draw = random(seed), counts = new Array(row.length).fill(0);
for (let i = 0; i < draws; i++) counts[choose(row, { temperature, topP }, draw)]++;
console.log(JSON.stringify(counts));
