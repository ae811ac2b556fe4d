"""The onnxruntime side of kvgraph. Never imports torch or transformers."""
