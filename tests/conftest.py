from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests' own helpers (tiny_models, oracle)

from tiny_models import TINY_CONFIGS, tiny_model  # noqa: E402


class Exported:
    def __init__(self, family, model, directory, manifest):
        self.family = family
        self.model = model
        self.directory = directory
        self.manifest = manifest
        self.contract = manifest.contract


def shared_export(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """An export made once per test run and shared by the xdist workers: the first worker to ask builds it (export
    publishes a directory only when complete), the others wait for it. Tests treat shared exports as read-only."""
    from filelock import FileLock

    run = tmp_path_factory.getbasetemp()
    run = run.parent if os.environ.get("PYTEST_XDIST_WORKER") else run  # under xdist: the run's folder, above each worker's
    out = run / "shared-exports" / name
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "kvgraph.json").is_file():
            build(out)
    return out


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """Each tiny family model is exported once per test run (shared by the workers), on first use."""
    from kvgraph.export import export_model
    from kvgraph.graphs import Manifest

    cache = {}

    def get(family: str, mode: str = "dynamic") -> Exported:
        if (family, mode) not in cache:
            model = tiny_model(family)  # seeded: the same weights in every worker
            options = {"cache": "static", "max_length": STATIC_LENGTH} if mode == "static" else {}
            out = shared_export(tmp_path_factory, f"{family}-{mode}", lambda out: export_model(model, out, **options))
            cache[family, mode] = Exported(family, model, out, Manifest.load(out))
        return cache[family, mode]

    return get


STATIC_LENGTH = 48  # the parity tests' longest sequence is 23 tokens
SEQ2SEQ_STATIC_LENGTH = 32


@pytest.fixture(scope="session")
def seq2seq_exports(tmp_path_factory):
    """Each tiny encoder-decoder exported once per run and cache mode: (model, directory, manifest)."""
    from tiny_models import tiny_seq2seq
    from kvgraph.export import export_model
    from kvgraph.graphs import Manifest

    cache = {}

    def get(family: str, mode: str = "dynamic"):
        if (family, mode) not in cache:
            model = tiny_seq2seq(family)
            options = {"cache": "static", "max_length": SEQ2SEQ_STATIC_LENGTH} if mode == "static" else {}
            out = shared_export(tmp_path_factory, f"seq2seq-{family}-{mode}", lambda out: export_model(model, out, **options))
            cache[family, mode] = (model, out, Manifest.load(out))
        return cache[family, mode]

    return get


@pytest.fixture(params=[(f, m) for m in ("dynamic", "static") for f in sorted(TINY_CONFIGS)], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, export_cache) -> Exported:
    """Every family, exported with a dynamic and with a static cache."""
    return export_cache(*request.param)


@pytest.fixture(scope="session")
def text_export(tmp_path_factory):
    """A tiny llama with a byte-level tokenizer and chat template, exported once: (model, directory)."""
    from tiny_models import text_model_dir
    from kvgraph.export import export_model
    from transformers import AutoModelForCausalLM

    model_dir = text_model_dir(tmp_path_factory.mktemp("hf") / "text-llama")
    out = shared_export(tmp_path_factory, "text-llama", lambda out: export_model(model_dir, out))
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), out


TEXT_STATIC_LENGTH = 96


@pytest.fixture(scope="session")
def text_export_static(tmp_path_factory, text_export):
    """The same tiny text llama exported with a static cache of 96 positions: (model, directory)."""
    from tiny_models import text_model_dir
    from kvgraph.export import export_model

    def build(out: Path) -> None:
        model_dir = text_model_dir(tmp_path_factory.mktemp("hf") / "text-llama")  # same seed: same weights
        export_model(model_dir, out, cache="static", max_length=TEXT_STATIC_LENGTH)

    return text_export[0], shared_export(tmp_path_factory, "text-llama-static", build)


def _long_model_dir(tmp_path_factory):
    from tiny_models import CHAT_TEMPLATE, byte_tokenizer, tiny_model

    model_dir = tmp_path_factory.mktemp("hf") / "long-llama"
    tiny_model("llama", vocab_size=260, max_position_embeddings=4096).save_pretrained(model_dir)
    byte_tokenizer(CHAT_TEMPLATE).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def long_export(tmp_path_factory):
    """The byte-level text llama with 4,096 positions, dynamic cache: 2,000 tokens take about half a second
    (a request long enough to time out, or to be running when the server is told to stop)."""
    from kvgraph.export import export_model

    return shared_export(tmp_path_factory, "long-llama", lambda out: export_model(_long_model_dir(tmp_path_factory), out))


@pytest.fixture(scope="session")
def long_export_static(tmp_path_factory):
    """The same, with a static cache of 4,096 positions."""
    from kvgraph.export import export_model

    return shared_export(tmp_path_factory, "long-llama-static",
                         lambda out: export_model(_long_model_dir(tmp_path_factory), out, cache="static", max_length=4096))


def pytest_collection_modifyitems(items):
    """The real model's tests first: under `-n 2` its 5-minute export then overlaps the tiny ones."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)
