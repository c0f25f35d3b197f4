"""The engine: ragged batches, shared prefill, seeded sampling, filters, stops, streaming."""

import math

import pytest
import torch

from sputnik.config import ModelConfig
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.sampling import Sampler
from sputnik.model import Transformer

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


def tiny(family: str = "llama", vocab: int = 99, **kw) -> Transformer:
    if family == "deepseek_v3":
        kw = dict(n_routed_experts=4, n_shared_experts=1, moe_inter_dim=8, n_activated_experts=2, n_group=2,
                  topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, **kw)
    cfg = ModelConfig(family=family, vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=48,
                      max_seq_len=256, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0),
    SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=30, min_p=0.01, repetition_penalty=1.2,
                   presence_penalty=0.5, frequency_penalty=0.3, seed=7),
])
def test_ragged_batch_equals_one_by_one(family, params):
    eng = Engine(tiny(family))
    together = eng.generate(PROMPTS, params)
    for i, p in enumerate(PROMPTS):
        alone = Engine(eng.model, max_batch=1).generate([p], params)[0][0]
        if params.greedy or i == 0:  # seeded streams are per (prompt index, sample)
            assert together[i][0].token_ids == alone.token_ids
        assert len(together[i][0].token_ids) == 12 and together[i][0].finish_reason == "length"
    # The greedy first token equals the argmax of a plain forward on the unpadded prompt.
    if params.greedy:
        for i, p in enumerate(PROMPTS):
            with torch.no_grad():
                assert together[i][0].token_ids[0] == eng.model(torch.tensor([p]))[0, -1].argmax().item()


def test_n_samples_share_prefill_and_seed_reproduces():
    eng = Engine(tiny())
    params = SamplingParams(max_tokens=10, temperature=1.0, n=4, seed=11)
    a, b = eng.generate(PROMPTS[:2], params), eng.generate(PROMPTS[:2], params)
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # the 4 samples differ
    other = eng.generate(PROMPTS[:2], SamplingParams(max_tokens=10, temperature=1.0, n=4, seed=12))
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in a[0]]
    # Smaller max_batch (several prefills) gives the same samples.
    c = Engine(eng.model, max_batch=4).generate(PROMPTS[:2], params)
    assert [[x.token_ids for x in r] for r in c] == [[x.token_ids for x in r] for r in a]


