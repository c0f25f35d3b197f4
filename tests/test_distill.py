"""Distillation: filters on hand-made traces, traces end to end from an engine teacher and from an HTTP teacher,
the logit-level KL (zero for equal weights, equal to a hand computation, lowered by training), the refusal of a
student with another vocabulary, and the whole stage in both modes."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from live import REPLY, Live

from sputnik import kernels
from sputnik.config import ModelConfig
from sputnik.kernels import QuantLinear
from sputnik.model import Transformer, build_doc_mask
from sputnik.serve.config import ServeConfig
from sputnik.tasks import get_task
from sputnik.r1 import CHAT_TEMPLATE as R1_CHAT_TEMPLATE, EOS as R1_EOS, SPECIAL_TOKENS as R1_SPECIAL_TOKENS
from sputnik.tokenizer import Tokenizer
from sputnik.train.distill import (DistillConfig, KLDistillObjective, acceptance, check_shared_vocab, distill,
                                   forward_kl, generate_traces, judge, load_teacher, rejection_sample, split_think)
from sputnik.train.loop import TrainConfig, Trainer
from sputnik.train.sft import IGNORE, SFTConfig, load_chat_jsonl

THOUGHT = "Two plus two makes four."
GOOD = f"<think>\n{THOUGHT}\n</think>\n\nThe answer is 4."
WRONG = f"<think>\n{THOUGHT}\n</think>\n\nThe answer is 5."
NO_THINK = "The answer is 4."
KOREAN = "<think>\n둘 더하기 둘은 넷입니다.\n</think>\n\nThe answer is 4."


def problems_file(tmp_path: Path) -> Path:
    """Two problems the think model answers alike ("The answer is 4."): right for one, wrong for the other."""
    rows = [{"id": "four", "prompt": "What is 2 + 2?", "answer": "4", "verifier": "number", "split": "train"},
            {"id": "five", "prompt": "Hi", "answer": "5", "verifier": "number", "split": "train"}]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hand_trace(task, problem, completion: str, sample: int = 0) -> dict:
    reasoning, answer = split_think(completion)
    return {"problem_id": problem.id, "sample": sample, "prompt": [{"role": "user", "content": problem.prompt}],
            "completion": completion, "reasoning": reasoning, "answer": answer, "gold": problem.answer,
            "finish_reason": "stop", "verdicts": judge(task, problem, completion)}


def tiny_tokenizer(text: str = "What is two plus two? It is four. The answer is 4.") -> Tokenizer:
    """A small byte-level BPE with R1's special tokens and chat template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=R1_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text] * 5, trainer)
    return Tokenizer(backend, bos_token=R1_SPECIAL_TOKENS[0], eos_token=R1_EOS, chat_template=R1_CHAT_TEMPLATE)


def tiny_model(vocab: int, seed: int, dim: int = 32) -> Transformer:
    cfg = ModelConfig(family="llama", vocab_size=vocab, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2,
                      inter_dim=2 * dim, max_seq_len=256)
    torch.manual_seed(seed)
    return Transformer(cfg)


def sft_rows_file(tmp_path: Path) -> Path:
    """Accepted traces of a few problems, written by rejection_sample."""
    task = get_task(f"jsonl:{problems_file(tmp_path)}")
    four = next(p for p in task.problems("train") if p.id == "four")
    traces = [hand_trace(task, four, GOOD, 0),
              hand_trace(task, four, "<think>\nTwo and two is four.\n</think>\n\nIt is 4.", 1)]
    path = tmp_path / "rows.jsonl"
    rejection_sample(traces, DistillConfig(out_jsonl=str(path)))
    return path


# ---------------------------------------------------------------- rejection sampling


