from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests' own helpers (families, oracle)

from families import TINY_CONFIGS, tiny_model  # noqa: E402


class Exported:
    def __init__(self, family, model, directory, manifest):
        self.family = family
        self.model = model
        self.directory = directory
        self.manifest = manifest
        self.contract = manifest.contract


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """Each tiny family model is exported once per test session, on first use."""
    from kvgraph.export import export_model

    cache = {}

    def get(family: str, mode: str = "dynamic") -> Exported:
        if (family, mode) not in cache:
            model = tiny_model(family)
            out = tmp_path_factory.mktemp("exports") / f"{family}-{mode}"
            options = {"cache": "static", "max_length": STATIC_LENGTH} if mode == "static" else {}
            result = export_model(model, out, **options)
            cache[family, mode] = Exported(family, model, out, result.manifest)
        return cache[family, mode]

    return get


STATIC_LENGTH = 48  # the parity tests' longest sequence is 23 tokens
SEQ2SEQ_STATIC_LENGTH = 32


@pytest.fixture(scope="session")
def seq2seq_exports(tmp_path_factory):
    """Each tiny encoder-decoder exported once per session and cache mode: (model, directory, manifest)."""
    from families import tiny_seq2seq
    from kvgraph.export import export_model

    cache = {}

    def get(family: str, mode: str = "dynamic"):
        if (family, mode) not in cache:
            model = tiny_seq2seq(family)
            out = tmp_path_factory.mktemp("seq2seq") / f"{family}-{mode}"
            options = {"cache": "static", "max_length": SEQ2SEQ_STATIC_LENGTH} if mode == "static" else {}
            cache[family, mode] = (model, out, export_model(model, out, **options).manifest)
        return cache[family, mode]

    return get


@pytest.fixture(params=[(f, m) for m in ("dynamic", "static") for f in sorted(TINY_CONFIGS)], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, export_cache) -> Exported:
    """Every family, exported with a dynamic and with a static cache."""
    return export_cache(*request.param)


@pytest.fixture(scope="session")
def text_export(tmp_path_factory):
    """A tiny llama with a byte-level tokenizer and chat template, exported once: (model, directory)."""
    from families import text_model_dir
    from kvgraph.export import export_model
    from transformers import AutoModelForCausalLM

    model_dir = text_model_dir(tmp_path_factory.mktemp("hf") / "text-llama")
    out = tmp_path_factory.mktemp("exports") / "text-llama"
    export_model(model_dir, out)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), out


TEXT_STATIC_LENGTH = 96


@pytest.fixture(scope="session")
def text_export_static(tmp_path_factory, text_export):
    """The same tiny text llama exported with a static cache of 96 positions: (model, directory)."""
    from families import text_model_dir
    from kvgraph.export import export_model

    model_dir = text_model_dir(tmp_path_factory.mktemp("hf") / "text-llama")  # same seed: same weights
    out = tmp_path_factory.mktemp("exports") / "text-llama-static"
    export_model(model_dir, out, cache="static", max_length=TEXT_STATIC_LENGTH)
    return text_export[0], out


def _long_model_dir(tmp_path_factory):
    from families import CHAT_TEMPLATE, byte_tokenizer, tiny_model

    model_dir = tmp_path_factory.mktemp("hf") / "long-llama"
    tiny_model("llama", vocab_size=260, max_position_embeddings=4096).save_pretrained(model_dir)
    byte_tokenizer(CHAT_TEMPLATE).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def long_export(tmp_path_factory):
    """The byte-level text llama with 4,096 positions, dynamic cache: 2,000 tokens take about half a second
    (a request long enough to time out, or to be running when the server is told to stop)."""
    from kvgraph.export import export_model

    return export_model(_long_model_dir(tmp_path_factory), tmp_path_factory.mktemp("exports") / "long-llama").directory


@pytest.fixture(scope="session")
def long_export_static(tmp_path_factory):
    """The same, with a static cache of 4,096 positions."""
    from kvgraph.export import export_model

    out = tmp_path_factory.mktemp("exports") / "long-llama-static"
    return export_model(_long_model_dir(tmp_path_factory), out, cache="static", max_length=4096).directory


def pytest_collection_modifyitems(items):
    """The real model's tests first: under `-n 2` its 5-minute export then overlaps the tiny ones."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)