def test_logprobs_are_the_tempered_distribution():
    eng = Engine(tiny())
    p = [3, 4, 5]
    out = eng.generate([p], SamplingParams(max_tokens=3, temperature=0.7, seed=1))[0][0]
    ids = torch.tensor([p + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(eng.model(ids)[0].float() / 0.7, -1)
    for j, t in enumerate(out.token_ids):
        assert math.isclose(out.logprobs[j], logp[len(p) - 1 + j, t].item(), abs_tol=1e-4)


def test_stop_token_ids_end_and_are_kept():
    eng = Engine(tiny())
    free = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0))[0][0]
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    out = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))[0][0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == free.token_ids[: first + 1]


def sampler_counts(params: SamplingParams, logits: torch.Tensor, draws: int = 4000) -> torch.Tensor:
    s = Sampler([params] * draws, list(range(draws)), logits.shape[-1], torch.device("cpu"))
    tokens, _ = s(logits.expand(draws, -1))
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def test_filters_keep_exactly_the_right_tokens():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()[None]
    # top-k 2: only the two best, renormalised.
    f = sampler_counts(SamplingParams(top_k=2), logits)
    assert f[2:].sum() == 0 and abs(f[0] - 4 / 7) < 0.04
    # top-p 0.8: 0.4 + 0.3 < 0.8 so the third token is still needed; the fourth is not.
    f = sampler_counts(SamplingParams(top_p=0.8), logits)
    assert f[2] > 0 and f[3:].sum() == 0
    # min-p 0.3: tokens below 0.3 * 0.4 = 0.12 are dropped.
    f = sampler_counts(SamplingParams(min_p=0.3), logits)
    assert f[2] > 0 and f[3:].sum() == 0
    # No filter: frequencies follow the distribution.
    f = sampler_counts(SamplingParams(temperature=1.0), logits, draws=20000)
    assert (f - probs).abs().max() < 0.02


def test_top_p_over_a_flat_large_vocabulary_falls_back_to_a_full_sort():
    logits = torch.zeros(1, 5000)  # 1024 candidates hold only 20% of the mass
    f = sampler_counts(SamplingParams(top_p=0.5), logits, draws=3000)
    assert (f > 0).sum() > 1100  # tokens beyond the first 1024 candidates are drawn too


def test_top_p_draws_the_same_tokens_whichever_candidates_hold_them(monkeypatch):
    import sputnik.engine.sampling as sampling

    torch.manual_seed(0)
    # The kept tokens fit in the first 64 candidates, in the first 1024, or need the full sort (no ties: topk and
    # sort may order equal probabilities differently).
    for scale in (3.0, 1.5, 0.05):  # top-p keeps 10, 852 and 3411 tokens
        logits = torch.randn(1, 5000) * scale
        draws = {}
        for stages in ((64, 1024), (5000,)):
            monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", stages)
            s = Sampler([SamplingParams(top_p=0.7)] * 64, list(range(64)), 5000, torch.device("cpu"))
            draws[stages] = s(logits.expand(64, -1))[0]
        assert torch.equal(draws[(64, 1024)], draws[(5000,)]), scale


def test_repetition_penalty_matches_hf_rule():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    s = Sampler([params], [0], 4, torch.device("cpu"))
    s.start([[0, 1]])
    # token 0: 3.0 / 2 = 1.5 < 2.0; token 1: -1 * 2 = -2; so token 3 (2.0) wins over token 0.
    tok, _ = s(torch.tensor([[3.0, -1.0, 0.5, 2.0]]))
    assert tok.item() == 3


def test_bad_sampling_params_are_refused():
    for bad, msg in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n must"),
                     (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="empty prompt"):
        Engine(tiny()).generate([[]])
    with pytest.raises(ValueError, match="does not fit"):
        Engine(tiny()).generate([[1] * 300])


def chain_model(tok, text: str) -> tuple[Transformer, list[int]]:
    """A model whose greedy output after token ids[i] is ids[i+1]: it replays `text` token by token."""
    ids = tok.encode(text)
    assert len(set(ids)) == len(ids), "the chain needs distinct tokens"
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, dim=len(ids) + 1, n_layers=1, n_heads=1,
                      n_kv_heads=1, head_dim=8, inter_dim=8, max_seq_len=256, tie_embeddings=False)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1)
        for i, t in enumerate(ids):
            model.model.embed_tokens.weight[t, i] = 1.0
            if i + 1 < len(ids):
                model.lm_head.weight[ids[i + 1], i] = 10.0
    return model.eval(), ids


def test_streaming_korean_never_yields_a_broken_character(default_tokenizer):
    tok = default_tokenizer
    for text in ("Q 한국 🚀", "Q 한생 🚀", "Q: 한국 🚀", "A 한중 🚀"):  # the prompt is the first token
        model, ids = chain_model(tok, text)
        assert any("\ufffd" in tok.decode(ids[: i + 1]) for i in range(len(ids)))  # the tokens split characters
        pieces = []
        for d in Engine(model, tok).stream([ids[:1]], SamplingParams(max_tokens=len(ids) - 1, temperature=0)):
            assert "\ufffd" not in d.text
            pieces.append(d.text)
        assert "".join(pieces) == tok.decode(ids[1:])


