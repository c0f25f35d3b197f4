"""R1's grading rule decides what GRPO teaches: strict grading keeps the format, lenient grading pays a shortcut."""

from test_reasoning_tasks import think_tokenizer


def strict_or_lenient_run(tmp_path, grading: str) -> list[dict]:
    """A tiny model, prompts that open <think>, reward = accuracy + 0.1 format (nano-r1's weights before strict
    grading). "3" alone is the shortcut (right by the last number, but the thought never closed), "…</think>3" an
    answer after a closed thought."""
    import json

    import torch

    from sputnik.config import ModelConfig
    from sputnik.model import Transformer
    from sputnik.train.grpo import GRPOConfig, GRPOObjective
    from sputnik.train.loop import TrainConfig, Trainer

    data = tmp_path / "threes.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}{b}?", "answer": "3"}) + "\n"
                            for a in "abcdefghij" for b in "abcdefghij"))
    tok = think_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, inter_dim=64, max_seq_len=64))
    cfg = GRPOConfig(task=f"jsonl:{data},verifier=number", template="plain", think="open", grading=grading,
                     rewards={"accuracy": 1.0, "format": 0.1},
                     prompts_per_step=4, num_generations=16, max_completion_length=4, temperature=1.0,
                     micro_batch_size=64, train_pool=64, eval_n=0)
    out = tmp_path / grading
    Trainer(model, TrainConfig(out_dir=str(out), max_steps=40, lr=3e-3, progress=False, plot_every=0),
            GRPOObjective(model, tok, cfg, seed=0)).run()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "reward" in line]


def test_strict_grading_keeps_the_format_that_lenient_grading_loses(tmp_path):
    strict, lenient = strict_or_lenient_run(tmp_path, "strict"), strict_or_lenient_run(tmp_path, "lenient")

    def late(rows, key):
        return sum(r[key] for r in rows[-8:]) / 8

    # Lenient grading pays the shortcut, so the thought stops closing and the format goes (as nano-r1's did);
    # strict grading pays only answers after a closed thought, so GRPO learns to close it and the format grows.
    assert late(lenient, "closed_thoughts") < 0.2 and late(lenient, "rewards/format") < 0.1
    assert late(strict, "closed_thoughts") > 0.7, [r["closed_thoughts"] for r in strict]
    assert late(strict, "rewards/format") > 0.35, [r["rewards/format"] for r in strict]
    assert late(strict, "rewards/format") > late(lenient, "rewards/format") + 0.3
