"""The loop and what it stands on: sessions over the graphs, shared weights, caches and steps, the token loop,
sampling, text. Imports only kvgraph.graphs."""