def test_stop_strings_cut_exactly_and_are_never_streamed(default_tokenizer):
    tok = default_tokenizer
    model, ids = chain_model(tok, "The quick brown fox jumps over my lazy dog")
    full = tok.decode(ids[1:])
    eng = Engine(model, tok)
    for stop in (["own fo"], ["lazy", "jumps"], ["k"], ["zzz", "dog"]):
        params = SamplingParams(max_tokens=len(ids) - 1, temperature=0, stop=stop)
        out = eng.generate([ids[:1]], params)[0][0]
        first = min((full.index(s), s) for s in stop if s in full)
        assert out.text == full[: first[0]] and out.finish_reason == "stop" and out.stop_reason == first[1]
        streamed = "".join(d.text for d in eng.stream([ids[:1]], params))
        assert streamed == out.text
    out = eng.generate([ids[:1]], SamplingParams(max_tokens=len(ids) - 1, temperature=0, stop=["absent"]))[0][0]
    assert out.text == full and out.finish_reason == "length"


# ---------------------------------------------------------------- continuous batching


def _drive(eng: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, list[int]]:
    """Step the engine, adding requests at the given steps; return each request's tokens."""
    out: dict[str, list[int]] = {}
    step = 0
    while eng.has_work or any(s >= step for s in arrivals):
        for key, ids, params in arrivals.get(step, []):
            eng.add(key, ids, params)
            out[key] = []
        for d in eng.step():
            out[d.prompt].append(d.token_id)
        step += 1
    return out


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_requests_joining_mid_run_equal_the_same_requests_alone(family):
    model = tiny(family)
    greedy = SamplingParams(max_tokens=10, temperature=0)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=5, n=2)
    arrivals = {0: [("a", PROMPTS[1], greedy)], 3: [("b", PROMPTS[0], seeded), ("c", PROMPTS[3], greedy)],
                4: [("d", PROMPTS[2], greedy)]}
    together = _drive(Engine(model, prefill_chunk=2, prefill_block=2), arrivals)
    for reqs in arrivals.values():
        for key, ids, params in reqs:
            alone = _drive(Engine(model, prefill_block=2), {0: [(key, ids, params)]})
            assert sorted(together[key]) == sorted(alone[key]), key
            assert len(together[key]) == 10 * params.n


def test_a_long_prefill_does_not_stall_running_streams():
    eng = Engine(tiny(), prefill_chunk=4, prefill_block=4)
    eng.add("running", PROMPTS[0], SamplingParams(max_tokens=30, temperature=0))
    eng.step()
    eng.add("long", list(range(1, 41)), SamplingParams(max_tokens=5, temperature=0))
    # 40 prompt tokens in chunks of 4: ten steps of prefill, each also decoding the running stream.
    for _ in range(10):
        keys = [d.prompt for d in eng.step()]
        assert "running" in keys
    assert "long" in keys  # its first token comes with the last chunk


def test_abort_frees_rows_at_once_and_the_rest_finish():
    eng = Engine(tiny())
    params = SamplingParams(max_tokens=20, temperature=0)
    for i, p in enumerate(PROMPTS):
        eng.add(i, p, params)
    eng.step()
    assert eng.num_running == 4
    eng.abort(1)
    eng.abort(3)
    seen = {k: 0 for k in range(4)}
    while eng.has_work:
        for d in eng.step():
            seen[d.prompt] += 1
        assert eng.num_running <= 2
    assert seen[1] == seen[3] == 0 and seen[0] == seen[2] == 19
    assert eng.num_cache_rows == 0 and len(eng._sampler.params) == 0  # no leaked slot


