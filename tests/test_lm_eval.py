"""lm-evaluation-harness as a client of `sputnik serve`: its local-completions model with the server's remote
tokenizer, on local YAML tasks over JSONL files written here (no hub), loglikelihood and generate_until, and its
figures against `sputnik eval` and a plain forward on the same rows."""

from __future__ import annotations

import json

import pytest
import torch
from live import Live

from sputnik.serve.config import ServeConfig

ADDITIONS = [(a, b) for a, b in ((2, 3), (1, 1), (4, 4), (10, 5), (7, 2), (3, 6), (12, 1), (5, 5))]


@pytest.fixture(scope="module")
def smol_server(default_gguf):
    with Live(ServeConfig(model=str(default_gguf), dtype="float32", served_name="smol", no_auth=True,
                          rate_limit=0)) as live:
        yield live.wait_ready()


def write_tasks(tmp_path) -> None:
    rows = [{"prompt": f"Question: what is {a} plus {b}?\nAnswer:", "answer": str(a + b), "verifier": "number",
             "choices": [f"{a + b}", f"{a + b + 3}", f"{a * b + 10}"], "gold": 0} for a, b in ADDITIONS]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'rows.jsonl'}\ntest_split: test\n"
    (tmp_path / "sum_choice.yaml").write_text(
        "task: sum_choice\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "sum_gen.yaml").write_text(
        "task: sum_gen\n" + data + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: []\n  max_gen_toks: 8\n  do_sample: false\n"
        "filter_list:\n  - name: last_number\n    filter:\n      - function: regex\n        regex_pattern: '(-?\\d+)'\n"
        "        group_select: -1\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n")


def test_lm_eval_against_the_server(smol_server, default_gguf, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    args = (f"base_url={smol_server.url}/v1/completions,model=smol,tokenizer_backend=remote,num_concurrent=1,"
            "max_retries=1")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["sum_choice", "sum_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                                  apply_chat_template=False)
    from sputnik.checkpoint import load_pretrained
    from sputnik.checkpoint.args import ModelArgs
    from sputnik.eval.run import EvalConfig, evaluate

    model, tok = load_pretrained(default_gguf, quantize="auto")  # as the server loads it: its blocks as they are

    # loglikelihood: lm-eval's figures are the sums of a plain forward's log-probs over each choice.
    samples = sorted(out["samples"]["sum_choice"], key=lambda s: s["doc_id"])
    correct = 0
    for s in samples:
        doc = s["doc"]
        want = []
        for choice in doc["choices"]:
            ctx = tok.encode(doc["prompt"], add_special_tokens=False)
            ids = ctx + tok.encode(" " + choice, add_special_tokens=False)  # lm-eval's target_delimiter
            with torch.no_grad():
                logp = model.logits(model.hidden(torch.tensor([ids])))[0].log_softmax(-1)
            want.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids))))
        got = [r[0][0] for r in s["resps"]]
        assert got == pytest.approx(want, abs=1e-3)
        correct += max(range(len(want)), key=want.__getitem__) == doc["gold"]
    acc = out["results"]["sum_choice"]["acc,none"]
    assert acc == pytest.approx(correct / len(samples))

    # generate_until: the same rows through `sputnik eval` (greedy, plain prompts, the last number) agree. Its KV
    # cache is the server's (--kv-dtype auto: float16 under blocks): a float32 cache parts from it at near ties.
    summary = evaluate(model, tok, EvalConfig(task=f"jsonl:{tmp_path / 'rows.jsonl'}", n=len(ADDITIONS), k=0,
                                              template="plain", suffix="", max_tokens=8, grading="lenient"),
                       progress=False, kv_dtype=ModelArgs().cache_dtype(model))
    exact = out["results"]["sum_gen"]["exact_match,last_number"]
    assert summary.problems == len(ADDITIONS)
    assert exact == pytest.approx(summary.greedy_accuracy)
