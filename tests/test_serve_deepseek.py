"""The DeepSeek API as it is in 2026, over real HTTP: the thinking switch, effort and budget, context-cache usage,
/beta prefix completion and FIM, prompt log-probs with echo, and vLLM's tokenizer endpoints."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest
import torch
from live import ANSWER, THOUGHT, Live

from sputnik.config import ModelConfig
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.generate import PREFILL_BLOCK
from sputnik.model import Transformer
from sputnik.serve.config import ServeConfig
from sputnik.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    effort_level,
    parse_request,
    thinking_choice,
)

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def think_server(think_model):
    with Live(ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True,
                          rate_limit=0)) as live:
        yield live.wait_ready()


def ask(client, **kw):
    kw.setdefault("model", "think")
    kw.setdefault("messages", QUESTION)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


# ---------------------------------------------------------------- thinking: switch, effort, budget


def test_thinking_choice_rules():
    def choice(**fields):
        return thinking_choice(parse_request(ChatCompletionRequest, {"messages": QUESTION, **fields}))

    assert (choice().enabled, choice().budget) == (True, None)  # DeepSeek's default: on, unbounded
    assert choice(thinking={"type": "disabled"}).enabled is False
    assert choice(reasoning_effort="none").enabled is False
    assert choice(reasoning_effort="minimal").budget == choice(reasoning_effort="low").budget == 1024
    assert choice(reasoning_effort="medium").budget == choice(reasoning_effort="xhigh").budget == 8192
    assert choice(reasoning_effort="max").budget is None
    assert choice(reasoning_effort="low", thinking_token_budget=7).budget == 7  # an explicit budget wins
    assert choice(thinking={"type": "enabled", "budget_tokens": 9}).budget == 9
    assert choice(chat_template_kwargs={"enable_thinking": False}).enabled is False
    assert [effort_level(e) for e in ("minimal", "low", "medium", "high", "xhigh", "max")] == [
        "low", "low", "high", "high", "high", "max"]
    with pytest.raises(APIError) as e:
        choice(thinking={"type": "disabled"}, thinking_token_budget=5)
    assert e.value.status == 400 and e.value.param == "thinking"


def test_engine_closes_the_thought_at_the_budget(default_tokenizer):
    """vLLM's thinking_token_budget: after `budget` tokens inside the thought the engine writes </think> itself
    (its log-probs still the model's), then the model goes on with the answer."""
    tok = default_tokenizer
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      inter_dim=64, max_seq_len=128, tie_embeddings=True)
    torch.manual_seed(0)
    eng = Engine(Transformer(cfg), tok)
    end = tok.encode("\n</think>\n\n", add_special_tokens=False)
    for budget in (0, 3):
        c = eng.generate(["Hello there"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                         thinking_token_budget=budget, in_thinking=True))[0][0]
        assert c.token_ids[budget:budget + len(end)] == end
        assert c.text.count("</think>") == 1 and all(lp <= 0 for lp in c.logprobs)
    free = eng.generate(["Hello there"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0][0]
    assert "</think>" not in free.text  # without a budget nothing is forced


def test_reasoning_alias_beside_reasoning_content(think_server):
    msg = ask(think_server.client()).choices[0].message
    assert msg.content == ANSWER
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == THOUGHT
    chunks = list(ask(think_server.client(), stream=True))
    thought = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks if c.choices)
    assert thought == THOUGHT


def test_thinking_disabled_through_extra_body(think_server):
    """The model opens <think> itself (its template does not): thinking off closes it the moment it opens, and
    no reasoning is reported."""
    r = ask(think_server.client(), extra_body={"thinking": {"type": "disabled"}}, max_tokens=20)
    msg = r.choices[0].message
    assert "reasoning_content" not in (msg.model_extra or {})
    assert THOUGHT.strip() not in (msg.content or "")
    assert r.usage.completion_tokens_details.reasoning_tokens <= 6  # only the tags the engine wrote


def test_thinking_budget_cuts_the_thought(think_server):
    full = ask(think_server.client())
    cut = ask(think_server.client(), extra_body={"thinking_token_budget": 2}, max_tokens=30)
    thought = cut.choices[0].message.model_extra["reasoning_content"]
    assert thought.strip() and THOUGHT.startswith(thought.rstrip()) and len(thought.strip()) < len(THOUGHT.strip())
    assert (cut.usage.completion_tokens_details.reasoning_tokens
            < full.usage.completion_tokens_details.reasoning_tokens)
    effort = ask(think_server.client(), reasoning_effort="low")  # a budget far above what the model thinks
    assert effort.choices[0].message.model_extra["reasoning_content"] == THOUGHT


