"""The server's pieces without a server: request validation, limits, prompts, reasoning splitting, keys, rate limits."""

import hashlib
import random
import sqlite3
import threading
from contextlib import closing

import pytest

from sputnik.engine.sampling import SamplingParams
from sputnik.serve.keys import KeyRecord, KeyStore, RateLimiter
from sputnik.serve.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, Limits,
                                    parse_request, prompt_messages, sampling_params)
from sputnik.r1 import ReasoningSplitter

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"messages": USER, **fields})


def rejected(model_cls, body) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(model_cls, body)
    assert info.value.status == 400
    return info.value


# --- request validation ---------------------------------------------------------------------------------------------

def test_chat_request_defaults_and_extras_ignored():
    req = parse_request(ChatCompletionRequest, {"model": "m", "messages": USER, "frobnicate": 3, "tools": []})
    assert req.model == "m" and req.temperature == 1.0 and req.top_p == 1.0 and req.top_k == 0 and req.n == 1
    assert req.stream is False and req.logprobs is False and req.max_tokens is None and req.stop is None
    assert not hasattr(req, "frobnicate")
    assert req.messages[0].role == "user" and req.messages[0].text() == "hi"


@pytest.mark.parametrize("field, value, param, words", [
    ("temperature", 2.5, "temperature", "less than or equal to 2"),
    ("temperature", -0.1, "temperature", "greater than or equal to 0"),
    ("temperature", "hot", "temperature", "valid number"),
    ("top_p", 0, "top_p", "greater than 0"),
    ("top_p", 1.5, "top_p", "less than or equal to 1"),
    ("top_k", -2, "top_k", "greater than or equal to -1"),
    ("min_p", 1.5, "min_p", "less than or equal to 1"),
    ("max_tokens", 0, "max_tokens", "greater than or equal to 1"),
    ("max_completion_tokens", 0, "max_completion_tokens", "greater than or equal to 1"),
    ("n", 0, "n", "greater than or equal to 1"),
    ("presence_penalty", 2.5, "presence_penalty", "less than or equal to 2"),
    ("frequency_penalty", -3, "frequency_penalty", "greater than or equal to -2"),
    ("repetition_penalty", 0, "repetition_penalty", "greater than 0"),
    ("seed", 1.5, "seed", "valid integer"),
    ("stop", [f"s{i}" for i in range(17)], "stop", "at most 16"),
    ("stop", ["a", ""], "stop[1]", "at least 1 character"),
    ("stop", "", "stop[0]", "at least 1 character"),
    ("stop", 5, "stop", "string or a list of strings"),
    ("top_logprobs", 3, "top_logprobs", "only allowed when logprobs is true"),
    ("stream_options", {"include_usage": True}, "stream_options", "only allowed when stream is true"),
    ("response_format", {"type": "xml"}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
])
def test_chat_validation_errors_name_the_parameter(field, value, param, words):
    err = rejected(ChatCompletionRequest, {"messages": USER, field: value})
    assert err.param == param
    assert err.message.startswith(f"{param}: ") and words in err.message
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": param,
                                    "code": None}}


def test_exact_message_for_a_range_error():
    err = rejected(ChatCompletionRequest, {"messages": USER, "temperature": 3})
    assert err.message == "temperature: Input should be less than or equal to 2"


def test_nan_and_infinity_are_rejected():
    # Python's json module decodes NaN and Infinity; a one-sided range such as repetition_penalty > 0 lets inf in.
    for field, value in [("temperature", float("nan")), ("top_p", float("inf")), ("repetition_penalty", float("inf")),
                         ("repetition_penalty", float("nan"))]:
        err = rejected(ChatCompletionRequest, {"messages": USER, field: value})
        assert err.message == f"{field}: Input should be a finite number"


def test_valid_edge_values_pass():
    req = chat(temperature=0, top_p=1, top_k=-1, min_p=1, stop="x", presence_penalty=-2, frequency_penalty=2,
               logprobs=True, top_logprobs=20, stream=True, stream_options={"include_usage": True},
               response_format={"type": "json_object"}, seed=-5, max_completion_tokens=7)
    assert req.stop == ["x"] and req.top_logprobs == 20 and req.stream_options.include_usage is True
    assert req.response_format.type == "json_object"
    assert chat(stop=[f"s{i}" for i in range(16)]).stop == [f"s{i}" for i in range(16)]  # DeepSeek's limit
    assert chat(top_logprobs=None).top_logprobs is None
    assert chat(stream_options=None).stream_options is None


