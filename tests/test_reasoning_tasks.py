"""Tasks where thinking pays: digit ranges, held-out harder problems, worked traces, opened and closed thinking."""

import pytest

from sputnik.eval.run import EvalConfig, prompt_ids, thinking
from sputnik.r1 import THINK_CLOSE, THINK_OPEN, direct_reply, graded_part, open_thinking, think_prompt
from sputnik.tasks import Problem, get_task
from sputnik.tasks.arithmetic import parse_digits
from sputnik.tasks.traces import arithmetic_trace


def test_digit_ranges_parse_and_bound():
    assert parse_digits(3) == (3, 3) and parse_digits("1-4") == (1, 4) and parse_digits(" 5-6 ") == (5, 6)
    for bad in ("0", "4-2", "1-19", "x", "1-"):
        with pytest.raises(ValueError, match="digits"):
            parse_digits(bad)
    with pytest.raises(ValueError, match="test_digits"):
        get_task("arithmetic:digits=1-4,test_digits=9-3")


def test_ranges_give_every_size_and_harder_disjoint_test_problems():
    task = get_task("arithmetic:digits=1-4,test_digits=5-6,ops=+-*")
    train, test = task.problems("train", 400), task.problems("test", 100)
    train_sizes = {len(str(p.meta[k])) for p in train for k in "ab"}
    test_sizes = {len(str(p.meta[k])) for p in test for k in "ab"}
    assert train_sizes == {1, 2, 3, 4} and test_sizes == {5, 6}
    assert {p.meta["op"] for p in train} == set("+-*")
    assert all(int(p.answer) >= 0 for p in train + test)


def test_overlapping_ranges_stay_disjoint():
    task = get_task("arithmetic:digits=1-4,test_digits=4")
    train, test = task.problems("train", 2000), task.problems("test", 200)
    assert {len(str(p.meta[k])) for p in test for k in "ab"} == {4}
    assert not {p.meta["key"] for p in train} & {p.meta["key"] for p in test}
    assert any(len(str(p.meta["a"])) == 4 for p in train)  # the hardest size is trained on too


def test_countdown_holds_out_more_numbers_in_english_and_korean():
    for name in ("countdown", "korean-countdown"):
        task = get_task(f"{name}:test_numbers=5-6")
        train, test = task.problems("train", 300), task.problems("test", 60)
        assert {len(p.meta["numbers"]) for p in train} == {3, 4}
        assert {len(p.meta["numbers"]) for p in test} == {5, 6}
        assert all(task.score(p, p.answer) == 1.0 for p in test)  # a solution exists and verifies
    overlap = get_task("countdown:min_numbers=3,max_numbers=5,test_numbers=4-6")
    train, test = overlap.problems("train", 400), overlap.problems("test", 100)
    assert not {overlap.key(p) for p in train} & {overlap.key(p) for p in test}
    assert {len(p.meta["numbers"]) for p in test} == {4, 5, 6}
    ko = get_task("korean-countdown")
    p = ko.problems("test", 1)[0]
    assert ko.language == "ko" and "숫자" in p.prompt and "<answer>" in ko.chat_suffix
    assert ko.key(p) == get_task("countdown").key(p)  # one partition: a Korean test set is never trained in English
    with pytest.raises(ValueError, match="test_numbers"):
        get_task("countdown:test_numbers=7")


@pytest.mark.parametrize("op", ["+", "-", "*"])
@pytest.mark.parametrize("language", ["en", "ko"])
def test_traces_reach_the_answer(op, language):
    task = get_task(("korean-arithmetic" if language == "ko" else "arithmetic") + f":digits=1-5,ops={op}")
    for p in task.problems("train", 60):
        reasoning, answer = task.trace(p)
        assert answer == f"\\boxed{{{p.answer}}}"
        assert reasoning.endswith(f"= {p.answer}.")
        # The trace's own result is graded right, and so is the answer after it.
        assert task.correct(p, f"{reasoning}\n{THINK_CLOSE}\n\n{answer}", think_opened=True)
        if language == "ko":
            assert "자리" in reasoning or op == "*"


