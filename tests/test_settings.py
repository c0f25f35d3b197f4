"""One config path for every verb: defaults, then --config FILE.yaml, then flags; help from the field metadata."""

from pathlib import Path

import pytest

from sputnik.cli import (ChatArgs, ConvertArgs, EvalOutput, KeysArgs, ModelArgs, PolicyArgs, PromptArgs, PullArgs,
                         SamplingArgs, TokenizerFiles, main, parse)
from sputnik.eval.run import EvalConfig
from sputnik.serve.config import ServeConfig, default_keys_path
from sputnik.tasks import get_task
from sputnik.train.distill import DistillConfig
from sputnik.train.grpo import GRPOConfig
from sputnik.train.loop import TrainConfig
from sputnik.train.nano_r1 import NanoR1Config
from sputnik.train.pretrain import ModelShape
from sputnik.train.sft import SFTConfig
from sputnik.train.tokenizer import TokenizerConfig

ROOT = Path(__file__).resolve().parent.parent


def yaml_file(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_eval_yaml_fills_the_dataclasses_and_flags_override_it(tmp_path):
    cfg = yaml_file(tmp_path, "task: countdown\nn: 12\nk: 0\ngreedy: false\ntemperature: 0.3\nmodel: m.gguf\n"
                              "out: runs/e\n")
    c = parse(["eval", "--config", cfg, "--n", "7"])
    ev = c.config(EvalConfig)
    assert (ev.task, ev.n, ev.k, ev.greedy, ev.temperature) == ("countdown", 7, 0, False, 0.3)
    assert ev.top_p == 0.95 and ev.max_tokens == 512  # untouched fields keep their defaults
    assert c.config(ModelArgs).model == "m.gguf" and c.config(EvalOutput).out == Path("runs/e")
    # The positional MODEL and --model are one setting; the command line beats the file.
    assert parse(["eval", "other", "-c", cfg]).config(ModelArgs).model == "other"
    assert parse(["eval", "-c", cfg, "--model", "third"]).config(ModelArgs).model == "third"


def test_serve_yaml_fills_serve_config_and_its_limits(tmp_path):
    cfg = yaml_file(tmp_path, "rate_limit: 5\nno_auth: true\nmax_tokens_limit: 300\nmax_n: 2\n"
                              "cors_origin: [http://a.example]\nport: 9000\nkeys: k.db\n")
    s = parse(["serve", "--config", cfg, "--port", "9001", "--cors-origin", "http://b.example"]).config(ServeConfig)
    assert (s.rate_limit, s.no_auth, s.port, s.keys) == (5.0, True, 9001, Path("k.db"))
    assert s.cors_origin == ["http://b.example"]  # a flag replaces the file's list
    assert (s.limits.max_tokens, s.limits.max_n, s.limits.max_prompt_tokens) == (300, 2, 8192)
    assert s.keys_path == Path("k.db")
    assert parse(["serve"]).config(ServeConfig).keys_path == default_keys_path()


def test_unknown_key_names_the_file_and_the_key(tmp_path, capsys):
    cfg = yaml_file(tmp_path, "port: 8001\nrate_limitt: 3\n", "serve-typo.yaml")
    with pytest.raises(ValueError, match=r"serve-typo\.yaml: unknown setting 'rate_limitt'"):
        parse(["serve", "--config", cfg])
    assert main(["eval", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "serve-typo.yaml" in err and "rate_limitt" in err


def test_bad_values_name_the_setting(tmp_path, capsys):
    cfg = yaml_file(tmp_path, "n: many\n", "bad.yaml")
    with pytest.raises(ValueError, match=r"bad\.yaml: setting n: cannot read 'many' as int"):
        parse(["eval", "--config", cfg])
    with pytest.raises(ValueError, match="setting port: cannot read 'x' as int"):
        parse(["serve", "--port", "x"])
    with pytest.raises(ValueError, match="setting no_auth: cannot read 'maybe'"):
        parse(["serve", "--no-auth", "maybe"])
    with pytest.raises(ValueError, match="setting loss_type: 'ppo' is not one of"):
        parse(["train", "grpo", "-c", yaml_file(tmp_path, "loss_type: ppo\n")])
    with pytest.raises(ValueError, match="setting prompt is required"):
        parse(["generate"])
    assert main(["serve", "--max-n", "1.5"]) == 2 and "setting max_n" in capsys.readouterr().err


def test_help_comes_from_the_field_metadata(capsys):
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "the largest max_tokens a request may ask (default: 4096)" in out
    assert "no API keys (allowed only on a loopback host)" in out
    with pytest.raises(SystemExit):
        parse(["train", "grpo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "completions per prompt (the group size G) (default: 8)" in out and out.count("(default: 8)") >= 1
    assert "optimizer steps (default: 100)" in out  # TrainConfig's fields too
    assert "minutes" not in out and "cores" not in out


def test_bool_flags_take_presence_or_a_value():
    serve = lambda *a: parse(["serve", *a]).config(ServeConfig)  # noqa: E731
    assert serve().no_auth is False and serve("--no-auth").no_auth is True
    assert serve("--no-auth", "true").no_auth is True and serve("--no-auth", "false").no_auth is False
    assert serve("--no-web").no_web is True and serve("--compile", "--port", "1").compile is True
    train = lambda *a: parse(["train", "grpo", *a])  # noqa: E731
    assert train("--fsdp", "true").config(TrainConfig).fsdp is True
    assert train("--dynamic-sampling", "true").config(GRPOConfig).dynamic_sampling is True
    assert train("--dynamic-sampling").config(GRPOConfig).dynamic_sampling is True
    assert train("--no-progress").config(TrainConfig).progress is False
    gen = parse(["generate", "-p", "x", "--json", "--chat"]).config(PromptArgs)
    assert gen.json and gen.chat
    assert parse(["eval", "--no-greedy"]).config(EvalConfig).greedy is False
    assert parse(["eval", "--greedy", "false"]).config(EvalConfig).greedy is False


def test_defaults_per_verb_and_repeatable_lists():
    gen, chat = parse(["generate", "-p", "x"]).config(SamplingArgs), parse(["chat"]).config(SamplingArgs)
    assert (gen.temperature, gen.max_tokens) == (0.0, 128) and (chat.temperature, chat.max_tokens) == (0.6, 512)
    assert parse(["generate", "-p", "x", "--stop", "a", "--stop", "b"]).config(SamplingArgs).stop == ["a", "b"]
    assert parse(["chat", "-t", "0.2"]).config(SamplingArgs).temperature == 0.2
    assert parse(["chat"]).config(SamplingArgs).stop == [] and SamplingArgs().stop == []
    grpo = parse(["train", "grpo", "--lora-target-modules", "q_proj", "v_proj", "--rewards", "{accuracy: 2}"])
    assert grpo.config(GRPOConfig).lora_target_modules == ["q_proj", "v_proj"]
    assert grpo.config(GRPOConfig).rewards == {"accuracy": 2}
    assert GRPOConfig().lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]


def test_recipe_and_distill_fields(tmp_path):
    from sputnik.train.reasoning import RecipeConfig

    for name in ("r1-zero", "r1"):
        c = parse(["recipe", "--config", str(ROOT / "recipes" / f"{name}.yaml"), "--max-steps", "2"])
        grpo, train, recipe = c.config(GRPOConfig), c.config(TrainConfig), c.config(RecipeConfig)
        assert c.config(PolicyArgs).model == "smollm2-135m-instruct" and grpo.epsilon_high == 0.28
        assert grpo.think == "open" and grpo.grading == "strict" and {"accuracy", "format"} <= set(grpo.rewards)
        assert train.max_steps == 2 and train.lr == {"r1-zero": 1e-5, "r1": 2e-5}[name] and recipe.recipe == name
        assert (recipe.cold_start > 0) == (name == "r1") and recipe.korean_task.startswith("korean-arithmetic")
        held = {p.prompt for p in get_task(grpo.task).problems("test", 200)}  # the task specs parse
        if recipe.cold_start_task:  # the cold start's traces never solve a held-out problem
            assert not held & {p.prompt for p in get_task(recipe.cold_start_task).problems("train", 800)}
    c = parse(["recipe", "--config", str(ROOT / "recipes" / "r1-tools.yaml")])
    tools, recipe = c.config(GRPOConfig), c.config(RecipeConfig)
    assert tools.tools == ["calculator"] and tools.max_turns == 3 and recipe.recipe == "r1-tools"
    assert recipe.cold_start > 0 and c.config(PolicyArgs).model == "smollm2-135m-instruct"
    get_task(tools.task).problems("test", 4)
    # distill's student and mode are settings like any other (the recipe key `model` still names the student).
    cfg = yaml_file(tmp_path, "model: student.gguf\nmode: kl\nteacher: t.gguf\nseed: 3\n")
    d = parse(["distill", "-c", cfg])
    assert (d.config(DistillConfig).student, d.config(DistillConfig).mode) == ("student.gguf", "kl")
    assert d.config(DistillConfig).seed == d.config(SFTConfig).seed == d.config(TrainConfig).seed == 3
    assert parse(["distill", "-c", cfg, "-s", "other"]).config(DistillConfig).student == "other"
    with pytest.raises(ValueError, match="setting mode: 'rl' is not one of"):
        parse(["distill", "-c", yaml_file(tmp_path, "mode: rl\n")])
    with pytest.raises(SystemExit):  # argparse checks a flag's choices itself
        parse(["distill", "--mode", "rl"])


@pytest.mark.parametrize("argv, text, cls, field, value", [
    (["pull"], "name: some-model\n", PullArgs, "name", "some-model"),
    (["generate"], "prompt: hi\nsystem: be brief\n", ChatArgs, "system", "be brief"),
    (["chat"], "top_k: 5\n", SamplingArgs, "top_k", 5),
    (["convert"], "src: a.gguf\ndst: out\n", ConvertArgs, "dst", Path("out")),
    (["eval"], "k: 1\n", EvalConfig, "k", 1),
    (["train", "tokenizer"], "files: [a.txt]\nout: tok\nvocab_size: 300\n", TokenizerConfig, "vocab_size", 300),
    (["train", "tokenizer"], "files: [a.txt, b.txt]\nout: tok\n", TokenizerFiles, "files", ["a.txt", "b.txt"]),
    (["train", "pretrain"], "dim: 32\n", ModelShape, "dim", 32),
    (["train", "sft"], "seq_len: 64\n", SFTConfig, "seq_len", 64),
    (["train", "grpo"], "beta: 0.04\n", GRPOConfig, "beta", 0.04),
    (["distill"], "n_problems: 3\n", DistillConfig, "n_problems", 3),
    (["nano-r1"], "grpo_steps: 2\n", NanoR1Config, "grpo_steps", 2),
    (["serve"], "served_name: m\n", ServeConfig, "served_name", "m"),
    (["keys"], "action: list\n", KeysArgs, "action", "list"),
])
def test_every_verb_takes_a_config_file(tmp_path, argv, text, cls, field, value):
    assert getattr(parse([*argv, "--config", yaml_file(tmp_path, text)]).config(cls), field) == value
