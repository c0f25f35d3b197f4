"""sputnik.r1 (R1's text format), sputnik.seeds, the SSE framing and the metrics.jsonl reader."""

import json

from sputnik import r1
from sputnik.r1 import ReasoningSplitter, answer_part, held_back, join_deltas, opens_thinking, strip_reasoning
from sputnik.seeds import mix
from sputnik.serve import sse
from sputnik.tokenizer import render_chat_template
from sputnik.train.plots import read_metrics, read_rows


def test_generation_prompt_opens_thinking_and_can_close_it():
    prompt = render_chat_template(r1.CHAT_TEMPLATE, [{"role": "user", "content": "hi"}])
    assert prompt == r1.BOS + r1.USER + "hi" + r1.ASSISTANT + r1.THINK_OPEN + "\n"
    assert opens_thinking(prompt) and not opens_thinking(prompt[: -len(r1.THINK_OPEN) - 1])
    closed = r1.close_thinking(prompt)
    assert closed == prompt + "\n</think>\n\n" and not opens_thinking(closed)


def test_answer_part_is_what_follows_the_last_close_tag():
    assert answer_part("<think>a</think> b </think> c") == " c"
    assert answer_part("<think>\nnever closed") is None
    assert answer_part("no tags") is None
    assert answer_part("r</think>") == ""


def test_strip_reasoning_matches_the_chat_template():
    # The template drops an earlier turn's reasoning exactly as strip_reasoning does.
    for content in ["<think>\nr\n</think>\n\n4", "r</think>  6", "plain answer", "a</think>b</think>\n c"]:
        rendered = render_chat_template(r1.CHAT_TEMPLATE, [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": content},
                                                           {"role": "user", "content": "next"}], False)
        assert rendered == r1.BOS + r1.USER + "q" + r1.ASSISTANT + strip_reasoning(content) + r1.EOS + r1.USER + "next"
    assert strip_reasoning("x</think>\n\n y") == "y" and strip_reasoning(" kept ") == " kept "


def test_held_back_is_the_longest_tail_that_could_grow_into_a_marker():
    assert held_back("abc</th", ["</think>"]) == 4
    assert held_back("abc<", ["</think>", "<stop>"]) == 1
    assert held_back("abc<st", ["</think>", "<stop>"]) == 3
    assert held_back("abc", ["</think>"]) == 0
    assert held_back("</think>", ["</think>"]) == 0  # a whole marker is found, not held
    assert held_back("", ["x"]) == 0


def test_join_deltas_undoes_the_splitter():
    deltas = [("Let me ", ""), ("think.", ""), ("", "It is "), ("", "4.")]
    raw, inside = "", False
    for reasoning, content in deltas:
        out, inside = join_deltas(reasoning, content, inside)
        raw += out
    assert raw == "<think>Let me think.</think>It is 4."
    splitter = ReasoningSplitter()
    got = [splitter.push(raw), splitter.finish()]
    assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == ("Let me think.", "It is 4.")
    assert join_deltas("", "plain", False) == ("plain", False)


def test_seed_mix_spreads_the_seed_and_bounds_it():
    assert mix(3, 2 * 8191, 1, bits=62) == (3 * 1_000_003 + 2 * 8191 + 1) % 2**62
    assert mix(-1, 5, bits=31) == (-1 * 1_000_003 + 5) % 2**31 and 0 <= mix(-1, 5, bits=31) < 2**31
    assert mix(2**40, 7) == 2**40 * 1_000_003 + 7  # unbounded when no bits are asked for
    assert mix(0, 1) != mix(1, 0)


def test_sse_framing():
    assert sse.event({"text": "한국어"}) == 'data: {"text": "한국어"}\n\n'.encode()
    assert sse.DONE == b"data: [DONE]\n\n" and sse.KEEP_ALIVE.startswith(b":")
    assert sse.event_data('data: {"a": 1}') == '{"a": 1}' and sse.event_data("data: [DONE]") == "[DONE]"
    assert sse.event_data(": keep-alive") is None and sse.event_data("") is None


def test_read_rows_skips_blank_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_rows(path) == []
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n\n" + json.dumps({"step": 2, "loss": 1.5, "ok": True})
                    + '\n{"step": 3, "lo')
    assert read_rows(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "ok": True}]
    assert read_metrics(path) == {"loss": ([1, 2], [2.0, 1.5])}


def test_format_modules_use_only_the_standard_library():
    import ast
    import sys
    from pathlib import Path

    import sputnik.seeds

    for module in (r1, sputnik.seeds, sse):
        tree = ast.parse(Path(module.__file__).read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert all(name.split(".")[0] in sys.stdlib_module_names | {"__future__"} for name in names), names