def test_top_logprobs_range():
    assert rejected(ChatCompletionRequest, {"messages": USER, "logprobs": True, "top_logprobs": 21}).param == \
        "top_logprobs"


@pytest.mark.parametrize("messages, param, words", [
    ([], "messages", "at least 1 item"),
    ("hi", "messages", "valid list"),
    ([{"role": "bot", "content": "x"}], "messages[0].role", "'developer'"),
    ([{"content": "x"}], "messages[0].role", "Field required"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": 5}], "messages[1].content", "valid string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0].type",
     "'text'"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}], "messages[0].content[1].text",
     "Field required"),
])
def test_message_errors_name_the_nested_parameter(messages, param, words):
    err = rejected(ChatCompletionRequest, {"messages": messages})
    assert err.param == param and words in err.message
    # union members' names ("str", "list[TextPart]") are no part of a path a client reads
    assert "list[" not in err.param and ".str" not in err.param


def test_missing_messages_and_non_object_bodies():
    assert rejected(ChatCompletionRequest, {"model": "m"}).param == "messages"
    for body in ([USER], "hello", None, 3):
        err = rejected(ChatCompletionRequest, body)
        assert err.message == "request body must be a JSON object" and err.param is None


def test_message_text_and_extra_fields():
    m = ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}], "extra": 1})
    assert m.text() == "ab"
    assert ChatMessage(role="assistant", content=None).text() == ""
    m = ChatMessage.model_validate({"role": "assistant", "content": "x", "reasoning_content": "r", "name": "bot"})
    assert m.reasoning_content == "r" and m.name == "bot"


def test_completion_request():
    req = parse_request(CompletionRequest, {"prompt": "Once upon", "logprobs": 2, "echo": True})
    assert req.max_tokens == 16 and req.logprobs == 2 and req.echo is True and req.prompt == "Once upon"
    assert parse_request(CompletionRequest, {"prompt": ["a", "b"]}).prompt == ["a", "b"]
    assert rejected(CompletionRequest, {"prompt": "x", "logprobs": 6}).param == "logprobs"
    assert rejected(CompletionRequest, {"prompt": "x", "logprobs": -1}).param == "logprobs"
    assert rejected(CompletionRequest, {"prompt": "x", "temperature": 9}).param == "temperature"
    assert rejected(CompletionRequest, {"prompt": "x", "stream_options": {}}).param == "stream_options"
    assert rejected(CompletionRequest, {}).param == "prompt"
    assert rejected(CompletionRequest, {"prompt": ""}).param == "prompt"
    assert rejected(CompletionRequest, {"prompt": []}).param == "prompt"
    assert rejected(CompletionRequest, {"prompt": ["a", ""]}).param == "prompt[1]"
    assert rejected(CompletionRequest, {"prompt": 5}).param == "prompt"


# --- limits and engine parameters -----------------------------------------------------------------------------------