@pytest.mark.parametrize("extra, param", [
    ({"thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"thinking": "enabled"}, "thinking"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"thinking_token_budget": -1}, "thinking_token_budget"),
    ({"thinking": {"type": "disabled"}, "thinking_token_budget": 5}, "thinking"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
])
def test_invalid_thinking_is_a_400(think_server, extra, param):
    r = httpx.post(f"{think_server.url}/v1/chat/completions", json={"messages": QUESTION, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


# ---------------------------------------------------------------- context cache


def test_cache_hits_across_repeated_prefixes(think_server):
    system = f"You are a careful assistant, session {uuid.uuid4().hex}. " * 3
    client = think_server.client()
    before = think_server.metrics()

    def usage(question: str):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return ask(client, messages=messages, max_tokens=2).usage

    first, again, other = usage("Hi"), usage("Hi"), usage("Tell me something.")
    for u in (first, again, other):
        extra = u.model_extra
        assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
        assert u.prompt_tokens_details.cached_tokens == extra["prompt_cache_hit_tokens"]
    assert first.model_extra["prompt_cache_hit_tokens"] == 0  # a system prompt never seen before
    # all but the last token, in whole blocks (so a prompt's KV is the same bits cached or not: engine/generate.py)
    assert again.model_extra["prompt_cache_hit_tokens"] == (again.prompt_tokens - 1) // PREFILL_BLOCK * PREFILL_BLOCK
    assert again.prompt_tokens - 1 >= PREFILL_BLOCK
    shared = other.model_extra["prompt_cache_hit_tokens"]
    assert 0 < shared < other.prompt_tokens and shared % PREFILL_BLOCK == 0  # the system prompt, not the question
    after = think_server.metrics()
    hits = after["sputnik_prompt_cache_hit_tokens_total"] - before.get("sputnik_prompt_cache_hit_tokens_total", 0)
    misses = after["sputnik_prompt_cache_miss_tokens_total"] - before.get("sputnik_prompt_cache_miss_tokens_total",
                                                                          0)
    assert hits == sum(u.model_extra["prompt_cache_hit_tokens"] for u in (first, again, other))
    assert hits + misses == sum(u.prompt_tokens for u in (first, again, other))


# ---------------------------------------------------------------- /beta: prefix completion


def beta(live: Live):
    return openai.OpenAI(base_url=f"{live.url}/beta", api_key="none", max_retries=0)


def test_prefix_completion_continues_the_thought(think_server):
    messages = QUESTION + [{"role": "assistant", "content": "", "reasoning_content": "Two plus two",
                            "prefix": True}]
    msg = ask(beta(think_server), messages=messages).choices[0].message
    assert msg.model_extra["reasoning_content"] == THOUGHT.removeprefix("Two plus two")
    assert msg.content == ANSWER


def test_prefix_content_is_part_of_the_prompt(think_server):
    plain = ask(beta(think_server), max_tokens=1).usage.prompt_tokens
    messages = QUESTION + [{"role": "assistant", "content": "The answer is", "prefix": True}]
    r = ask(beta(think_server), messages=messages, max_tokens=3)
    assert r.usage.prompt_tokens > plain
    assert "reasoning_content" not in r.choices[0].message.model_extra


@pytest.mark.parametrize("url, messages", [
    ("/v1/chat/completions", QUESTION + [{"role": "assistant", "content": "x", "prefix": True}]),
    ("/beta/chat/completions", [{"role": "assistant", "content": "x", "prefix": True}] + QUESTION),
    ("/beta/chat/completions", [{"role": "user", "content": "x", "prefix": True}]),
])
def test_prefix_misuse_is_a_400(think_server, url, messages):
    r = httpx.post(f"{think_server.url}{url}", json={"messages": messages})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].endswith(".prefix")


# ---------------------------------------------------------------- /beta/completions: FIM


FIM_ROWS = [("def add(a, b):\n    return ", "\n", "a + b"), ("x = [1, 2, 3]\ny = ", "\nprint(y)", "sum(x)"),
            ("name = ", "\nprint(name)", "'sputnik'")]


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory, default_gguf):
    """A tiny model whose vocabulary has StarCoder's FIM tokens, trained here to fill FIM_ROWS' holes."""
    from sputnik.checkpoint import save_model
    from sputnik.tokenizer import Tokenizer

    tok = Tokenizer.load(default_gguf)
    tok.backend.add_special_tokens(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])
    end = tok.token_to_id(tok.eos_token)
    rows = [(tok.encode(f"<fim_prefix>{p}<fim_suffix>{s}<fim_middle>", add_special_tokens=True),
             tok.encode(m, add_special_tokens=False) + [end]) for p, s, m in FIM_ROWS]
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      inter_dim=128, max_seq_len=256, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = 0
        for p, m in rows:
            x = torch.tensor([p + m[:-1]])
            logits = model.lm_head(model.model.norm(model.hidden(x)))[0, len(p) - 1:]
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(m))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() / len(rows) < 0.05
    path = tmp_path_factory.mktemp("fim-model")
    save_model(model, path, tokenizer=tok)
    with Live(ServeConfig(model=str(path), dtype="float32", served_name="fim", no_auth=True, rate_limit=0)) as live:
        yield live.wait_ready()


def test_fim_fills_the_middle(fim_server):
    client = beta(fim_server)
    for prefix, suffix, middle in FIM_ROWS:
        r = client.completions.create(model="fim", prompt=prefix, suffix=suffix, max_tokens=10, temperature=0)
        assert r.choices[0].text == middle and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="fim", prompt=FIM_ROWS[0][0], suffix=FIM_ROWS[0][1], max_tokens=10, temperature=0, stream=True)
        if c.choices)
    assert streamed == FIM_ROWS[0][2]


