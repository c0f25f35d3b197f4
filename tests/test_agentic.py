"""Agentic rollouts: the calculator, the sandbox, multi-turn rollouts in the continuous batch, masks, log-probs, and
a tiny model that learns to call a tool."""

import json
import os
import time
from dataclasses import replace

import pytest
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from sputnik import kernels
from sputnik.config import ModelConfig
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.multiturn import AgentConfig, run_rollouts
from sputnik.eval.run import EvalConfig, evaluate, prompt_ids
from sputnik.model import Transformer
from sputnik.tasks import get_task
from sputnik.tokenizer import Tokenizer
from sputnik.tools.calculator import CalculatorError, calculator
from sputnik.tools.env import Environment, as_tool, environment_maker, resolve
from sputnik.tools.render import plan_of, tool_glue
from sputnik.tools.sandbox import SandboxConfig, run_python
from sputnik.train.grpo import GRPOConfig, GRPOObjective
from sputnik.train.logprobs import token_logprobs
from sputnik.train.loop import TrainConfig, Trainer
from sputnik.train.reasoning import write_tool_traces
from sputnik.train.sft import tokenize_chat
from torchrun import write_shared

CALL = '<tool_call>{"name": "peek", "arguments": {}}</tool_call>'
CHARS = list("0123456789abcdefghij ?\n")
SPECIAL = [CALL, "<tool_response>", "</tool_response>"]


def toy_tokenizer() -> Tokenizer:
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS + SPECIAL)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"<tool_call>.*?</tool_call>|</?tool_response>|[\s\S]"),
                                                 behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token="<eos>", pad_token="<eos>")


