"""The onnxruntime side of kvgraph: load an export directory and generate. Never imports torch."""

from .generator import Conversation, GenerationInterrupted, GenerationResult, GenerationStats, Generator
from .sampling import Sampling

__all__ = ["Conversation", "GenerationInterrupted", "GenerationResult", "GenerationStats", "Generator", "Sampling"]