def test_sampling_params_carry_every_field():
    req = chat(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
               frequency_penalty=-0.5, n=3, seed=42, stop=["END", "###"], max_tokens=100)
    p = sampling_params(req, Limits(), prompt_tokens=10, context=4096)
    assert isinstance(p, SamplingParams)
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (100, 0.7, 40, 0.9, 0.05)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.1, 0.5, -0.5)
    assert (p.n, p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (3, 42, ["END", "###"], [], False)


def test_top_k_minus_one_means_off():
    assert sampling_params(chat(top_k=-1), Limits(), 10, 4096).top_k == 0
    assert sampling_params(chat(top_k=5), Limits(), 10, 4096).top_k == 5


def test_effective_max_tokens():
    limits = Limits(default_max_tokens=300)
    assert sampling_params(chat(), limits, 10, 4096).max_tokens == 300
    assert sampling_params(chat(max_tokens=50), limits, 10, 4096).max_tokens == 50
    assert sampling_params(chat(max_tokens=50, max_completion_tokens=70), limits, 10, 4096).max_tokens == 70
    # clipped to what the context has left, not refused
    assert sampling_params(chat(max_tokens=1000), limits, 4000, 4096).max_tokens == 96
    assert sampling_params(chat(), limits, 4095, 4096).max_tokens == 1
    completion = parse_request(CompletionRequest, {"prompt": "x"})
    assert sampling_params(completion, limits, 10, 4096).max_tokens == 16


def test_limits_refuse_with_400():
    limits = Limits(max_prompt_tokens=1000, max_tokens=500, max_n=4)
    with pytest.raises(APIError) as info:
        sampling_params(chat(n=5), limits, 10, 4096)
    assert info.value.status == 400 and info.value.param == "n"
    assert sampling_params(chat(n=4), limits, 10, 4096).n == 4

    with pytest.raises(APIError) as info:
        sampling_params(chat(max_tokens=501), limits, 10, 4096)
    assert info.value.status == 400 and info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:
        sampling_params(chat(max_completion_tokens=501), limits, 10, 4096)
    assert info.value.param == "max_completion_tokens"
    assert sampling_params(chat(max_tokens=500), limits, 10, 4096).max_tokens == 500

    with pytest.raises(APIError) as info:
        sampling_params(chat(), limits, 1001, 4096)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert info.value.param == "messages" and "1001" in info.value.message
    assert sampling_params(chat(), limits, 1000, 4096).max_tokens == 500


def test_prompt_at_or_over_the_context():
    for prompt_tokens in (2048, 3000):
        with pytest.raises(APIError) as info:
            sampling_params(chat(), Limits(), prompt_tokens, 2048)
        err = info.value
        assert err.status == 400 and err.code == "context_length_exceeded"
        assert err.message == f"prompt has {prompt_tokens} tokens; this model's context is 2048"
        assert err.body()["error"]["code"] == "context_length_exceeded"
    completion = parse_request(CompletionRequest, {"prompt": "x"})
    with pytest.raises(APIError) as info:
        sampling_params(completion, Limits(), 2048, 2048)
    assert info.value.param == "prompt"


# --- prompts --------------------------------------------------------------------------------------------------------

def test_prompt_messages_leave_earlier_reasoning_out():
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "1+1?"}]},
        {"role": "assistant", "content": "2", "reasoning_content": "one plus one is two"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\ntwo and two\n</think>\n\n4", "reasoning": "more"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "three and three\n</think>\n\n6"},  # R1's output after a forced <think>
        {"role": "tool", "content": "ok"},
    ]]
    assert prompt_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "tool", "content": "ok"},
    ]


def test_prompt_messages_keep_think_tags_outside_assistant_turns():
    messages = [ChatMessage(role="user", content="what does <think>x</think> mean?"),
                ChatMessage(role="assistant", content=None)]
    assert prompt_messages(messages) == [{"role": "user", "content": "what does <think>x</think> mean?"},
                                         {"role": "assistant", "content": ""}]


# --- reasoning ------------------------------------------------------------------------------------------------------

SAMPLES = [
    # (output, in_reasoning, reasoning, content)
    ("<think>\nLet me add.\n1+1=2\n</think>\n\nThe answer is 2.", False, "Let me add.\n1+1=2\n", "The answer is 2."),
    ("  \n<think>r</think>c", False, "r", "c"),
    ("<think></think>\n\nanswer", False, "", "answer"),
    ("Let me add.\n</think>\n\nIt is 2.", True, "Let me add.\n", "It is 2."),
    ("\nstill thinking, cut off </th", True, "still thinking, cut off </th", ""),
    ("<think>a < b and </thinking> is not a tag</think>x", False, "a < b and </thinking> is not a tag", "x"),
    ("<think>r</think>c mentions </think> and <think> again", False, "r", "c mentions </think> and <think> again"),
    ("no tags at all, just an answer.", False, None, "no tags at all, just an answer."),
    ("  leading space, no tags", False, None, "  leading space, no tags"),
    ("an answer that mentions <think> later", False, None, "an answer that mentions <think> later"),
    ("<thin>not a tag", False, None, "<thin>not a tag"),
    ("<thi", False, None, "<thi"),
    ("   ", False, None, "   "),
    ("", False, None, ""),
    ("", True, "", ""),
    ("<think>\nunfinished", False, "unfinished", ""),
    ("<think>r</think>\n\n", False, "r", ""),
]


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """A whole output split into (reasoning, content) by one push; reasoning is None when it had no section."""
    splitter = ReasoningSplitter(in_reasoning=in_reasoning)
    reasoning, content = splitter.push(text)
    tail_reasoning, tail_content = splitter.finish()
    if not splitter.had_reasoning:
        return None, content + tail_content
    return reasoning + tail_reasoning, content + tail_content