def test_abort_of_a_queued_request_never_runs_it():
    eng = Engine(tiny(), max_batch=1)
    eng.add("a", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))
    eng.add("b", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0))
    eng.abort("b")
    keys = {d.prompt for _ in range(10) for d in eng.step()}
    assert keys == {"a"} and not eng.has_work


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_prefix_cache_hits_give_the_same_tokens(family):
    model = tiny(family)
    system = list(range(1, 25))
    params = SamplingParams(max_tokens=8, temperature=0)
    cold = Engine(model, prefill_block=8).generate([system + [30, 31], system + [40, 41, 42]], params)
    eng = Engine(model, prefix_cache_mb=16, prefill_block=8)
    first = eng.generate([system + [30, 31]], params)[0][0]
    second = eng.generate([system + [40, 41, 42]], params)[0][0]
    assert eng.stats["prefix_hit_tokens"] == len(system)  # 24: three whole blocks
    assert [first.token_ids, second.token_ids] == [c[0].token_ids for c in cold]
    # The next turn of a conversation starts with the whole first exchange: prompt and answer, in whole blocks.
    follow = system + [30, 31] + first.token_ids + [50, 51]
    again = eng.generate([follow], params)[0][0]
    hit = len(system) + 2 + len(first.token_ids) - 1
    assert eng.stats["prefix_hit_tokens"] == len(system) + hit - hit % 8
    assert again.token_ids == Engine(model, prefill_block=8).generate([follow], params)[0][0].token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_a_16_bit_kv_cache_rounds_what_it_keeps_and_nothing_else(family, dtype):
    """kv_dtype=bfloat16 or float16 under a float32 model: the caches (prefill's and the running rows') hold it,
    attention reads them widened, so the logprobs move by its rounding of k and v and no more; the engine's other
    guarantees hold over it (ragged rows alone and together, prefix-cache hits, the PyTorch and native steps)."""
    model = tiny(family)
    params = SamplingParams(max_tokens=10, temperature=0)
    full = Engine(model).generate(PROMPTS, params)
    eng = Engine(model, kv_dtype=dtype)
    half = eng.generate(PROMPTS, params)
    assert eng.kv_dtype == dtype and {b.dtype for b in eng._cache.buffers()} == {dtype}
    first = [(a[0].logprobs[0], b[0].logprobs[0]) for a, b in zip(full, half)]
    assert all(abs(x - y) < 0.05 for x, y in first) and any(x != y for x, y in first)
    for i, p in enumerate(PROMPTS):
        alone = Engine(model, kv_dtype=dtype, max_batch=1, native=False).generate([p], params)[0][0]
        assert alone.token_ids == half[i][0].token_ids
    system = list(range(1, 25))
    cached = Engine(model, kv_dtype=dtype, prefix_cache_mb=16, prefill_block=8)
    cached.generate([system + [30, 31]], params)
    again = cached.generate([system + [40, 41, 42]], params)[0][0]  # the system prompt's blocks from the cache
    assert cached.stats["prefix_hit_tokens"] == len(system)
    assert again.token_ids == Engine(model, kv_dtype=dtype).generate([system + [40, 41, 42]], params)[0][
        0].token_ids


def test_chat_engine_holds_one_conversation_in_its_cache_dtype():
    from sputnik.engine.multiturn import chat_engine, prefix_cache_mb

    model = tiny()
    per_token = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim  # k and v, every layer
    assert prefix_cache_mb(model, 1, 100) == 100 * per_token * 4 / 2**20
    assert prefix_cache_mb(model, 1, 100, torch.float16) == 100 * per_token * 2 / 2**20
    eng = chat_engine(model, None, torch.float16)
    assert eng.kv_dtype == torch.float16
    assert eng.prefix_cache.max_bytes == int(model.cfg.max_seq_len * per_token * 2)


def test_prefix_cache_hits_are_whole_blocks():
    eng = Engine(tiny(), prefix_cache_mb=16, prefill_block=16)
    params = SamplingParams(max_tokens=2, temperature=0)
    eng.generate([list(range(1, 40))], params)
    eng.generate([list(range(1, 30)) + [90]], params)  # shares 29 tokens: one block of 16 is reused
    assert eng.stats["prefix_hit_tokens"] == 16
    eng.generate([list(range(1, 12)) + [90]], params)  # shares 11: less than a block, nothing reused
    assert eng.stats["prefix_hit_tokens"] == 16


