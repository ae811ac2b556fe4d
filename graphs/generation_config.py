"""The checkpoint's own decoding settings: generation_config.json read as transformers' generate() reads it.

Precedence, as in transformers and vLLM: what the caller passes, then the export's generation_config.json, then
transformers' global defaults for the fields a generation config can leave unset (do_sample False, top_k 50, ...).
One exception, as vLLM: a length comes from max_new_tokens or an explicit max_length in the file; without either,
kvgraph's own default (64 new tokens) applies, not transformers' max_length 20.

    defaults = GenerationDefaults.read(directory)      # warns once, in one line, about fields kvgraph cannot apply
    defaults.settings                                 # {"num_beams": 4, "forced_bos_token_id": 0, ...}: generate()'s kwargs
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvgraph.graphs import KvgraphError

FILE = "generation_config.json"

# transformers' GenerationConfig._get_default_generation_params(): what a field left unset means
UNSET_MEANS = {"do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
               "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
               "num_return_sequences": 1, "early_stopping": False, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
               "encoder_repetition_penalty": 1.0, "min_length": 0, "remove_invalid_values": False, "renormalize_logits": False}

# fields generate() reads that kvgraph applies -> the generate() keyword that carries them
APPLIED = {"max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens", "max_length": "max_length", "min_length": "min_length",
           "num_beams": "num_beams", "length_penalty": "length_penalty", "early_stopping": "early_stopping",
           "num_return_sequences": "num_return_sequences", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
           "typical_p": "typical_p", "epsilon_cutoff": "epsilon_cutoff", "eta_cutoff": "eta_cutoff",
           "repetition_penalty": "repetition_penalty", "encoder_repetition_penalty": "encoder_repetition_penalty",
           "no_repeat_ngram_size": "no_repeat_ngram_size", "encoder_no_repeat_ngram_size": "encoder_no_repeat_ngram_size",
           "exponential_decay_length_penalty": "exponential_decay_length_penalty", "sequence_bias": "sequence_bias",
           "bad_words_ids": "bad_words_ids", "forced_bos_token_id": "forced_bos_token_id", "forced_eos_token_id": "forced_eos_token_id",
           "suppress_tokens": "suppress_tokens", "begin_suppress_tokens": "begin_suppress_tokens",
           "renormalize_logits": "renormalize_logits", "remove_invalid_values": "remove_invalid_values"}
SAMPLING_SWITCH = ("do_sample", "temperature")  # become temperature: 0 (greedy) unless do_sample
# read elsewhere (the manifest's special tokens) or only about what generate() returns: nothing to apply here
ELSEWHERE = {"eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
             "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
             "cache_implementation", "cache_config", "compile_config", "disable_compile", "max_time", "low_memory", "is_assistant",
             "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
             "target_lookbehind", "max_cache_len", "prefill_chunk_size", "continuous_batching_config", "stop_strings"}
# generate() applies these and kvgraph does not: named when they are set to something other than "off"
OFF = {"num_beam_groups": 1, "diversity_penalty": 0.0, "guidance_scale": None, "watermarking_config": None, "penalty_alpha": None,
       "constraints": None, "force_words_ids": None, "dola_layers": None, "top_h": None, "token_healing": False,
       "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "forced_decoder_ids": None, "use_mtp": False,
       "speculation_type": None, "max_matching_ngram_size": None}


@dataclass(frozen=True)
class GenerationDefaults:
    """generate()'s keyword defaults from an export's generation config, and the fields it had to leave out."""

    settings: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # "field=value" generate() would apply and kvgraph does not
    source: str = ""  # the file read, or "" when none

    @classmethod
    def read(cls, directory: str | Path, warn: bool = True) -> GenerationDefaults:
        path = Path(directory) / FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KvgraphError(f"{path}: not a readable generation config ({type(exc).__name__}: {exc})") from None
        if not isinstance(raw, dict):
            raise KvgraphError(f"{path}: a generation config is a JSON object")
        defaults = cls.from_dict(raw, str(path))
        if warn and defaults.ignored:
            warnings.warn(f"{path}: generate() would also apply {', '.join(defaults.ignored)}; kvgraph cannot, and decodes without "
                          "them", stacklevel=2)
        return defaults

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "") -> GenerationDefaults:
        settings: dict[str, Any] = {}
        for key, value in raw.items():
            if key in APPLIED and value is not None and value != UNSET_MEANS.get(key, object()):
                settings[APPLIED[key]] = _plain(key, value)
        sampling = raw.get("do_sample")
        if sampling is None:
            sampling = UNSET_MEANS["do_sample"]
        if sampling:
            settings["temperature"] = float(raw.get("temperature") if raw.get("temperature") is not None else UNSET_MEANS["temperature"])
            if raw.get("top_k") is None:
                settings["top_k"] = UNSET_MEANS["top_k"]
        else:
            for knob in ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"):  # warpers: sampling only
                settings.pop(knob, None)
        ignored = tuple(f"{key}={value!r}" for key, value in raw.items()
                        if key in OFF and value is not None and value != OFF[key] and value != [])
        unknown = sorted(set(raw) - set(APPLIED) - set(ELSEWHERE) - set(OFF) - set(SAMPLING_SWITCH) - set(UNSET_MEANS))
        ignored += tuple(f"{key}={raw[key]!r}" for key in unknown if raw[key] is not None)
        return cls(settings, ignored, source)

    def merged(self, caller: dict[str, Any]) -> dict[str, Any]:
        """The caller's keywords over these defaults (a keyword the caller passed as None counts as not passed)."""
        return {**self.settings, **{key: value for key, value in caller.items() if value is not None}}

    def describe(self) -> list[str]:
        """Lines for `kvgraph inspect`: each default in force."""
        if not self.source:
            return ["generation defaults: kvgraph's own (no generation_config.json)"]
        lines = [f"generation defaults from {Path(self.source).name} (a call's own arguments override them):"]
        lines += [f"  {key} = {value!r}" for key, value in sorted(self.settings.items())] or ["  (none beyond transformers' defaults)"]
        lines += [f"  not applied: {item}" for item in self.ignored]
        return lines


def _plain(key: str, value: Any) -> Any:
    """JSON values as generate() takes them: lists of ids as tuples, sequence_bias as ((ids, bias), ...)."""
    if key == "sequence_bias":
        pairs = value.items() if isinstance(value, dict) else value
        return tuple((tuple(ids) if isinstance(ids, (list, tuple)) else tuple(json.loads(ids)), float(bias)) for ids, bias in pairs)
    if key == "bad_words_ids":
        return tuple(tuple(word) for word in value)
    if key in ("suppress_tokens", "begin_suppress_tokens"):
        return tuple(value)
    if key == "forced_eos_token_id":
        return tuple(value) if isinstance(value, list) else (value,)
    if key == "exponential_decay_length_penalty":
        return (int(value[0]), float(value[1]))
    return value
