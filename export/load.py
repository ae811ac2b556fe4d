"""Loading what export needs: the model, its tokenizer and generation config."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from kvgraph.graphs import KvgraphError
from kvgraph.export.families import UNSUPPORTED
from kvgraph.export.footprint import check_fits, parameter_bytes

transformers.utils.logging.disable_progress_bar()

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
AUTO_CLASSES = {False: (AutoModelForCausalLM, "causal-LM"), True: (AutoModelForSeq2SeqLM, "sequence-to-sequence")}  # is_encoder_decoder ->


@dataclass
class Source:
    model: PreTrainedModel
    tokenizer: Any | None  # a transformers tokenizer, or None when the source has none
    description: str  # the path or hub id, or "<in-memory LlamaForCausalLM>"
    owned: bool = False  # loaded by the export itself (from a path or hub id), not passed in by the caller

    def release_weights(self) -> None:
        """Free the weights of a model the export loaded itself; its config and generation config stay. A model the
        caller passed in is left as it is."""
        if not self.owned:
            return
        with torch.no_grad():  # in place: libraries that still refer to a parameter object (a tracer's graph) keep no data
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                tensor.data = torch.empty(0, dtype=tensor.dtype)
        gc.collect()


def load_source(model_or_path: PreTrainedModel | str | os.PathLike, *, dtype: str, trust_remote_code: bool, tokenizer: Any | None = None) -> Source:
    """Load (or accept) a causal LM or an encoder-decoder in eval mode and in the requested dtype."""
    if dtype not in TORCH_DTYPES:
        raise KvgraphError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    if isinstance(model_or_path, PreTrainedModel):
        source = Source(model_or_path, tokenizer, f"<in-memory {type(model_or_path).__name__}>")
    elif isinstance(model_or_path, (str, os.PathLike)):
        source = _load_from(str(model_or_path), trust_remote_code, tokenizer, TORCH_DTYPES[dtype])
    else:
        raise TypeError(f"export_model expects a PreTrainedModel or a path/hub id, got {type(model_or_path).__name__}")
    check_supported(source.model.config, source.description)
    source.model = source.model.to(TORCH_DTYPES[dtype]).eval()
    return source


def check_supported(config, description: str) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type in UNSUPPORTED:
        raise KvgraphError(f"{description}: model type {model_type!r}: {UNSUPPORTED[model_type]}")


def _load_from(name: str, trust_remote_code: bool, tokenizer: Any | None, dtype: torch.dtype) -> Source:
    """The model at a path or hub id, loaded in `dtype` (a bf16 or fp16 checkpoint exported as fp16 is never upcast),
    after checking that the export will fit in memory."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KvgraphError(f"{name}: not a directory (expected a Hugging Face model directory)")
        if not os.access(path, os.R_OK | os.X_OK) or not (path / "config.json").is_file():
            raise KvgraphError(f"{name}: no readable config.json; is this a Hugging Face model directory?")
    elif name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
        raise KvgraphError(f"{name}: model path not found")
    config = _config(name, trust_remote_code)
    check_supported(config, name)
    auto, kind = AUTO_CLASSES[bool(getattr(config, "is_encoder_decoder", False))]
    try:
        check_fits(parameter_bytes(config, auto, dtype), name, dtype)  # before any weight loads
        model = auto.from_pretrained(name, config=config, trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as exc:
        raise KvgraphError(f"{name}: model type {config.model_type!r} has no {kind} class in transformers: {first_line(exc)}") from exc
    except OSError as exc:
        raise KvgraphError(f"{name}: cannot load the weights: {first_line(exc)}") from exc
    if tokenizer is None:
        tokenizer = _tokenizer(name, trust_remote_code)
    return Source(model, tokenizer, name, owned=True)


def _config(name: str, trust_remote_code: bool):
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise KvgraphError(f"{name}: this model needs its own code from the hub; pass --trust-remote-code if you trust it") from exc
        raise KvgraphError(f"{name}: cannot read the model config: {first_line(exc)}") from exc
    except OSError as exc:
        raise KvgraphError(f"{name}: cannot load the model config (a local path or a reachable hub id): {first_line(exc)}") from exc
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise KvgraphError(f"{name}: this model needs its own code (auto_map in config.json); pass --trust-remote-code if you trust it")
    return config


def _tokenizer(name: str, trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None  # a model without tokenizer files still exports; the manifest says so


def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