@pytest.mark.parametrize("text, in_reasoning, reasoning, content", SAMPLES)
def test_split_reasoning_whole(text, in_reasoning, reasoning, content):
    assert split_reasoning(text, in_reasoning=in_reasoning) == (reasoning, content)


def stream(chunks: list[str], in_reasoning: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(in_reasoning=in_reasoning)
    deltas = [splitter.push(c) for c in chunks] + [splitter.finish()]
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas)


def chunkings(text: str, rng: random.Random):
    yield [text]
    yield list(text)
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("text, in_reasoning, reasoning, content", SAMPLES)
def test_streamed_split_equals_whole_split_for_any_chunking(text, in_reasoning, reasoning, content):
    # Equal concatenations also mean no piece of a tag reached either stream, whatever the chunking.
    rng = random.Random(text)
    for chunks in chunkings(text, rng):
        assert stream(chunks, in_reasoning) == (reasoning or "", content), chunks


def test_tag_split_across_chunks_never_leaks():
    splitter = ReasoningSplitter()
    assert splitter.push("<th") == ("", "")
    assert splitter.push("ink>\n") == ("", "")  # more whitespace may follow the tag
    assert splitter.push("plan") == ("plan", "")
    assert splitter.push(" more</th") == (" more", "")
    assert splitter.push("ink") == ("", "")
    assert splitter.push(">\n") == ("", "")
    assert splitter.push("\nHello") == ("", "Hello")
    assert splitter.push(" </think> <think>") == ("", " </think> <think>")
    assert splitter.finish() == ("", "")


def test_held_back_only_what_could_become_a_tag():
    splitter = ReasoningSplitter(in_reasoning=True)
    assert splitter.push("a<b") == ("a<b", "")  # "<b" cannot grow into "</think>"
    assert splitter.push("x</") == ("x", "")
    assert splitter.push("y") == ("</y", "")  # it did not become the tag after all
    assert splitter.push("<") == ("", "")
    assert splitter.finish() == ("<", "")  # cut off in reasoning: held text is reasoning


def test_in_reasoning_splitter():
    splitter = ReasoningSplitter(in_reasoning=True)
    assert splitter.had_reasoning
    assert splitter.push("\n") == ("", "")
    assert splitter.push("Think.") == ("Think.", "")
    assert splitter.push("</think>\n\nDone.") == ("", "Done.")
    assert splitter.finish() == ("", "")


def test_no_tags_streams_content_at_once():
    splitter = ReasoningSplitter()
    assert splitter.push("Hello") == ("", "Hello")
    assert splitter.push(" <think>x</think>") == ("", " <think>x</think>")
    assert not splitter.had_reasoning
    # whitespace at the start waits only until it is clear no tag follows
    splitter = ReasoningSplitter()
    assert splitter.push("\n ") == ("", "")
    assert splitter.push("<") == ("", "")
    assert splitter.push("p>") == ("", "\n <p>")


def test_custom_tags():
    assert split_reasoning("<reason>r</reason>c") == (None, "<reason>r</reason>c")
    splitter = ReasoningSplitter(start="<reason>", end="</reason>")
    r1, c1 = splitter.push("<reason>r</reas")
    r2, c2 = splitter.push("on>c")
    assert (r1 + r2, c1 + c2) == ("r", "c")


# --- keys -----------------------------------------------------------------------------------------------------------

