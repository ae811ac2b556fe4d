"""The onnxruntime side of kvgraph: load an export directory and generate. Never imports torch."""

from .generator import Conversation, GenerationResult, GenerationStats, Generator
from .sampling import Sampling

__all__ = ["Conversation", "GenerationResult", "GenerationStats", "Generator", "Sampling"]