def test_prefix_cache_keeps_the_longest_entry_of_a_conversation():
    eng = Engine(tiny(), prefix_cache_mb=16, prefill_block=1)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = list(range(1, 25))
    first = eng.generate([prompt], params)[0][0]
    cache = eng.prefix_cache
    assert list(cache.entries) == [tuple(prompt + first.token_ids[:-1])]  # the prompt's own entry went
    other = list(range(40, 60))
    eng.generate([other], params)
    assert len(cache.entries) == 2 and cache.bytes == sum(size for _, _, size in cache.entries.values())
    follow = prompt + first.token_ids + [7, 8]
    eng.generate([follow], params)  # the next turn hits the longest entry and supersedes it
    assert eng.stats["prefix_hit_tokens"] == len(prompt) + len(first.token_ids) - 1
    assert len(cache.entries) == 2 and all(len(k) >= len(follow) for k in cache.entries if k[0] == 1)


def test_top_logprobs_are_sorted_and_hold_the_greedy_choice():
    c = Engine(tiny()).generate([PROMPTS[1]], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0][0]
    assert len(c.top_logprobs) == 5
    for tok, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        assert len(top) == 3 and top[0][0] == tok and math.isclose(top[0][1], lp, abs_tol=1e-6)
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_a_vanishing_temperature_is_greedy_not_nan():
    eng = Engine(tiny())
    greedy = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=0))[0][0]
    tiny_t = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=5e-324, seed=1))[0][0]
    assert tiny_t.token_ids == greedy.token_ids and all(math.isfinite(lp) for lp in tiny_t.logprobs)


def test_compiled_decode_equals_eager():
    """One row, then rows joining and leaving mid-run, with the cache growing past its first 128 slots: the compiled
    step gives the eager step's tokens and log-probs."""
    model = tiny()
    greedy = SamplingParams(max_tokens=140, temperature=0)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=3, n=2)
    arrivals = {0: [("long", PROMPTS[1], greedy)], 2: [("b", PROMPTS[0], seeded)], 5: [("c", PROMPTS[3], greedy)]}
    eager, compiled = Engine(model), Engine(model, compile=True)
    compiled.warm_up()  # both graphs (one row, several), leaving the engine idle and its cache empty
    assert not compiled.has_work and compiled.num_cache_rows == 0
    a = eager.generate([PROMPTS[2]], greedy)[0][0]
    b = compiled.generate([PROMPTS[2]], greedy)[0][0]
    assert b.token_ids == a.token_ids and len(a.token_ids) == 140
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    assert _drive(compiled, arrivals) == _drive(eager, arrivals)
    assert compiled.num_cache_rows == 0


def greedy_by_forward(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from plain uncached forwards (no fused weights, no cache): the reference for the engine."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_the_engine_follows_weights_replaced_after_it_fused_them():
    model = tiny()
    eng = Engine(model)  # fuses q/k/v and gate/up into shared storage
    params = SamplingParams(max_tokens=8, temperature=0)
    assert eng.generate(PROMPTS[:1], params)[0][0].token_ids == greedy_by_forward(model, PROMPTS[0], 8)
    with torch.no_grad():  # as a trainer that casts or reloads might: new storage, new values
        for p in model.parameters():
            p.data = p.data.flip(0).clone()
    assert eng.generate(PROMPTS[:1], params)[0][0].token_ids == greedy_by_forward(model, PROMPTS[0], 8)


def test_a_long_prefill_hands_its_memory_back(monkeypatch):
    """A prompt of at least a prefill chunk frees tens of MB of activations and its own cache once its rows join the
    batch; the engine then gives the C heap's free pages back (once), which short prompts do not pay for."""
    import sputnik.engine.generate as generate

    calls = []
    monkeypatch.setattr(generate, "trim_heap", lambda: calls.append(len(calls)))
    eng = Engine(tiny(), prefill_chunk=32, prefill_block=16)
    greedy = SamplingParams(max_tokens=3, temperature=0)
    eng.generate([list(range(1, 20))], greedy)
    assert calls == [] and eng._cache.rows == 1  # one sequence, one row of cache
    long = eng.generate([list(range(1, 41))], greedy)
    assert calls == [0] and len(long[0][0].token_ids) == 3