def test_keys_create_verify_revoke(tmp_path):
    store = KeyStore(tmp_path / "deep" / "er" / "keys.db")
    assert (tmp_path / "deep" / "er" / "keys.db").is_file()
    rec, key = store.create("alice")
    assert key.startswith("sk-") and len(key) > 40
    assert isinstance(rec, KeyRecord) and rec.name == "alice" and rec.prefix == key[:10] and rec.revoked_at is None
    rec2, key2 = store.create("bob")
    assert key2 != key and rec2.id != rec.id

    assert store.verify(key) == rec
    assert store.verify(key2).name == "bob"
    assert store.verify(key + "x") is None
    assert store.verify("sk-nope") is None
    assert store.verify("") is None
    assert [r.name for r in store.list()] == ["alice", "bob"]

    revoked = store.revoke(str(rec.id))
    assert revoked.id == rec.id and revoked.revoked_at is not None
    assert store.verify(key) is None
    assert store.verify(key2) is not None
    assert [r.revoked_at is None for r in store.list()] == [False, True]
    with pytest.raises(KeyError, match="no active API key"):
        store.revoke(str(rec.id))

    assert store.revoke(rec2.prefix).id == rec2.id
    assert store.verify(key2) is None
    with pytest.raises(KeyError):
        store.revoke("sk-missing")


def test_keys_revoke_by_full_key_and_ambiguous_prefix(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    rec, key = store.create("a")
    assert store.revoke(key).id == rec.id
    # two keys sharing a listed prefix: astronomically unlikely by chance, so force it in the file
    a, _ = store.create("a")
    b, _ = store.create("b")
    with closing(sqlite3.connect(tmp_path / "keys.db")) as conn, conn:
        conn.execute("UPDATE api_keys SET prefix = 'sk-SAMEPRE'")
    with pytest.raises(KeyError, match="several"):
        store.revoke("sk-SAMEPRE")
    assert store.revoke(str(b.id)).id == b.id
    assert store.revoke("sk-SAMEPRE").id == a.id  # only active keys count


def test_keys_are_hashed_at_rest(tmp_path):
    path = tmp_path / "keys.db"
    store = KeyStore(path)
    keys = [store.create(f"user{i}")[1] for i in range(5)]
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the journal too, if any is left
    for key in keys:
        assert key.encode() not in raw
        assert key[10:].encode() not in raw  # nor the part the listed prefix leaves out
        assert hashlib.sha256(key.encode()).hexdigest().encode() in raw
    # a second store on the same file sees the same keys
    assert all(KeyStore(path).verify(k) is not None for k in keys)


def test_keys_from_many_threads(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    _, key = store.create("shared")
    results: list[bool] = []

    def work():
        for _ in range(10):
            results.append(store.verify(key) is not None)
        store.create("t")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 40 and len(store.list()) == 5


# --- rate limits ----------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_bucket():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)  # one token a second
    assert [limiter.check("k") for _ in range(3)] == [0, 0, 0]
    assert limiter.check("k") == pytest.approx(1.0)
    assert limiter.check("other") == 0  # buckets are per key
    clock.now += 0.5
    assert limiter.check("k") == pytest.approx(0.5)  # a refused request spends nothing
    clock.now += 0.5
    assert limiter.check("k") == 0
    assert limiter.check("k") == pytest.approx(1.0)
    clock.now += 100  # refills only up to the burst
    assert [limiter.check("k") for _ in range(4)][-1] == pytest.approx(1.0)


def test_rate_limiter_default_burst_and_slow_rates():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=2, clock=clock)
    assert limiter.check("k") == 0 and limiter.check("k") == 0
    assert limiter.check("k") == pytest.approx(30.0)
    clock.now += 30
    assert limiter.check("k") == 0

    limiter = RateLimiter(per_minute=0.5, clock=clock)  # one request every two minutes
    assert limiter.check("k") == 0
    assert limiter.check("k") == pytest.approx(120.0)


def test_rate_limiter_unlimited():
    limiter = RateLimiter(per_minute=0, clock=FakeClock())
    assert all(limiter.check("k") == 0 for _ in range(1000))
    assert RateLimiter(per_minute=-1).check("k") == 0
    with pytest.raises(ValueError):
        RateLimiter(per_minute=10, burst=0)


def test_rate_limiter_forgets_full_buckets():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=60, burst=1, clock=clock)
    limiter.PRUNE_AT = 10
    for i in range(10):
        limiter.check(f"k{i}")
    clock.now += 5
    limiter.check("busy")
    limiter.check("last")
    assert set(limiter._buckets) == {"busy", "last"}
    assert limiter.check("busy") == pytest.approx(1.0)  # its empty bucket was kept