def test_filters_keep_correct_well_formatted_traces(tmp_path, capsys):
    task = get_task(f"jsonl:{problems_file(tmp_path)}")
    four = next(p for p in task.problems("train") if p.id == "four")
    traces = [hand_trace(task, four, c, j) for j, c in enumerate([GOOD, WRONG, NO_THINK, KOREAN, GOOD])]
    assert [t["verdicts"]["correct"] for t in traces] == [True, False, True, True, True]
    assert [t["verdicts"]["format"] for t in traces] == [True, True, False, True, True]
    assert traces[3]["verdicts"]["language"] == {"ko": 1.0, "en": 0.0}

    out = tmp_path / "sft.jsonl"
    cfg = DistillConfig(language="en", max_per_problem=1, out_jsonl=str(out))
    rows = rejection_sample(traces, cfg)
    assert rows == [{"messages": [{"role": "user", "content": "What is 2 + 2?"},
                                  {"role": "assistant", "content": "The answer is 4.", "reasoning_content": THOUGHT}]}]
    kept, stats = acceptance(traces, cfg)
    assert kept == [traces[0]]
    assert stats["rejected_by"] == {"correct": 1, "format": 1, "language": 1, "empty": 0, "max_per_problem": 1}
    assert (stats["traces"], stats["accepted"], stats["problems_accepted"]) == (5, 1, 1)
    assert "1/5 traces accepted" in capsys.readouterr().out
    assert load_chat_jsonl(out) == [rows[0]["messages"]]

    # Korean reasoning is what a Korean run keeps; without filters every trace with text stays.
    assert [t["sample"] for t in acceptance(traces, DistillConfig(language="ko"))[0]] == [3]
    everything = DistillConfig(require_correct=False, require_format=False, out_jsonl=str(out))
    assert len(rejection_sample(traces, everything)) == 5
    loaded = load_chat_jsonl(out)  # a trace without a think block is kept as the teacher wrote it
    assert loaded[2][-1] == {"role": "assistant", "content": NO_THINK}


def test_filters_read_the_verdicts():
    base = {"problem_id": "p", "sample": 0, "prompt": [{"role": "user", "content": "q"}], "completion": GOOD,
            "reasoning": THOUGHT, "answer": "The answer is 4.", "gold": "4", "finish_reason": "stop"}
    unverifiable = {**base, "verdicts": {"correct": None, "format": True, "language": {"en": 1.0, "ko": 0.0}}}
    mixed = {**base, "verdicts": {"correct": True, "format": True, "language": {"en": 0.9, "ko": 0.1}}}
    assert acceptance([unverifiable], DistillConfig())[1]["rejected_by"]["correct"] == 1  # no proof is no pass
    assert acceptance([unverifiable], DistillConfig(require_correct=False))[1]["accepted"] == 1
    assert acceptance([mixed], DistillConfig(language="en"))[1]["accepted"] == 0
    assert acceptance([mixed], DistillConfig(language="en", min_language_score=0.8))[1]["accepted"] == 1


def test_split_think():
    assert split_think(GOOD) == (THOUGHT, "The answer is 4.")
    assert split_think(NO_THINK) == (None, NO_THINK)
    assert split_think("<think>\nstill thinking") == ("still thinking", "")


# ---------------------------------------------------------------- traces from real teachers


def test_generate_traces_from_an_engine_teacher(tmp_path, think_model):
    task = f"jsonl:{problems_file(tmp_path)}"
    cfg = DistillConfig(teacher=str(think_model), task=task, n_problems=2, samples_per_problem=2, temperature=0.0,
                        max_tokens=40, suffix="", device="cpu", out_jsonl=str(tmp_path / "sft.jsonl"))
    traces = generate_traces(cfg, progress=False)
    assert len(traces) == 4
    for t in traces:
        assert t["completion"] == REPLY and t["finish_reason"] == "stop"
        assert (t["reasoning"], t["answer"]) == (THOUGHT, "The answer is 4.")
        assert t["verdicts"]["format"] and t["verdicts"]["correct"] == (t["problem_id"] == "four")
    rows = rejection_sample(traces, cfg)
    assert [r["messages"][0]["content"] for r in rows] == ["What is 2 + 2?"] * 2
    assert load_chat_jsonl(cfg.out_jsonl)[0][-1]["reasoning_content"] == THOUGHT
    assert len(rejection_sample(traces, DistillConfig(max_per_problem=1))) == 1


@pytest.mark.skipif(not kernels.available(), reason="needs sputnik's CPU kernels (a C++ compiler)")
def test_a_gguf_teacher_samples_from_its_blocks(default_gguf):
    """Teacher traces come from the engine as chat and serve run it: a GGUF teacher keeps its blocks and the float16
    cache under them; KL distillation, which scores whole rows with the teacher, takes it dense."""
    cfg = DistillConfig(teacher=str(default_gguf), device="cpu")
    sampler = load_teacher(cfg)
    assert any(isinstance(m, QuantLinear) for m in sampler.model.modules()) and sampler.kv_dtype == torch.float16
    dense = load_teacher(cfg, quantize="none")
    assert not any(isinstance(m, QuantLinear) for m in dense.model.modules()) and dense.kv_dtype == torch.float32


