"""lm-evaluation-harness, the client evaluation users run against a local server: its `local-completions` model
pointed at `kvgraph serve` scores a small multiple-choice task (a YAML and a JSONL in the tests, no hub download)
through echo + logprobs, and every choice's log-likelihood, and the accuracy, equal what lm_eval's own `hf` backend
computes on the same model in PyTorch. (The `hf` backend puts the tokenizer's BOS before each context and
`local-completions` does not unless told: add_bos_token=True, so both score the same token ids.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_serve import Server

QUESTIONS = Path(__file__).with_name("lm_eval_task") / "questions.jsonl"
TASK = """task: kvgraph_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _evaluate(model: str, model_args: str, include: Path) -> tuple[float, list[list[float]]]:
    """(accuracy, per question the log-likelihood of each choice) from lm_eval.simple_evaluate."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["kvgraph_choices"], task_manager=TaskManager(include_path=str(include)),
                          log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    samples = sorted(out["samples"]["kvgraph_choices"], key=lambda s: s["doc_id"])
    return out["results"]["kvgraph_choices"]["acc,none"], [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def test_lm_eval_through_the_server_equals_its_hf_backend(text_export_static, tmp_path, monkeypatch):
    from tiny_models import text_model_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "kvgraph_choices.yaml").write_text(TASK.format(data=json.dumps(str(QUESTIONS))))
    model_dir = text_model_dir(tmp_path / "hf")  # the served export's weights: the same seed
    running = Server(text_export_static[1], max_batch=2, max_queue=8)
    try:
        served = _evaluate("local-completions", f"model=tiny,base_url={running.url}/v1/completions,tokenizer={model_dir},"
                           "tokenizer_backend=huggingface,add_bos_token=True,num_concurrent=1,max_retries=1", include)
    finally:
        running.close()
    reference = _evaluate("hf", f"pretrained={model_dir},dtype=float32,device=cpu", include)
    assert len(served[1]) == 6 and [len(choices) for choices in served[1]] == [len(choices) for choices in reference[1]]
    for mine, theirs in zip(served[1], reference[1]):
        assert mine == pytest.approx(theirs, abs=1e-3)
    assert served[0] == reference[0]