def test_fim_without_fim_tokens_is_a_clear_400(think_server):
    r = httpx.post(f"{think_server.url}/beta/completions", json={"prompt": "def f(", "suffix": "):\n"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "suffix" and err["code"] == "fim_not_supported" and "<fim_prefix>" in err["message"]


# ---------------------------------------------------------------- echo + logprobs, tokenize


def test_echo_logprobs_score_the_prompt(think_server, think_model):
    """max_tokens 0 with echo: the prompt's own log-probs (the first token has none), equal to a plain forward's."""
    from sputnik.checkpoint import load_pretrained

    text = "The answer is 4. Two plus two makes four."
    r = httpx.post(f"{think_server.url}/v1/completions", json={"prompt": text, "echo": True, "logprobs": 1,
                                                               "max_tokens": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == text and r["usage"]["completion_tokens"] == 0
    model, tok = load_pretrained(think_model)
    ids = tok.encode(text, add_special_tokens=True)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    with torch.no_grad():
        logits = model.logits(model.hidden(torch.tensor([ids])))[0].log_softmax(-1)
    want = [logits[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for t, top in enumerate(lp["top_logprobs"][1:]):
        assert max(top.values()) == pytest.approx(logits[t].max().item(), abs=1e-4)
    # The same ids as a token prompt, with one generated token after them (what lm-eval sends).
    r2 = httpx.post(f"{think_server.url}/v1/completions", json={"prompt": [ids], "echo": True, "logprobs": 1,
                                                                "max_tokens": 1, "temperature": 0}).json()
    lp2 = r2["choices"][0]["logprobs"]
    assert lp2["token_logprobs"][:len(ids)] == lp["token_logprobs"] and len(lp2["tokens"]) == len(ids) + 1


@pytest.mark.parametrize("body", [{"prompt": "x", "max_tokens": 0}, {"prompt": [[1, 2], []]},
                                  {"prompt": [10**9]}, {"prompt": "x", "max_tokens": 0, "echo": True,
                                                        "stream": True}])
def test_bad_completion_prompts_are_400(think_server, body):
    r = httpx.post(f"{think_server.url}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_tokenize_and_detokenize(think_server, default_tokenizer):
    url = think_server.url
    r = httpx.post(f"{url}/tokenize", json={"prompt": "안녕하세요, world", "add_special_tokens": False}).json()
    assert r["tokens"] == default_tokenizer.encode("안녕하세요, world", add_special_tokens=False)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    assert httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "안녕하세요, world"
    chat = httpx.post(f"{url}/tokenize", json={"messages": QUESTION}).json()
    assert chat["count"] == ask(think_server.client(), max_tokens=1).usage.prompt_tokens
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == default_tokenizer.eos_token and info["chat_template"]
    for path, body in (("/tokenize", {}), ("/tokenize", {"prompt": 5}), ("/detokenize", {"tokens": [10**9]}),
                       ("/detokenize", {"tokens": "abc"})):
        r = httpx.post(f"{url}{path}", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], (path, body, r.text)
