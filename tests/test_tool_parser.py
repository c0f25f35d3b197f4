"""Tool-call parsers per family: whole outputs, and the same outputs cut into pieces at every position, assembled the
way the openai client assembles `delta.tool_calls`."""

import json

import pytest

from sputnik.tools import parser as tp
from sputnik.tools.parser import HermesWriter, make_parser

WEATHER = {"city": "Paris", "unit": "celsius", "note": "a \"quoted\" } and </tool_call> inside"}
SEARCH = {"q": "sputnik", "tags": [1, [2, {"x": None}]]}


def hermes(name, args, spacing="\n"):
    return f"<tool_call>{spacing}{json.dumps({'name': name, 'arguments': args})}{spacing}</tool_call>"


CASES = {
    "hermes": (f"Let me check.{hermes('get_weather', WEATHER)}\n{hermes('search', SEARCH, '')}",
               "Let me check.\n"),
    "llama3": ((f"<|python_tag|>{json.dumps({'name': 'get_weather', 'parameters': WEATHER})}; "
                f"{json.dumps({'name': 'search', 'parameters': SEARCH})}"), ""),
    "deepseek": ("Checking." + tp.DS_CALLS_BEGIN
                 + tp.DS_CALL_BEGIN + "function" + tp.DS_SEP + "get_weather\n```json\n" + json.dumps(WEATHER)
                 + "\n```" + tp.DS_CALL_END
                 + tp.DS_CALL_BEGIN + "search" + tp.DS_SEP + json.dumps(SEARCH) + tp.DS_CALL_END  # V3.1's form
                 + tp.DS_CALLS_END, "Checking."),
}


def assemble(parser, pieces):
    """Content and calls as the openai client builds them from the stream's deltas."""
    content, calls, firsts = "", {}, []
    for i, piece in enumerate(pieces):
        text, deltas = parser.push(piece)
        if i == len(pieces) - 1:
            t2, d2 = parser.finish()
            text, deltas = text + t2, deltas + d2
        content += text
        for d in deltas:
            if d["index"] not in calls:
                assert d["id"].startswith("call_") and d["type"] == "function" and d["function"]["name"]
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": d["function"]["arguments"]}
                firsts.append(d["index"])
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}  # name only once
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert firsts == sorted(firsts)
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_whole_output(family):
    text, content = CASES[family]
    got_content, calls = assemble(make_parser(family), [text])
    assert got_content == content
    assert [c["name"] for c in calls] == ["get_weather", "search"]
    assert [json.loads(c["arguments"]) for c in calls] == [WEATHER, SEARCH]


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_split_at_every_position_gives_the_same_calls(family):
    text, _ = CASES[family]
    whole = assemble(make_parser(family), [text])
    for cut in range(1, len(text)):
        assert assemble(make_parser(family), [text[:cut], text[cut:]]) == whole, cut
    # and one character at a time: arguments stream in many pieces, markers never leak into the content
    parser = make_parser(family)
    pieces = [parser.push(ch) for ch in text]
    assert sum(len(d) for _, d in pieces) > 20
    assert assemble(make_parser(family), list(text)) == whole


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_parallel_off_keeps_the_first_call(family):
    text, _ = CASES[family]
    parser = make_parser(family, parallel=False)
    _, calls = assemble(parser, [text[: len(text) // 2], text[len(text) // 2:]])
    assert [c["name"] for c in calls] == ["get_weather"]
    assert [c["function"]["name"] for c in parser.tool_calls()] == ["get_weather"]


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_plain_text_is_content(family):
    text = "No tools needed: 2 < 3 and {braces} are fine."
    if family == "llama3":
        text = "Sure. " + text  # Llama 3 reads an output that opens with `{` as a call
    assert assemble(make_parser(family), [text[:7], text[7:]]) == (text, [])


def test_hermes_text_that_only_looks_like_a_marker_is_released_at_the_end():
    parser = make_parser("hermes")
    assert parser.push("a <tool_") == ("a ", [])
    assert parser.finish() == ("<tool_", [])


def test_arguments_given_as_a_json_string():
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    _, calls = assemble(make_parser("hermes"), [text])
    assert calls == [{"name": "f", "arguments": '{"a": 1}'}]


def test_truncated_call_keeps_what_was_written():
    parser = make_parser("hermes")
    content, calls = assemble(parser, ['<tool_call>\n{"name": "f", "arguments": {"a": [1, 2'])
    assert content == "" and calls == [{"name": "f", "arguments": '{"a": [1, 2'}]


def test_upstream_deltas_round_trip_through_hermes_text():
    deltas = [{"index": 0, "id": "x", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
              {"index": 0, "function": {"arguments": json.dumps(WEATHER)[:9]}},
              {"index": 0, "function": {"arguments": json.dumps(WEATHER)[9:]}},
              {"index": 1, "id": "y", "type": "function", "function": {"name": "search",
                                                                        "arguments": json.dumps(SEARCH)}}]
    writer = HermesWriter()
    text = "".join(writer.push([d]) for d in deltas) + writer.close()
    _, calls = assemble(make_parser("hermes"), [text])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", WEATHER), ("search", SEARCH)]