def test_generate_traces_from_an_http_teacher(tmp_path, think_model):
    task = f"jsonl:{problems_file(tmp_path)}"
    with Live(ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True, no_web=True)) as live:
        live.wait_ready()
        cfg = DistillConfig(teacher_url=f"{live.url}/v1", task=task, n_problems=2, samples_per_problem=2,
                            temperature=0.0, max_tokens=40, suffix="", concurrency=2,
                            out_jsonl=str(tmp_path / "sft.jsonl"))
        traces = generate_traces(cfg, progress=False)
    assert len(traces) == 4
    # The server splits the thought into reasoning_content; the trace folds it back in front of the content.
    assert all(t["completion"] == REPLY and t["reasoning"] == THOUGHT for t in traces)
    by_problem = {t["problem_id"]: t["verdicts"]["correct"] for t in traces}
    assert by_problem == {"four": True, "five": False}
    assert len(rejection_sample(traces, cfg)) == 2
    assert load_chat_jsonl(cfg.out_jsonl)[1][-1] == {"role": "assistant", "content": "The answer is 4.",
                                                     "reasoning_content": THOUGHT}
    korean = DistillConfig(language="ko")
    assert acceptance(traces, korean)[1]["rejected_by"]["language"] == 4


# ---------------------------------------------------------------- logit-level KL


def test_forward_kl_by_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[0.0, math.log(3.0)]])
    assert forward_kl(teacher, student).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # tau = 2 softens the student to (1, sqrt 3) / (1 + sqrt 3); the teacher stays uniform; then times tau^2.
    r = math.sqrt(3.0)
    by_hand = 0.5 * math.log(0.5 * (1 + r)) + 0.5 * math.log(0.5 * (1 + r) / r)
    assert forward_kl(teacher, student, temperature=2.0).item() == pytest.approx(4 * by_hand, rel=1e-6)
    # Rows add up.
    assert forward_kl(teacher.repeat(3, 1), student.repeat(3, 1)).item() == pytest.approx(1.5 * math.log(4 / 3))


def step_kl(objective: KLDistillObjective, student: Transformer, step: int = 0) -> float:
    with torch.no_grad():
        return sum(objective.loss(student, m)[0].item() for m in objective.prepare(step, student))


def test_kl_objective_zero_for_same_weights_and_equal_to_reference(tmp_path):
    tok = tiny_tokenizer()
    cfg = SFTConfig(data=str(sft_rows_file(tmp_path)), seq_len=128, batch_size=2, micro_batch=1)
    student = tiny_model(tok.vocab_size, seed=0)
    same = KLDistillObjective(student, copy.deepcopy(student), tok, cfg)
    assert step_kl(same, student) == 0.0

    tau = 2.0
    teacher = tiny_model(tok.vocab_size, seed=1)
    objective = KLDistillObjective(student, teacher, tok, cfg, temperature=tau)
    got = step_kl(objective, student)
    assert got > 0
    # Reference: full logits of both models and torch's categorical KL, at every trained position.
    total, count = 0.0, 0
    with torch.no_grad():
        for m in objective.prepare(0, student):
            args = dict(positions=m["positions"], mask=build_doc_mask(m["doc_ids"]))
            sel = m["targets"] != IGNORE
            p = torch.distributions.Categorical(logits=teacher(m["tokens"], **args)[sel] / tau)
            q = torch.distributions.Categorical(logits=student(m["tokens"], **args)[sel] / tau)
            total += torch.distributions.kl_divergence(p, q).sum().item() * tau**2
            count += int(sel.sum())
    assert count == m["num_items"]  # the step's global count, every micro-batch's normaliser
    assert got == pytest.approx(total / count, rel=1e-5)


def test_kl_training_lowers_the_kl(tmp_path):
    tok = tiny_tokenizer()
    cfg = SFTConfig(data=str(sft_rows_file(tmp_path)), seq_len=128, batch_size=2, micro_batch=2)
    student, teacher = tiny_model(tok.vocab_size, seed=0), tiny_model(tok.vocab_size, seed=1)
    objective = KLDistillObjective(student, teacher, tok, cfg)
    before = step_kl(objective, student)
    train = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=15, lr=1e-2, progress=False, plot_every=0,
                        keep_last=1)
    Trainer(student, train, objective, tokenizer=tok).run()
    after = step_kl(objective, student)
    assert after < 0.5 * before
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_a_student_with_another_vocabulary_is_refused(tmp_path):
    tok = tiny_tokenizer()
    teacher = tiny_model(tok.vocab_size, seed=0)
    with pytest.raises(ValueError, match=r"vocabularies differ: the teacher's head has \d+ logits.*mode='sft'"):
        check_shared_vocab(teacher, tok, tiny_model(tok.vocab_size + 8, seed=0), tok)
    other = tiny_tokenizer("Completely different words: zebra, quartz, jukebox, 한국어.")
    with pytest.raises(ValueError, match=r"vocabularies differ: .* id \d+ is .* for the teacher but .* student"):
        check_shared_vocab(teacher, tok, tiny_model(tok.vocab_size, seed=0), other)
    cfg = SFTConfig(data=str(sft_rows_file(tmp_path)), seq_len=128)
    with pytest.raises(ValueError, match="vocabularies differ"):
        KLDistillObjective(tiny_model(tok.vocab_size, seed=0), teacher, other, cfg, teacher_tokenizer=tok)


