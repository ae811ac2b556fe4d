"""Decoding strategies over the core loop: beam search, speculative decoding, constrained (structured) output.
Imports the core and kvgraph.graphs, never the Generator."""