@pytest.mark.parametrize("places", [False, True])
@pytest.mark.parametrize("language", ["en", "ko"])
def test_the_work_of_a_trace_is_read_back(language, places):
    name = "korean-arithmetic" if language == "ko" else "arithmetic"
    task = get_task(f"{name}:digits=1-4,ops=+-*,places={places}")
    for p in task.problems("train", 90):
        reasoning, _ = task.trace(p)
        assert task.worked_result(p, reasoning) == p.answer, reasoning
        assert task.worked_result(p, "I just know it.") is None
    # A real cold-start sample: right columns, then another number boxed -- the answer did not follow the work.
    p = Problem("arithmetic/665+916", "What is 916 + 665?", "1581", {"a": 916, "b": 665, "op": "+"})
    slip = ("916 + 665.\nOnes: 6 + 5 = 11, write 1, carry 1.\nTens: 1 + 6 + 1 = 8, write 8.\n"
            "Hundreds: 9 + 6 = 15, write 5, carry 1.\nWrite the carry 1.\nSo 936 + 665 = 1581.")
    assert get_task("arithmetic").worked_result(p, slip) == "1581"
    # A real r1 sample after GRPO: the last column's carry is left in its line, not written on one of its own.
    p = Problem("arithmetic/492+666", "What is 666 + 492?", "1158", {"a": 666, "b": 492, "op": "+"})
    terse = ("666 + 492.\nOnes: 6 + 2 = 8, write 8.\nTens: 6 + 9 = 15, write 5, carry 1.\n"
             "Hundreds: 6 + 4 + 1 = 11, write 1, carry 1.\nSo 666 + 492 = 1158.")
    assert get_task("arithmetic").worked_result(p, terse) == "1158"
    assert get_task("arithmetic").worked_result(p, terse.replace(", carry 1.\nSo", ".\nSo")) == "158"
    ko = get_task("korean-arithmetic")
    assert ko.worked_result(p, "일의 자리: 6 + 2 = 8, 8 적기.\n백의 자리: 6 + 4 + 1 = 11, 1 적기, 1 올림.") == "118"


def test_eval_says_whether_the_answer_follows_the_thinking():
    from types import SimpleNamespace

    from sputnik.eval.run import _record, summarize

    task = get_task("arithmetic:digits=2")
    p = task.problems("test", 1)[0]
    reasoning, answer = task.trace(p)
    wrong = str(int(p.answer) + 1)
    rows = []
    for text in (f"{reasoning}</think>{answer}", f"{reasoning}</think>\\boxed{{{wrong}}}", f"</think>{answer}",
                 f"{reasoning}"):
        done = SimpleNamespace(text=text, token_ids=[1] * 9, finish_reason="stop")
        rows.append({**_record(task, p, "greedy", 0, done, True), "id": f"{p.id}#{len(rows)}"})
    # follows / does not / no reasoning to read / no answer to compare
    assert [r["follows_reasoning"] for r in rows] == [True, False, None, None]
    assert summarize(rows[:2], 0).greedy_follows_reasoning == 0.5
    assert summarize(rows[2:], 0).greedy_follows_reasoning is None


def test_column_steps_say_carries_and_borrows():
    reasoning, _ = arithmetic_trace(58, "+", 67)
    assert "Ones: 8 + 7 = 15, write 5, carry 1." in reasoning and "Tens: 5 + 6 + 1 = 12" in reasoning
    assert "Write the carry 1." in reasoning
    reasoning, _ = arithmetic_trace(503, "-", 78, "ko")
    assert "일의 자리: 3 - 8 = -5, 1 빌림: 5, 5 적기." in reasoning
    reasoning, _ = arithmetic_trace(123, "*", 45)
    assert "123 × 4 = 492, × 10 = 4920." in reasoning and "615 + 4920 = 5535" in reasoning
    with pytest.raises(ValueError, match="traces"):
        arithmetic_trace(1, "+", 2, "fr")


