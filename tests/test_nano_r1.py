"""The nano R1 pipeline wired end to end at toy size (the real run is `make nano-r1`)."""

import json

from sputnik.tasks import get_task
from sputnik.train.nano_r1 import NanoR1Config, run


def test_traces_add_column_by_column():
    task = get_task("arithmetic:digits=3")
    for p in task.problems("train", 50):
        reasoning, answer = task.trace(p)
        assert answer == f"\\boxed{{{p.answer}}}" and reasoning.endswith(f"= {p.answer}.")
        assert reasoning.startswith(f"{p.meta['a']} + {p.meta['b']}.")


def test_pipeline_runs_every_stage(tmp_path):
    cfg = NanoR1Config(out_dir=str(tmp_path / "nano"), corpus_problems=300, vocab_size=300, dim=32, n_layers=2,
                       pretrain_steps=3, sft_problems=16, sft_steps=2, grpo_steps=1, eval_n=8, eval_k=1)
    summary = run(cfg)
    figure = json.loads((tmp_path / "nano" / "nano-r1.json").read_text())
    assert set(figure) >= {"sft", "grpo", "closed", "direct", "minutes"} and figure["minutes"] > 0
    for run_name in ("sft", "grpo", "closed", "direct"):
        assert 0 <= figure[run_name]["pass@1"] <= 1, run_name
    assert summary.stage_minutes.keys() == {"tokenizer", "pretrain", "sft", "grpo", "direct", "eval"}
    # The control answers directly: its SFT data has no reasoning, its prompts close the thought.
    direct_rows = [json.loads(line) for line in (tmp_path / "nano" / "sft-direct.jsonl").read_text().splitlines()]
    assert all("reasoning_content" not in r["messages"][1] for r in direct_rows)
    assert figure["direct"]["think_tokens"] == 0 and figure["closed"]["think_tokens"] == 0
    for stage in ("pretrain", "sft", "grpo", "grpo-direct"):
        assert (tmp_path / "nano" / f"{stage}.png").is_file()
    assert (tmp_path / "nano" / "pretrain" / "expert_load.png").is_file()
