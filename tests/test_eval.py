"""Evaluation: pass@1, pass@k and cons@k by hand on fixed samples; an end-to-end `sputnik eval` of the default model."""

import json

import pytest

from sputnik.cli import main
from sputnik.eval import majority_vote, pass_at_k, summarize


def rec(pid, kind, i, extracted, correct, fmt=0.0, length=10, finish="stop"):
    score = None if correct is None else float(correct)
    return {"id": pid, "kind": kind, "sample": i, "completion": "", "extracted": extracted, "gold": "",
            "score": score, "correct": correct, "format": fmt, "length": length, "finish_reason": finish}


RECORDS = [
    # p1: greedy right; samples 1 of 4 right, the majority ("7") wrong -> cons wrong.
    rec("p1", "greedy", 0, "5", True),
    rec("p1", "sample", 0, "7", False, 1.0), rec("p1", "sample", 1, "7", False),
    rec("p1", "sample", 2, "5", True, 1.0, 30), rec("p1", "sample", 3, None, False, 0.0, 50, "length"),
    # p2: greedy wrong; samples 3 of 4 right -> cons right.
    rec("p2", "greedy", 0, "1", False),
    rec("p2", "sample", 0, "9", True), rec("p2", "sample", 1, "9", True),
    rec("p2", "sample", 2, "9", True), rec("p2", "sample", 3, "8", False),
    # p3: the gold answer cannot be verified: skipped entirely.
    rec("p3", "greedy", 0, "2", None), rec("p3", "sample", 0, "2", None),
]


def test_summary_by_hand():
    s = summarize(RECORDS, k=4).to_json()
    assert s["problems"] == 2 and s["skipped"] == 1
    assert s["greedy_accuracy"] == 0.5
    assert s["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert s["pass@4"] == 1.0
    assert s["cons@4"] == 0.5
    assert s["format_rate"] == pytest.approx(2 / 8)
    assert s["mean_length"] == pytest.approx((10 * 6 + 30 + 50) / 8)
    assert s["truncated_rate"] == pytest.approx(1 / 8)
    # pass@j unbiased: p1 has c=1 of 4 -> pass@2 = 1 - C(3,2)/C(4,2) = 0.5; p2 c=3 -> 1.
    assert s["curve"]["pass"][1] == pytest.approx((0.5 + 1.0) / 2)
    # cons@1 is the first sample's correctness: p1 wrong, p2 right.
    assert s["curve"]["cons"][0] == 0.5


def test_pass_at_k_and_majority_vote():
    assert pass_at_k(4, 0, 1) == 0 and pass_at_k(4, 4, 1) == 1
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # a tie goes to the answer seen first
    assert majority_vote([None, None]) is None
    assert majority_vote([None, "2", "1", "1"]) == "1"


def test_sputnik_eval_end_to_end(tmp_path, capsys, default_gguf):
    out = tmp_path / "run"
    code = main(["eval", str(default_gguf), "--task", "arithmetic", "--n", "8", "--k", "2", "--max-tokens", "48",
                 "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| greedy accuracy |" in table and "| pass@1 |" in table and "| cons@2 |" in table
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "greedy" for r in rows) == 8 and sum(r["kind"] == "sample" for r in rows) == 16
    assert len({r["id"] for r in rows}) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 8 and summary["k"] == 2
    # The summary is exactly what the per-sample file says.
    greedy = [r for r in rows if r["kind"] == "greedy"]
    assert summary["greedy_accuracy"] == sum(r["correct"] for r in greedy) / 8
    assert summary["pass@1"] == pytest.approx(sum(r["correct"] for r in rows if r["kind"] == "sample") / 16)
    assert all(r["length"] <= 48 for r in rows)
    assert (out / "summary.md").read_text().startswith("# arithmetic")
    assert (out / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Side by side.
    assert main(["eval", "--compare", str(out), str(out / "summary.json")]) == 0
    compare = capsys.readouterr().out
    assert compare.count("| greedy accuracy |") == 1 and str(out) in compare


def test_records_grade_strictly_and_report_lenient_and_format_gated_beside():
    from types import SimpleNamespace

    from sputnik.eval.run import _record
    from sputnik.tasks import Problem, get_task

    task = get_task("arithmetic")
    problem = Problem(id="x", prompt="What is 47 + 38?", answer="85", meta={"a": 47, "b": 38, "op": "+"})
    texts = ["7 + 8 = 15, so 85.\n</think>\n\n\\boxed{85}",  # right, in format
             "7 + 8 = 15, so 85. The answer is",  # the thought never closed
             "\\boxed{85}"]  # right, but no thinking block although the prompt opened one
    records = [_record(task, problem, "greedy", 0, SimpleNamespace(text=t, token_ids=[1] * 5, finish_reason="stop"),
                       think_opened=True) for t in texts]
    assert [r["correct"] for r in records] == [True, False, False]
    assert [r["correct_lenient"] for r in records] == [True, True, True]
    assert [r["correct_format_gated"] for r in records] == [True, False, False]
    for r, pid in zip(records, "abc"):
        r["id"] = pid
    s = summarize(records, k=0)
    assert s.greedy_accuracy == pytest.approx(1 / 3) and s.greedy_accuracy_lenient == 1.0
    assert s.greedy_accuracy_format_gated == pytest.approx(1 / 3)
    assert s.to_json()["greedy_accuracy_lenient"] == 1.0