# ---------------------------------------------------------------- the whole stage


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory, default_tokenizer) -> Path:
    """An untrained tiny student on the think model's tokenizer."""
    from sputnik.checkpoint import save_model

    path = tmp_path_factory.mktemp("student")
    save_model(tiny_model(default_tokenizer.vocab_size, seed=3), path, tokenizer=default_tokenizer)
    return path


@pytest.mark.parametrize("mode", ["sft", "kl"])
def test_distill_end_to_end(tmp_path, think_model, student_folder, mode):
    cfg = DistillConfig(teacher=str(think_model), task=f"jsonl:{problems_file(tmp_path)}", n_problems=2,
                        samples_per_problem=2, temperature=0.0, max_tokens=40, suffix="", device="cpu")
    train = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, lr=1e-3, progress=False, plot_every=0,
                        keep_last=1)
    summary = distill(cfg, str(student_folder), SFTConfig(seq_len=128, batch_size=2, micro_batch=2), train,
                      mode=mode, progress=False)
    assert summary["mode"] == mode
    assert summary["acceptance"]["accepted"] == 2 and summary["acceptance"]["rejected_by"]["correct"] == 2
    assert summary["final_loss"] > 0 and math.isfinite(summary["final_loss"])
    out = Path(train.out_dir)
    assert json.loads((out / "summary.json").read_text())["final_loss"] == summary["final_loss"]
    assert len(load_chat_jsonl(out / "distill.jsonl")) == 2
    assert len((out / "traces.jsonl").read_text().splitlines()) == 4
    assert (out / "checkpoints" / "step_000002" / "config.json").is_file()


def test_distill_refuses_what_kl_cannot_do(tmp_path, think_model):
    train = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=1, progress=False)
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        distill(DistillConfig(teacher_url="http://127.0.0.1:9/v1"), "student", SFTConfig(), train, mode="kl")
    with pytest.raises(ValueError, match="exactly one teacher"):
        distill(DistillConfig(), "student", SFTConfig(), train)
    # A student on another tokenizer is refused before any trace is sampled.
    from sputnik.checkpoint import save_model

    tok = tiny_tokenizer()
    save_model(tiny_model(tok.vocab_size, seed=0), tmp_path / "other", tokenizer=tok)
    cfg = DistillConfig(teacher=str(think_model), task=f"jsonl:{problems_file(tmp_path)}", device="cpu")
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill(cfg, str(tmp_path / "other"), SFTConfig(), train, mode="kl")
    assert not (tmp_path / "run" / "traces.jsonl").exists()


DIST = """
import sys
sys.path.insert(0, {tests!r})
from test_distill import tiny_model, tiny_tokenizer
from sputnik.train.distill import KLDistillObjective
from sputnik.train.loop import TrainConfig, Trainer, finish_distributed
from sputnik.train.sft import SFTConfig
tok = tiny_tokenizer()
student, teacher = tiny_model(tok.vocab_size, seed=0), tiny_model(tok.vocab_size, seed=1)
objective = KLDistillObjective(student, teacher, tok, SFTConfig(data={data!r}, seq_len=64, batch_size=2, micro_batch=1))
Trainer(student, TrainConfig(out_dir={out!r}, max_steps=2, lr=1e-2, progress=False, plot_every=0, fsdp={fsdp}),
        objective).run()
finish_distributed()
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_kl_two_processes_equal_one(tmp_path, fsdp):
    """Logit-level distillation on 2 ranks (the student sharded under FSDP2, the teacher whole) equals one process."""
    import textwrap

    from torchrun import assert_two_equal_one, torchrun

    data = sft_rows_file(tmp_path)
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent(DIST.format(tests=str(Path(__file__).resolve().parent), data=str(data),
                                                  out=str(tmp_path / "two"), fsdp=fsdp)))
    torchrun(script)
    tok = tiny_tokenizer()
    student, teacher = tiny_model(tok.vocab_size, seed=0), tiny_model(tok.vocab_size, seed=1)
    objective = KLDistillObjective(student, teacher, tok, SFTConfig(data=str(data), seq_len=64, batch_size=2,
                                                                    micro_batch=1))
    Trainer(student, TrainConfig(out_dir=str(tmp_path / "one"), max_steps=2, lr=1e-2, progress=False, plot_every=0),
            objective).run()
    assert_two_equal_one(tmp_path / "two", tmp_path / "one", student)