def toy_model(call_bias: float = 0.0) -> Transformer:
    """A tiny random model; call_bias > 0 makes the one-token call likelier (large: every turn is a call)."""
    torch.manual_seed(0)
    tok = toy_tokenizer()
    model = Transformer(ModelConfig(family="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, inter_dim=64, max_seq_len=96))
    if call_bias:
        with torch.no_grad():  # a large constant in dimension 0 of every embedding keeps h[0] > 0 after the norm
            model.model.embed_tokens.weight[:, 0] = 50.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[tok.token_to_id(CALL), 0] = call_bias
    return model


class Peek:
    """A per-rollout environment that knows its problem's answer."""

    def reset(self, problem):
        self.answer = problem.answer if problem is not None else "0"

    def peek(self) -> str:
        """Look at the answer."""
        return self.answer


# ------------------------------------------------------------------ calculator
def test_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculator("(1234 + 5678) * 3") == "20736"
    assert calculator("7/2") == "7/2" and calculator("8/2") == "4" and calculator("-3**2") == "-9"
    assert calculator("17 // 5") == "3" and calculator("-17 % 5") == "3" and calculator("2^10") == "1024"
    assert calculator("123456789123456789 * 987654321987654321") == str(123456789123456789 * 987654321987654321)
    for bad in ['__import__("os").system("ls")', "x + 1", "1.5 + 2", "2 ** 100000", "9 ** 9 ** 9", "1 / 0",
                "1 % 0", "(1, 2)", "[1]", "a" * 300, "", "1 if 1 else 2", "abs(-1)", "1 < 2", "'a' * 3"]:
        with pytest.raises(CalculatorError):
            calculator(bad)


def test_tools_from_functions_names_and_paths():
    tools = resolve(["calculator", "python", "json:dumps"])
    assert [t.name for t in tools] == ["calculator", "python", "dumps"]
    calc = tools[0].spec()["function"]
    assert calc["parameters"]["properties"]["expression"]["type"] == "string"
    assert calc["parameters"]["required"] == ["expression"]
    with pytest.raises(ValueError, match="unknown tool"):
        resolve(["nope"])
    with pytest.raises(ValueError):
        resolve(["no.such.module:f"])
    env = Environment([as_tool(calculator)])
    ok = env.call({"function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}})
    assert ok.content == "42" and not ok.error
    for args in ['{"expression": "x"}', "not json", '{"wrong": 1}']:
        assert env.call({"function": {"name": "calculator", "arguments": args}}).error
    assert env.call({"function": {"name": "rm", "arguments": "{}"}}).error


# ------------------------------------------------------------------ sandbox
ESCAPES = {
    "read a file outside": "print(open('/etc/passwd').read())",
    "write a file outside": "open('/tmp/sputnik-sandbox-escape', 'w').write('x')",
    "list outside": "import os; print(os.listdir('/'))",
    "socket": "import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)",
    "http": "import urllib.request; urllib.request.urlopen('http://example.com', timeout=1)",
    "fork bomb": "import os\nwhile True: os.fork()",
    "subprocess": "import subprocess; subprocess.run(['id'])",
    "os.system": "import os; os.system('id')",
    "ctypes": "import ctypes",
    "memory": "x = bytearray(2 * 1024 ** 3); print(len(x))",
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_sandbox_refuses_escapes(name):
    r = run_python(ESCAPES[name], SandboxConfig(cpu_s=2, wall_s=5, memory_mb=256))
    assert not r.ok and r.stdout == "", (name, r)
    assert not os.path.exists("/tmp/sputnik-sandbox-escape")


def test_sandbox_runs_code_and_kills_at_its_limits():
    cfg = SandboxConfig(cpu_s=1, wall_s=2, memory_mb=256, max_output=100)
    r = run_python("import json, math\nopen('f', 'w').write('hi')\nprint(json.dumps(math.factorial(5)), "
                   "open('f').read())", cfg)
    assert r.ok and r.stdout == "120 hi\n"
    start = time.monotonic()
    spin = run_python("while True: pass", cfg)  # the CPU limit kills it
    sleep = run_python("import time; time.sleep(30)", cfg)  # the wall clock kills it
    assert spin.returncode < 0 and sleep.timed_out and time.monotonic() - start < 10
    assert len(run_python("print('a' * 100000)", cfg).stdout) == 100


# ------------------------------------------------------------------ multi-turn rollouts
def _glue(results):
    return tool_glue(results)


def test_rows_pause_for_tools_while_other_rows_decode():
    tok, model = toy_tokenizer(), toy_model(call_bias=40.0)
    engine = Engine(model, tok, max_batch=8, prefix_cache_mb=16, prefill_block=1)  # every cached token reused
    spans = []

    class Slow:
        def peek(self) -> str:
            """Take a while."""
            t0 = time.monotonic()
            time.sleep(0.1)
            spans.append((t0, time.monotonic()))
            return "7"

    engine.add("background", tok.encode("abc?"), SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
    seen = []
    step = engine.step
    engine.step = lambda: [seen.append((time.monotonic(), d)) or d for d in step()]  # (observes, changes nothing)
    prompt = tok.encode("abcdefghij abcdefghij?")
    outs = run_rollouts(engine, [prompt, prompt], SamplingParams(max_tokens=4, temperature=0),
                        [Environment.from_object(Slow()), None], _glue, AgentConfig(max_turns=3))
    tooled, plain = outs
    assert tooled.calls == 2 and tooled.finish_reason == "turns" and len(tooled.turns) == 3
    glue = tok.encode(tool_glue(["7"]))
    assert tooled.tokens == [tok.token_to_id(CALL)] + glue + [tok.token_to_id(CALL)] + glue + [tok.token_to_id(CALL)]
    assert tooled.own == [1] + [0] * len(glue) + [1] + [0] * len(glue) + [1]
    assert tooled.tool_tokens == 2 * len(glue) and tooled.tool_errors == 0
    assert plain.calls == 0 and len(plain.turns) == 1  # no environment: a call is just text
    background = [t for t, d in seen if d.prompt == "background"]
    assert any(a < t < b for a, b in spans for t in background), "the batch kept decoding during a tool call"
    assert engine.stats["prefix_hit_tokens"] >= 2 * len(prompt)  # resumed from the cache


def test_multi_turn_logprobs_equal_one_forward():
    tok, model = toy_tokenizer(), toy_model(call_bias=0.6)
    engine = Engine(model, tok, max_batch=16)
    prompt = tok.encode("abcdefghij?")
    envs = [Environment.from_object(Peek()) for _ in range(12)]
    outs = run_rollouts(engine, [prompt] * 12, SamplingParams(max_tokens=5, temperature=1.0, seed=3), envs, _glue,
                        AgentConfig(max_turns=3, max_total_tokens=40), seed_indices=list(range(12)))
    assert any(o.calls for o in outs) and any(len(o.turns) > 1 and o.finish_reason != "turns" for o in outs)
    for o in outs:
        ids = torch.tensor([prompt + o.tokens])
        logp = token_logprobs(model, ids, torch.ones_like(ids, dtype=torch.bool), start=len(prompt) - 1)
        logp = logp[0, len(prompt) - 1 :]
        own = torch.tensor(o.own, dtype=torch.bool)
        torch.testing.assert_close(logp[own], torch.tensor(o.logprobs)[own], atol=2e-4, rtol=0)


# ------------------------------------------------------------------ GRPO with tools
def grpo_setup(tmp_path, **overrides):
    data = tmp_path / "peek.jsonl"
    rng = torch.Generator().manual_seed(0)
    write_shared(data, "".join(json.dumps({"prompt": f"{a}{b}?", "answer": str(int(torch.randint(10, (1,), generator=rng)))})
                               + "\n" for a in "abcdefghij" for b in "abcdefghij"))
    settings = dict(task=f"jsonl:{data},verifier=number", template="plain", prompts_per_step=4, num_generations=8,
                    max_completion_length=12, temperature=1.0, micro_batch_size=16, train_pool=64, eval_n=0,
                    environment_factory=Peek, max_turns=2, tool_call_reward=0.5)
    return toy_tokenizer(), GRPOConfig(**{**settings, **overrides})


def test_masks_exclude_tool_tokens_from_loss_and_kl(tmp_path):
    tok, cfg = grpo_setup(tmp_path, beta=0.04)
    model = toy_model(call_bias=0.6)
    objective = GRPOObjective(model, tok, cfg, seed=0)
    micro = objective.prepare(0, model)
    rows = [r for g in objective._groups(model, 1)[0] for r in g]
    assert any(r.turn.calls for r in rows)
    _, _, mask, _, _ = objective._pad(rows)
    for b, r in enumerate(rows):  # the loss (and the KL, under the same mask) counts the model's own tokens only
        assert mask[b, : len(r.own)].tolist() == [float(x) for x in r.own] and mask[b, len(r.own) :].sum() == 0
        assert r.turn.tool_tokens == r.own.count(0)
    assert any(r.turn.tool_tokens for r in rows)
    assert sum(m.mask.sum() for m in micro) > 0
    loss, metrics = objective.loss(model, micro[0])
    assert torch.isfinite(loss) and metrics["kl"] == 0.0
    step = objective.metrics(0)
    assert step["tools/calls_per_rollout"] > 0 and step["tools/result_tokens"] > 0 and "tools/error_rate" in step


@pytest.mark.skipif(not kernels.available(), reason="needs sputnik's CPU kernels (a C++ compiler)")
def test_tool_rollouts_from_a_quantized_copy_weigh_only_the_models_tokens(tmp_path):
    """rollout_quantize with tools: the copy's log-probs ride along each multi-turn rollout (0 on tool tokens, which
    the mask leaves out), and the loss weighs the model's own tokens by truncated importance sampling."""
    tok, cfg = grpo_setup(tmp_path, rollout_quantize="int8")
    model = toy_model(call_bias=0.6)
    objective = GRPOObjective(model, tok, cfg, seed=0)
    micro = objective.prepare(0, model)
    assert objective.metrics(0)["tools/result_tokens"] > 0
    sampled, mask = torch.cat([m.sampled for m in micro]), torch.cat([m.mask for m in micro])
    assert (sampled[mask > 0] < 0).all()  # a sampled token's log-prob; tool tokens carry none and train none
    loss, metrics = objective.loss(model, micro[0])
    assert torch.isfinite(loss) and 0 < metrics["rollout_is/abs_log_ratio"] < 1


def test_tiny_model_learns_to_call_a_tool(tmp_path):
    tok, cfg = grpo_setup(tmp_path)
    model = toy_model()
    objective = GRPOObjective(model, tok, cfg, seed=0)
    train = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=30, lr=3e-3, progress=False, plot_every=0)
    Trainer(model, train, objective).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rate = [r["tools/call_rate"] for r in rows if "tools/call_rate" in r]
    assert len(rate) == 30
    first, last = sum(rate[:5]) / 5, sum(rate[-5:]) / 5
    assert last > first + 0.4 and last > 0.6, (first, last)


# ------------------------------------------------------------------ eval with tools, cold-start tool traces
def test_eval_with_tools_reports_calls_and_errors():
    tok, model = toy_tokenizer(), toy_model(call_bias=50.0)  # every turn is a call
    cfg = EvalConfig(task="arithmetic:digits=1", n=4, k=2, template="plain", environment_factory=Peek, max_turns=2,
                     max_tokens=12, temperature=1.0, grading="lenient")
    s = evaluate(model, tok, cfg, progress=False)
    # turn 1 calls peek and reads the answer; turn 2 calls again and meets the turn limit: one call per problem
    assert s.greedy_tool_call_rate == 1.0 and s.greedy_calls == 1.0 and s.greedy_tool_error_rate == 0.0
    assert s.tool_call_rate == 1.0 and s.calls == 1.0 and s.k == 2
    assert s.greedy_accuracy == 0.0  # graded on the last turn (a call), never on the tool's text
    # the same model offered a tool it does not call by name: every call fails, and the eval says so
    failing = evaluate(model, tok, replace(cfg, environment_factory=None, tools=["calculator"], k=0), progress=False)
    assert failing.greedy_calls == 1.0 and failing.greedy_tool_error_rate == 1.0
    plain = evaluate(model, tok, replace(cfg, environment_factory=None, k=0), progress=False)
    assert plain.greedy_calls is None and "greedy_calls" not in plain.to_json()


def test_cold_start_tool_traces_are_what_rollouts_see(tmp_path, default_tokenizer):
    tok = default_tokenizer
    cfg = GRPOConfig(task="arithmetic:digits=4,ops=*", tools=["calculator"], grading="lenient")
    rows = [json.loads(line) for line in
            write_tool_traces(cfg, 3, tmp_path / "t.jsonl", tok).read_text().splitlines()]
    task = get_task(cfg.task)
    env = environment_maker(cfg.tools)(None)
    plan = plan_of(env.specs(), tok)
    for row, p in zip(rows, task.problems("train", 3, seed=0)):
        ids, mask = tokenize_chat(tok, row["messages"])
        prompt, _ = prompt_ids(task, p, tok, EvalConfig(task=cfg.task, tools=cfg.tools), env)
        assert ids[: len(prompt)] == prompt  # the prompt, tools offered, exactly as eval and GRPO render it
        m = p.meta
        call = {"name": "calculator", "arguments": {"expression": f"{m['a']} {m['op']} {m['b']}"}}
        turn = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        rest = tok.decode(ids[len(prompt):], skip_special_tokens=False)
        glue = tool_glue([p.answer], tok, plan)  # the real calculator's result, as rollouts insert it
        assert rest.startswith(turn + glue), rest
        assert f"\\boxed{{{p.answer}}}" in rest[len(turn + glue):]
        trained = tok.decode([t for t, k in zip(ids, mask) if k], skip_special_tokens=False)
        assert turn in trained and p.answer not in trained.split("</tool_call>")[0]
        assert "<tool_response>" not in trained  # the tool's text is never trained on


DIST_SCRIPT = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_agentic import grpo_setup, toy_model
from sputnik.train.grpo import GRPOObjective
from sputnik.train.loop import Trainer, TrainConfig, finish_distributed, init_distributed

init_distributed()
tok, cfg = grpo_setup(Path({data!r}), prompts_per_step=2)
model = toy_model(call_bias=0.6)
Trainer(model, TrainConfig(out_dir={out!r}, max_steps=2, lr=3e-3, progress=False, plot_every=0, fsdp={fsdp}),
        GRPOObjective(model, tok, cfg, seed=0)).run()
finish_distributed()
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one_with_tools(tmp_path, fsdp):
    """Real multi-turn rollouts on each rank (the streams follow the global row, so two processes sample what one
    does): same weights, losses, rewards and tool figures. Under FSDP the ranks' rollouts run different numbers of
    forwards (turns and stops differ), which the rollouts' gathered weights allow."""
    import textwrap
    from pathlib import Path

    from torchrun import assert_two_equal_one, torchrun

    script = tmp_path / "tools_dist.py"
    script.write_text(textwrap.dedent(DIST_SCRIPT.format(tests=str(Path(__file__).resolve().parent),
                                                         data=str(tmp_path), out=str(tmp_path / "two"), fsdp=fsdp)))
    torchrun(script)
    tok, cfg = grpo_setup(tmp_path, prompts_per_step=4)  # both ranks' prompts in one process
    model = toy_model(call_bias=0.6)
    Trainer(model, TrainConfig(out_dir=str(tmp_path / "one"), max_steps=2, lr=3e-3, progress=False, plot_every=0),
            GRPOObjective(model, tok, cfg, seed=0)).run()
    rows, one = assert_two_equal_one(tmp_path / "two", tmp_path / "one", model)
    tools = [k for k in one[0] if k.startswith("tools/")] + ["reward", "accuracy", "tokens"]
    for a, b in zip(rows, one):
        assert {k: a[k] for k in tools} == pytest.approx({k: b[k] for k in tools}, rel=1e-9)
    assert all(r["tools/calls_per_rollout"] > 0 and r["tools/result_tokens"] > 0 for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows)


def test_the_tools_recipe_reports_and_reuses_finished_stages(tmp_path, default_tokenizer, capsys):
    from sputnik.checkpoint import save_model
    from sputnik.cli import main

    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=default_tokenizer.vocab_size, dim=32, n_layers=2,
                                    n_heads=4, n_kv_heads=2, inter_dim=64, max_seq_len=512))
    save_model(model, tmp_path / "tiny", default_tokenizer)
    out, report = tmp_path / "run", tmp_path / "agentic.json"
    argv = ["recipe", "--model", str(tmp_path / "tiny"), "--recipe", "toy-tools", "--task",
            "arithmetic:digits=1-2,test_digits=3,ops=*", "--tools", "calculator", "--cold-start", "8",
            "--sft-steps", "2", "--sft-batch-size", "4", "--grading", "lenient", "--prompts-per-step", "2",
            "--num-generations", "2", "--max-completion-length", "40", "--max-turns", "2", "--eval-n", "3",
            "--max-steps", "1", "--out-dir", str(out), "--report", str(report), "--no-progress"]
    assert main(argv) == 0
    entry = json.loads(report.read_text())
    assert entry == json.loads((out / "agentic.json").read_text())
    for key in ("tool_call_rate_start", "tool_call_rate_end", "accuracy_start", "accuracy_end",
                "accuracy_thinking_only", "tool_call_rate_cold_start", "accuracy_cold_start"):
        assert 0 <= entry[key] <= 1, key
    assert entry["eval_problems"] == 3 and entry["machine"] and entry["command"].startswith("sputnik ")
    assert len((out / "traces.jsonl").read_text().splitlines()) == 8
    assert (out / "sft" / "checkpoints" / "step_000002").is_dir() and (out / "tools" / "metrics.jsonl").is_file()
    capsys.readouterr()
    assert main(argv) == 0  # a rerun with the same settings reuses the cold start and the start model's evals
    said = capsys.readouterr().out
    assert said.count("reusing") == 3 and "cold start: reusing" in said
    assert main([*argv, "--sft-steps", "3"]) == 0  # a changed setting runs the stage again
    assert (out / "sft" / "checkpoints" / "step_000003").is_dir()


def test_a_call_ended_by_the_end_of_turn_token_is_not_closed_twice(default_tokenizer):
    # A malformed call may end with the model's own <|im_end|> instead of the </tool_call> stop string; the glue that
    # follows starts with <|im_end|> too, and the model must not then read two.
    from types import SimpleNamespace

    from sputnik.engine.multiturn import MultiTurn, _insert_results, _Row
    from sputnik.tools.env import ToolResult

    tok = default_tokenizer
    error = "error: the arguments are not JSON"
    glue = tool_glue([error], tok, plan_of(Environment([as_tool(calculator)]).specs(), tok))
    end = tok.token_to_id("<|im_end|>")
    assert tok.encode(glue, add_special_tokens=False)[0] == end
    engine = SimpleNamespace(tokenizer=tok, model=SimpleNamespace(cfg=SimpleNamespace(max_seq_len=512)))
    turns = {"stop string": tok.encode('<tool_call>\n{"name": "calculator"}\n</tool_call>', add_special_tokens=False),
             "end of turn": tok.encode('<tool_call>\n{"name": "calculator"', add_special_tokens=False) + [end]}
    for name, own in turns.items():
        row = _Row(MultiTurn([1, 2], list(own), [1] * len(own), [0.0] * len(own)), None, 0)
        assert _insert_results(row, [ToolResult(error, True)], glue, engine,
                               AgentConfig())
        ro = row.rollout
        assert ro.tokens.count(end) == 2, name  # the call's turn closed once, the tool message once
        assert tok.decode(ro.tokens[len(own):], skip_special_tokens=False) in (glue, glue[len("<|im_end|>"):])
        assert len(ro.tokens) == len(ro.own) == len(ro.logprobs) and ro.tool_errors == 1