def test_places_name_each_operands_digits_before_the_columns():
    reasoning, _ = arithmetic_trace(916, "+", 65, places=True)
    assert reasoning.splitlines()[:4] == ["916 + 65.", "916: Hundreds 9, Tens 1, Ones 6.",
                                          "65: Hundreds 0, Tens 6, Ones 5.", "Ones: 6 + 5 = 11, write 1, carry 1."]
    reasoning, _ = arithmetic_trace(503, "-", 78, "ko", places=True)
    assert reasoning.splitlines()[1:3] == ["503: 백 5, 십 0, 일 3.", "78: 백 0, 십 7, 일 8."]
    # Multiplication works digit by digit of the multiplier: nothing to name.
    assert arithmetic_trace(123, "*", 45, places=True) == arithmetic_trace(123, "*", 45)
    task = get_task("arithmetic:digits=3,places=true")
    p = task.problems("train", 1)[0]
    assert ": Hundreds " in task.trace(p)[0] and ": Hundreds " not in get_task("arithmetic:digits=3").trace(p)[0]


def test_tasks_without_traces_say_so():
    task = get_task("countdown")
    with pytest.raises(NotImplementedError, match="distill"):
        task.trace(task.problems("train", 1)[0])


def test_think_prompts_open_and_close():
    chatml = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert open_thinking(chatml) == chatml + THINK_OPEN + "\n"
    assert open_thinking("... User: What is 2 + 3. Assistant:").endswith("Assistant: <think>\n")
    r1 = "<｜Assistant｜><think>\n"
    assert think_prompt(r1, "open") == r1 and think_prompt(r1, "auto") == r1
    closed = think_prompt(chatml, "closed")
    assert closed.endswith(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n")
    assert closed + "\\boxed{5}" == chatml + direct_reply("\\boxed{5}")  # the direct arms' SFT rows
    assert think_prompt(chatml, "auto") == chatml
    with pytest.raises(ValueError, match="think"):
        think_prompt(chatml, "sometimes")


def test_eval_prompts_follow_the_think_mode(default_tokenizer):
    task = get_task("arithmetic")
    p = task.problems("test", 1)[0]
    opened_ids, opened = prompt_ids(task, p, default_tokenizer, EvalConfig(think="open", template="plain"))
    closed_ids, closed = prompt_ids(task, p, default_tokenizer, EvalConfig(think="closed", template="plain"))
    assert opened and not closed
    assert default_tokenizer.decode(opened_ids).endswith(THINK_OPEN + "\n")
    assert THINK_CLOSE in default_tokenizer.decode(closed_ids)
    # Opened: the answer must follow a closed thought (strict); closed: the completion is the answer.
    assert graded_part("So 5.", think_opened=opened) is None
    assert graded_part("\\boxed{5}", think_opened=closed) == "\\boxed{5}"


def test_thinking_is_the_reasoning_only():
    assert thinking("a b c</think>\n\n\\boxed{1}", think_opened=True) == "a b c"
    assert thinking("<think>x y</think> 1", think_opened=False) == "x y"
    assert thinking("\\boxed{1}", think_opened=False) == ""
    assert thinking("still thinking", think_opened=True) == "still thinking"


def test_a_mix_keeps_each_problems_task():
    mix = get_task("arithmetic:digits=1-3 + korean-arithmetic:digits=1-3")
    problems = mix.problems("test", 10)
    assert len(problems) == 10 and [mix.language_of(p) for p in problems[:4]] == ["en", "ko", "en", "ko"]
    en, ko = problems[0], problems[1]
    assert "boxed" in mix.render(en)[-1]["content"] and "최종 답" in mix.render(ko)[-1]["content"]
    for p in problems:
        reasoning, answer = mix.trace(p)
        assert mix.correct(p, f"{reasoning}</think>{answer}", think_opened=True)
        assert not mix.correct(p, f"{reasoning}", think_opened=True)  # never closed: no answer
    assert ("자리" in mix.trace(ko)[0]) and ("자리" not in mix.trace(en)[0])
    train_ids = {p.id for p in mix.problems("train", 400)}
    assert not train_ids & {p.id for p in mix.problems("test", 100)}
    with pytest.raises(ValueError, match="unknown task"):
        get_task("arithmetic + nope")


def test_korean_reasoning_is_scored_for_language(default_tokenizer):
    from types import SimpleNamespace

    from sputnik.eval.run import _record

    mix = get_task("arithmetic + korean-arithmetic")
    en, ko = mix.problems("test", 2)
    reasoning, answer = mix.trace(ko)
    done = SimpleNamespace(text=f"{reasoning}</think>{answer}", token_ids=[1] * 30, finish_reason="stop")
    r = _record(mix, ko, "greedy", 0, done, True, "strict", default_tokenizer)
    assert r["correct"] and r["language"] > 0.9 and r["think_tokens"] > 10
    english = SimpleNamespace(text=f"{mix.trace(en)[0]}</think>{answer}", token_ids=[1] * 30, finish_reason="stop")
    assert _record(mix, ko, "greedy", 0, english, True, "strict", default_tokenizer)["language"] < 0.1


def think_tokenizer():
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from sputnik.tokenizer import Tokenizer

    pieces = ["<eos>", "<unk>", THINK_OPEN, THINK_CLOSE, *"0123456789abcdefghijx ?\n"]
    backend = Backend(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("</think>|<think>|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token="<eos>", pad_token="<eos>")


def test_a_recipe_reports_thinking_closed_and_direct(tmp_path):
    import json

    import torch

    from sputnik.checkpoint import save_model
    from sputnik.cli import main
    from sputnik.config import ModelConfig
    from sputnik.model import Transformer
    from sputnik.train.reasoning import FIELDS

    tok = think_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, inter_dim=64, max_seq_len=64))
    save_model(model, tmp_path / "tiny", tok)
    data = tmp_path / "threes.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}{b}?", "answer": "3"}) + "\n" for a in "abcde" for b in "abcde"))
    report = tmp_path / "reasoning.json"
    report.write_text(json.dumps({"nano-r1": {"kept": True}}))
    out = tmp_path / "run"
    assert main(["recipe", "--model", str(tmp_path / "tiny"), "--recipe", "toy", "--task", f"jsonl:{data}",
                 "--template", "plain", "--think", "open", "--rewards", "{accuracy: 1, format: 1}",
                 "--korean-task", "korean-arithmetic", "--english-task", "arithmetic", "--prompts-per-step", "2",
                 "--num-generations", "4",
                 "--max-completion-length", "4", "--direct-max-tokens", "2", "--eval-n", "4", "--max-steps", "2",
                 "--out-dir", str(out), "--report", str(report), "--no-progress"]) == 0
    entry = json.loads((out / "reasoning.json").read_text())["toy"]
    assert set(entry) == set(FIELDS)
    for key in ("format_rate", "accuracy_think", "accuracy_direct", "accuracy_closed", "accuracy_start",
                "accuracy_ko", "accuracy_en", "language_consistency_ko"):
        assert 0 <= entry[key] <= 1, key
    assert entry["eval_problems"] == 4 and entry["machine"] and entry["command"].startswith("sputnik ")
    merged = json.loads(report.read_text())
    assert merged["toy"] == entry and merged["nano-r1"] == {"kept": True}  # other recipes' entries stay
    # The control was trained with its thinking closed, on accuracy alone; the thinking run logged its thinking.
    direct_rows = [json.loads(x) for x in (out / "direct" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("think_tokens", 0) == 0 for r in direct_rows if "reward" in r)
    assert "rewards/format" not in direct_rows[-1]
    # Both controls answer within the direct-answer budget, so neither can write a worked solution after the thought
    assert all(r["completion_length"] <= 2 for r in direct_rows if "completion_length" in r)
    assert json.loads((out / "eval-closed" / "stage.json").read_text())["config"]["max_tokens"] == 2
    assert (out / "think" / "checkpoints").is_dir() and (out / "eval-closed" / "summary.json").is_file()
    english = json.loads((out / "eval-en" / "summary.json").read_text())  # the English twin of eval-ko
    assert english["task"] == "arithmetic" and english["greedy_accuracy"] == entry["accuracy_en"]
    # every evaluation of the run keeps its samples beside its figures: before, and after the last step
    for step in ("step_000000", "step_000002"):
        samples = (out / "think" / "eval" / step / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 4 and json.loads(samples[0])["kind"] == "greedy"


def test_traces_make_chat_rows(tmp_path):
    import json

    from sputnik.train.reasoning import write_traces

    path = write_traces("arithmetic:digits=2 + korean-arithmetic:digits=2", 6, tmp_path / "t.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6
    user, reply = rows[1]["messages"]
    assert "최종 답" in user["content"] and "자리" in reply["reasoning_content"]
    assert reply["content"].startswith("\\boxed{")


def test_direct_answer_traces_are_what_the_direct_control_sees(tmp_path, default_tokenizer):
    # The control's cold start answers the same problems after an empty thought, laid out as its closed prompts are.
    # Token for token but the last: a closed prompt ends in "\n\n", one token at the end of a text, two before the
    # answer's "\\boxed" (SmolLM2's pre-tokenizer), as the thinking model's own SFT rows have it after </think>.
    import json

    from sputnik.train.reasoning import write_traces
    from sputnik.train.sft import tokenize_chat

    tok, spec = default_tokenizer, "arithmetic:digits=3 + korean-arithmetic:digits=3"
    path = write_traces(spec, 4, tmp_path / "d.jsonl", direct=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    task = get_task(spec)
    for row, p in zip(rows, task.problems("train", 4, seed=0)):
        assert "reasoning_content" not in row["messages"][1]
        ids, mask = tokenize_chat(tok, row["messages"])
        prompt, _ = prompt_ids(task, p, tok, EvalConfig(task=spec, think="closed"))
        assert ids[: len(prompt) - 1] == prompt[:-1] and tok.decode(prompt[-1:]) == "\n\n"
        assert tok.decode(ids[len(prompt) - 1: len(prompt) + 1]) == "\n\n"
        reply = tok.decode(ids[len(prompt) + 1:], skip_special_tokens=True)
        assert reply.startswith(f"\\boxed{{{p.answer}}}") and THINK_OPEN not in reply
        assert any(mask[len(prompt):]) and task.score(p, reply) == 1.0


def test_after_a_cold_start_the_control_has_its_direct_answer_twin(tmp_path, default_tokenizer, capsys):
    # R1's cold start and its control: the thinking run starts from SFT on traces, the direct-answer run from SFT on
    # the same problems answered directly (same steps), and a rerun reuses both.
    import json

    import torch

    from sputnik.checkpoint import save_model
    from sputnik.cli import main
    from sputnik.config import ModelConfig
    from sputnik.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=default_tokenizer.vocab_size, dim=32, n_layers=2,
                                    n_heads=4, n_kv_heads=2, inter_dim=64, max_seq_len=512))
    save_model(model, tmp_path / "tiny", default_tokenizer)
    out = tmp_path / "run"
    argv = ["recipe", "--model", str(tmp_path / "tiny"), "--recipe", "toy-r1", "--task", "arithmetic:digits=1-2",
            "--cold-start", "6", "--sft-steps", "2", "--sft-batch-size", "3", "--prompts-per-step", "2",
            "--num-generations", "2", "--max-completion-length", "8", "--direct-max-tokens", "4", "--eval-n", "2",
            "--max-steps", "1", "--out-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    think_rows = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    direct_rows = [json.loads(x) for x in (out / "sft-direct" / "traces.jsonl").read_text().splitlines()]
    assert [r["messages"][0] for r in think_rows] == [r["messages"][0] for r in direct_rows]  # the same problems
    assert all(r["messages"][1]["content"] == direct_reply(t["messages"][1]["content"])
               for r, t in zip(direct_rows, think_rows))
    for arm, sft in (("think", "sft"), ("direct", "sft-direct")):
        assert json.loads((out / arm / "summary.json").read_text())["model"] == str(out / sft / "checkpoints" /
                                                                                     "step_000002")
    capsys.readouterr()
    last = [out / arm / "eval" / "step_000001" / "samples.jsonl" for arm in ("think", "direct")]
    stamps = [f.stat().st_mtime_ns for f in last]
    assert main(argv) == 0
    assert capsys.readouterr().out.count("cold start: reusing") == 2
    assert [f.stat().st_mtime_ns for f in last] == stamps  # finished runs read their last evaluation back
