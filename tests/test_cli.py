"""The `kvgraph` command: export from a model directory, inspect, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_model
from kvgraph.runtime.commands.main import main

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="w1", eos_token="w2", pad_token="w0", unk_token="w3")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_model("llama").save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def cli_export(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    assert main(["export", str(model_dir), str(out)]) == 0
    return out


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_export_prints_a_line_per_graph_and_no_deprecated_cache_argument(model_dir, tmp_path, capsys):
    """Quiet success: one validation line per graph (the full table with --verbose). transformers >= 5.24 takes the
    cache as `cache=`, and warns that `past_key_values=` goes in 5.40: a fresh process (warnings shown always, each
    once-only message for the first time) prints no such warning."""
    from kvgraph.graphs import Manifest

    kvgraph = str(Path(sys.executable).with_name("kvgraph"))
    done = subprocess.run([kvgraph, "export", str(model_dir), str(tmp_path / "quiet")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "always"})
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if "past_key_values" in line or "cache_params" in line], done.stderr
    graphs = list(Manifest.load(tmp_path / "quiet").contract.graphs())
    lines = [line for line in done.stderr.splitlines() if "worst |diff|" in line]
    assert [line.split()[0] for line in lines] == graphs and all(line.endswith(": ok") for line in lines), done.stderr
    assert "max |diff| per tensor and step" not in done.stderr
    code, _, err = _run(capsys, "export", model_dir, tmp_path / "verbose", "--verbose")
    assert code == 0 and "max |diff| per tensor and step" in err
    assert len([line for line in err.splitlines() if line.startswith(tuple(graphs)) and line.rstrip().endswith(" ok")]) > len(graphs)


def test_export_from_a_directory_copies_tokenizer_and_generation_config(cli_export):
    names = {p.name for p in cli_export.iterdir()}
    assert {"prefill.onnx", "decode.onnx", "extend.onnx", "verify.onnx", "model.onnx.data", "weights.json", "kvgraph.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "chat_template.jinja"} == names
    manifest = json.loads((cli_export / "kvgraph.json").read_text())
    assert manifest["files"]["tokenizer"] == "tokenizer.json"
    assert manifest["files"]["chat_template"] == "chat_template.jinja"
    assert (cli_export / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_inspect_prints_a_table_and_json(cli_export, capsys):
    code, out, _ = _run(capsys, "inspect", cli_export)
    assert code == 0
    assert "llama (LlamaForCausalLM)" in out
    assert "past.0.key" in out and "(batch, 2, past_sequence, 16)" in out
    assert "validation   passed" in out
    code, out, _ = _run(capsys, "inspect", cli_export, "--json")
    data = json.loads(out)
    assert data["graphs"]["prefill"]["outputs"][0]["shape"] == ["batch", 1, 32000]  # llama's stands for Llama 2's vocabulary
    assert data["file_sizes"]["model.onnx.data"] > 0


def test_non_empty_output_is_refused_without_force(cli_export, model_dir, capsys):
    before = sorted(p.name for p in cli_export.iterdir())
    code, _, err = _run(capsys, "export", model_dir, cli_export)
    assert code == 1 and "exists and is not empty; pass --force" in err
    assert sorted(p.name for p in cli_export.iterdir()) == before


def test_force_replaces_an_existing_directory(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, _ = _run(capsys, "export", model_dir, out, "--force", "--no-validate")
    assert code == 0
    assert not (out / "stale.txt").exists() and (out / "decode.onnx").is_file()
    assert json.loads((out / "kvgraph.json").read_text())["validation"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_missing_model_path(tmp_path, capsys):
    code, _, err = _run(capsys, "export", tmp_path / "no-such-model", tmp_path / "out")
    assert code == 1 and "no-such-model: model path not found" in err
    assert not (tmp_path / "out").exists()


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "export", tmp_path / "empty", tmp_path / "out")
    assert code == 1 and "no readable config.json" in err


def test_family_without_a_text_generation_class_is_named(tmp_path, capsys):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "vit")
    code, _, err = _run(capsys, "export", tmp_path / "vit", tmp_path / "out")
    assert code == 1 and "model type 'vit' has no causal-LM class in transformers" in err
    assert not (tmp_path / "out").exists()


def test_remote_code_is_refused_without_the_flag(model_dir, tmp_path, capsys):
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "the-model-code-ran"
    (remote / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")  # what hostile code could do
    code, _, err = _run(capsys, "export", remote, tmp_path / "out")
    assert code == 1 and "--trust-remote-code" in err
    assert not (tmp_path / "out").exists() and not marker.exists()


def test_output_parent_must_be_a_directory(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _run(capsys, "export", model_dir, tmp_path / "file" / "out")
    assert code == 1 and "file: exists and is not a directory, cannot create" in err


def test_missing_parents_are_created(model_dir, tmp_path, capsys):
    """Like save_pretrained and optimum-cli, `kvgraph export MODEL models/new/out` creates models/new (test_export: and removes it on failure)."""
    code, _, err = _run(capsys, "export", model_dir, tmp_path / "models" / "new" / "out")
    assert code == 0, err
    for phase in ("trace", "optimize", "write", "validate"):  # progress: each phase with its time and its own peak memory
        assert re.search(rf"^{phase} done in \d+\.\d s, peak RSS \d+(\.\d)? (MB|GB) \(\d+\.\d s so far\)$", err, flags=re.MULTILINE), err
    assert (tmp_path / "models" / "new" / "out" / "kvgraph.json").is_file()
    assert sorted(p.name for p in (tmp_path / "models" / "new").iterdir()) == ["out"]


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "a", "b", "--no-such-option"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_inspect_a_directory_that_is_not_an_export(tmp_path, capsys):
    code, _, err = _run(capsys, "inspect", tmp_path)
    assert code == 1 and "no manifest here" in err


def test_console_script_parses_without_importing_torch():
    probe = "import sys; from kvgraph.runtime.commands.main import build_parser; build_parser(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = subprocess.run([str(Path(sys.executable).with_name("kvgraph")), "export", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--trust-remote-code" in help_text



def test_real_ctrl_c_during_export_leaves_nothing_and_exits_130(model_dir, tmp_path):
    """A real SIGINT to `kvgraph export`, sent once the staging directory exists (deterministic, whatever the load)."""
    import os
    import signal
    import time

    out = tmp_path / "new" / "out"
    kvgraph = str(Path(sys.executable).with_name("kvgraph"))
    # a shell's background job inherits SIGINT ignored (and Python keeps it so): give the child the default, as a terminal does
    child = subprocess.Popen([kvgraph, "export", str(model_dir), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in out.parent.glob(".out.*")) and child.poll() is None:
        assert time.monotonic() < deadline, "the export never created its staging directory"
        time.sleep(0.01)
    assert child.poll() is None, f"the export ended before it could be interrupted: {child.communicate()}"
    os.kill(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, f"rc {child.returncode}: {err}"
    assert "kvgraph export: interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # no output, no staging directory, not even the parent it created


def test_runtime_and_graphs_name_no_export_module():
    """runtime/ and graphs/ never import export/, not even by name: the subcommands are entry points in pyproject.toml."""
    root = Path(__file__).resolve().parents[1]
    for folder in ("runtime", "graphs"):
        for source in (root / folder).rglob("*.py"):
            text = source.read_text()
            assert "kvgraph.export" not in text and "..export" not in text, f"{source} names the export package"
    names = {point.name for point in __import__("importlib.metadata").metadata.entry_points(group="kvgraph.commands")}
    assert names == {"export", "quantize", "inspect", "generate", "vectors", "bench", "serve", "web"}


def test_a_model_too_large_for_the_machine_is_refused_before_its_weights_load(tmp_path, capsys):
    """Llama-3.1-405B's shape (config only, no weights file): the estimate, from a model built on the meta device,
    refuses it in one line with the memory it needs and what would help, and nothing is written."""
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                         num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path / "huge")
    code, _, err = _run(capsys, "export", tmp_path / "huge", tmp_path / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"exporting needs about \d+(\.\d)? GB of memory \(1\d\d\d\.\d GB of weights", err), err
    assert "this machine has" in err and "--dtype float16 halves it" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists()
