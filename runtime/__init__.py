"""The onnxruntime side of kvgraph: load an export directory and generate. Never imports torch."""

from kvgraph.runtime.generator import Conversation, GenerationInterrupted, GenerationResult, GenerationStats, Generator
from kvgraph.runtime.core.sampling import Sampling

__all__ = ["Conversation", "GenerationInterrupted", "GenerationResult", "GenerationStats", "Generator", "Sampling"]
