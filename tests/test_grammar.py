"""Grammar-constrained decoding in the engine: a random model's output is valid under its schema, constrained and free
rows share a batch without touching each other, and bad grammars are named."""

import json

import jsonschema
import pytest
import torch

from sputnik.config import ModelConfig
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.grammar import Constraint, json_rule, literal, schema_error
from sputnik.model import Transformer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(default_tokenizer):
    cfg = ModelConfig(family="llama", vocab_size=default_tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, inter_dim=128, max_seq_len=512, tie_embeddings=True)
    torch.manual_seed(0)
    return Engine(Transformer(cfg), default_tokenizer)


def test_random_model_writes_valid_json_under_a_schema(engine):
    params = SamplingParams(max_tokens=300, temperature=1.0, seed=3, n=4, constraint=Constraint.json_schema(PERSON))
    outs = engine.generate(["Hello", "Describe someone"], params)
    for row in outs:
        for c in row:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), PERSON)
            assert c.text == json.dumps(json.loads(c.text), ensure_ascii=False)  # json.dumps spacing: no room for runaway whitespace
    assert len({c.text for row in outs for c in row}) > 1  # every sample has its own grammar state


def test_free_rows_are_untouched_by_constrained_neighbours(engine):
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = engine.generate(["Once upon a time"], free)[0][0]
    constrained = SamplingParams(max_tokens=40, temperature=1.0, seed=1, constraint=Constraint.json_schema(PERSON))
    keys = ["free", "json"]
    engine.add(keys[0], engine.tokenizer.encode("Once upon a time", add_special_tokens=True), free)
    engine.add(keys[1], engine.tokenizer.encode("Hi", add_special_tokens=True), constrained)
    texts = {k: "" for k in keys}
    while engine.has_work:
        for d in engine.step():
            texts[d.prompt] += d.text
    assert texts["free"] == alone.text
    assert texts["json"].startswith('{"name": "')


def test_lark_grammar_with_a_literal_and_a_json_rule(engine):
    grammar = f"start: {literal(engine.tokenizer, 'ANSWER: ')} body\nbody: {json_rule({'enum': [1, 2, 3]})}\n"
    outs = engine.generate(["x"], SamplingParams(max_tokens=20, seed=0, n=3, constraint=Constraint.lark(grammar)))
    assert {c.text for c in outs[0]} <= {"ANSWER: 1", "ANSWER: 2", "ANSWER: 3"}
    assert all(c.finish_reason == "stop" for c in outs[0])


def test_bad_schemas_and_grammars_are_named(engine):
    assert "strin" in schema_error({"type": "object", "properties": {"a": {"type": "strin"}}})
    assert schema_error(PERSON) is None
    assert engine.grammars.error(Constraint.lark("start: nope")) is not None
    with pytest.raises(ValueError, match="does not compile"):
        engine.add("bad", [1, 2], SamplingParams(constraint=Constraint.lark("start: nope")))
    assert engine.grammars.error(Constraint.json_schema(PERSON)) is None


def test_thought_then_json_answer(default_tokenizer):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    from sputnik.engine.grammar import Grammars, json_answer
    from sputnik.tokenizer import Tokenizer

    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    backend = Backend.from_str(default_tokenizer.backend.to_str())
    backend.add_special_tokens([AddedToken("<think>", special=True), AddedToken("</think>", special=True)])
    thinker = Tokenizer(backend, eos_token=default_tokenizer.eos_token)  # a vocabulary with think tokens
    cases = [(default_tokenizer, True, 'hmm, 2 and 2\n</think>\n\n{"answer": 4}', True),
             (default_tokenizer, True, '{"answer": 4}', False),  # a prompt that opened a thought: JSON is thought
             (default_tokenizer, False, '{"answer": 4}', True),
             (default_tokenizer, False, '<think>sure</think>{"answer": 4}', None),  # no think token: no thought
             (thinker, False, '<think>sure, 4</think>\n\n{"answer": 4}', True),
             (thinker, False, '{"answer": 4}', True),
             (thinker, True, 'so 4</think>{"answer": 4}', True)]
    for tok, think_opened, text, accepts in cases:
        m = Grammars(tok, tok.stop_ids).matcher(json_answer(schema, tok, think_opened))
        ok = m.consume_tokens(tok.encode(text))
        assert (ok and m.is_accepting()) if accepts else (not ok if accepts is None else ok and not m.is_accepting())


def test_a_task_with_an_output_schema_is_evaluated_under_it(engine, tmp_path, monkeypatch):
    from sputnik.eval.run import EvalConfig, evaluate
    from sputnik.tasks import get_task

    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["answer"], "additionalProperties": False}
    monkeypatch.setattr(type(get_task("arithmetic")), "output_schema", schema)
    cfg = EvalConfig(task="arithmetic", n=2, k=2, max_tokens=30, batch=8)
    evaluate(engine.model, engine.tokenizer, cfg, out_dir=tmp_path, progress=False, engine=engine)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (1 + 2)
    for r in records:
        assert r["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r["completion"]), schema)
