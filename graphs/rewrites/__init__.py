"""Graph rewrites, one a module, each a function over an onnx.ModelProto (in place) that returns what it changed:

    strip_metadata          the exporter's per-node debug metadata
    untie_transposed        a tied lm_head's folded transposed copy -> Transpose of the embedding
    transposed_embeddings   the embedding stored (H, V), once, within and across graphs
    zero_additions          Add(x, zeros) -> Identity(x)
    grouped_heads           Attention reads the Hkv cached heads without repeat_kv's copies
    packed_heads            Attention over (B, S, H·D) tensors, a dynamic cache's concatenation inside the op
    fused_projections       quantized q, k, v (gate, up) reading one activation multiplied as one matrix
    every_position          logits at every new position (the verify graph)

graph_edit holds the small edits they share. graphs/quantization.py is the weight-quantizing rewrite.
"""
