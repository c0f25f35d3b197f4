"""Perplexity on a fixed text: what the blocks cost, against the dequantized model and against llama.cpp.

The default model's GGUF three ways over the same 1,328-token text (written for this benchmark, one window):
sputnik with the file's blocks as they are (what `generate`, `chat` and `serve` load: 8-bit activations for the
integer formats), sputnik with the blocks dequantized to float32 (no activation rounding: the issue's reference,
"within 1%"), and llama.cpp on the file (llama-cpp-python, the bench extra, in a child process; its own log-softmax
of its logits). Then each `--types` export of the dequantized model (`sputnik convert MODEL out.gguf --type T`), in
both engines. Per-token log-probs come from sputnik.train.perplexity (`sputnik perplexity`, one window); the
table adds the mean absolute difference of each token's log-prob from the dequantized model's, and between the two
engines on the same file.

    python benchmarks/perplexity.py [--model smollm2-135m-instruct] [--types q8_0,q4_0,q4_k]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import machine
from child import run_json
from sputnik.checkpoint import load_model
from sputnik.checkpoint.gguf_export import export_gguf
from sputnik.checkpoint.registry import resolve
from sputnik.train.perplexity import perplexity
from sputnik.tokenizer import Tokenizer

TEXT = """\
The lighthouse on the northern cape was built in 1871, after three ships were lost on the same reef in a single \
winter. Its first keeper, a retired sailor named Tomas Brandt, kept a logbook in which he wrote the weather, the \
ships that passed and the amount of oil he burned each night. The logbook survives, and historians have used it to \
reconstruct the storms of that decade with surprising precision. On calm nights he wrote only a line or two; during \
the great gale of 1874 he filled four pages, describing waves that broke over the gallery forty metres above the sea.

Bread is one of the oldest prepared foods. The simplest loaf needs only flour, water, salt and time: yeasts and \
bacteria living in the flour ferment its sugars, producing carbon dioxide that makes the dough rise and acids that \
give sourdough its sharp taste. A baker who wants a lighter crumb lets the dough rest longer in a cool place, while \
a baker in a hurry adds more yeast and keeps the dough warm. Neither method is wrong, but they produce different \
bread, and an experienced baker can tell them apart by smell alone.

To solve a linear equation such as 3x + 7 = 22, subtract seven from both sides to get 3x = 15, then divide both \
sides by three, which gives x = 5. You can check the answer by putting it back into the original equation: three \
times five is fifteen, and fifteen plus seven is twenty-two. The same two steps, undoing addition and then undoing \
multiplication, solve every equation of the form ax + b = c, as long as a is not zero.

The city council met on Tuesday evening to discuss the new bicycle lanes. Supporters argued that the lanes had \
reduced accidents on Harbour Street by a third in their first year, while several shop owners complained that the \
loss of parking spaces had cost them customers. After two hours of debate, the council voted seven to four to keep \
the lanes and to add a small car park behind the market hall. The mayor said she hoped the compromise would satisfy \
both sides, although few people left the meeting looking satisfied.

Honeybees communicate the location of food through a movement known as the waggle dance. A forager returning to the \
hive walks in a straight line while shaking her body, then circles back and repeats the run. The angle of the run \
relative to vertical tells the other bees the direction of the flowers relative to the sun, and the length of the \
waggle tells them the distance. Because the sun moves across the sky, a bee that dances for a long time slowly \
rotates her dance to keep the direction correct.

"Are you sure this is the right road?" asked Mira, looking at the map for the third time.
"Quite sure," said her brother. "The river should be on our left, and there it is."
"The map says there should be a bridge."
"Maps are sometimes wrong. Or perhaps the bridge is further ahead." He did not sound quite as sure as before, and \
when the road ended at a field of sheep twenty minutes later, neither of them said anything for a while.

A computer program is a list of instructions, but the instructions are rarely followed in the order they are \
written. Loops repeat a block of code while a condition holds, branches choose between two blocks, and functions \
let a programmer give a name to a piece of work and use it in many places. Good programs are written for people \
as much as for machines: a clear name, a short function and a comment that explains why something is done save \
hours for whoever reads the code next, and that reader is often the original author a year later.

Glaciers form where more snow falls in winter than melts in summer. Over many years the snow is pressed into ice, \
and when the ice becomes thick enough it begins to flow downhill under its own weight, usually at a few metres a \
day. As it moves, it scrapes the rock beneath it and carries stones and sand that it leaves behind when it melts. \
Many valleys in northern Europe and North America have the wide, rounded shape that only a glacier can carve, and \
the lakes in them often fill the hollows the ice left behind.

The orchestra rehearsed the symphony for six weeks before the first performance. The conductor spent most of the \
first week on the slow movement, asking the strings to play more quietly each time until the hall seemed to hold \
its breath. The brass players, who had little to do in that movement, were allowed to leave early, and they \
returned the following week to find that the tempo of the finale had been changed twice. On the night of the \
concert the audience applauded for almost ten minutes, and the review the next morning called it the finest \
performance the city had heard in years.

Saving money is easier with a simple plan. Write down what you earn in a month and what you spend, divided into \
housing, food, transport and everything else. Most people are surprised by the last category. Decide on an amount \
to save before the month begins and move it to a separate account on the day you are paid, so that it is not there \
to be spent. Even a small amount, saved every month for ten years, grows into a sum that can pay for a repair, a \
course or a long holiday without borrowing.

The first vaccines were developed long before anyone understood how the immune system works. In the late eighteenth \
century, doctors noticed that milkmaids who had caught cowpox, a mild disease, seemed protected from smallpox, a \
deadly one. Deliberately infecting people with cowpox to protect them became common within a few decades. Only much \
later did scientists learn that the body remembers the shape of a germ it has fought before and can respond faster \
the second time, which is the principle behind every vaccine used today.

When the train finally arrived, forty minutes late, the platform was so crowded that the first passengers to board \
had to squeeze past people who were trying to get off. An announcement apologised for the delay, blamed a signal \
failure near the junction, and promised that the next service would run on time. Nobody on the platform believed \
it. A student near the front of the carriage opened her laptop and went on writing her essay as if nothing had \
happened, and an old man beside her fell asleep before the doors had closed.
"""


def ppl_of(logps: list[float]) -> float:
    return math.exp(-math.fsum(logps) / len(logps))


def sputnik_logps(path: Path, ids: list[int], blocks: bool) -> list[float]:
    """log p of each token after the first (`sputnik perplexity`, one window): the file's blocks as sputnik loads
    them, or dequantized to float32."""
    return perplexity(load_model(path, quantize="auto" if blocks else "none"), ids, context=len(ids), stride=1).logprobs


def llamacpp_logps(path: str, ids: list[int]) -> list[float]:
    """The same log-probs from llama.cpp's logits (all positions, one window)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(ids) + 8, logits_all=True, verbose=False)
    llm.eval(ids)
    z = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)]


def row(logps: list[float] | None, reference: list[float], status: str = "ran") -> dict:
    if logps is None:
        return {"ppl": None, "status": status}
    ppl, ref = ppl_of(logps), ppl_of(reference)
    gap = statistics.fmean(abs(a - b) for a, b in zip(logps, reference))
    return {"ppl": round(ppl, 4), "vs_fp32": round(ppl / ref - 1, 5), "mean_abs_dlogp": round(gap, 5), "status": status}


def measure(path: Path, ids: list[int], reference: list[float]) -> dict[str, dict]:
    """One GGUF file in both engines (llama.cpp in a child process: a crash there loses its row, not the run)."""
    theirs, status = run_json(__file__, "--llamacpp-only", "--model", str(path), "--ids", json.dumps(ids))
    mine = sputnik_logps(path, ids, blocks=True)
    rows = {"sputnik": row(mine, reference), "llama.cpp": row(theirs, reference, status)}
    if theirs is not None:
        gap = statistics.fmean(abs(a - b) for a, b in zip(mine, theirs))
        rows["sputnik"]["mean_abs_dlogp_vs_llamacpp"] = round(gap, 5)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--types", default="q8_0,q4_0,q4_k", help="exports to measure too ('' for none)")
    ap.add_argument("--llamacpp-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llamacpp_only:
        print(json.dumps(llamacpp_logps(args.model, json.loads(args.ids))))
        return

    path = resolve(args.model)
    tok = Tokenizer.load(path)
    ids = tok.encode(TEXT)
    reference = sputnik_logps(path, ids, blocks=False)
    rows = {f"{path.name} (as shipped)": measure(path, ids, reference)}
    with tempfile.TemporaryDirectory() as tmp:
        dense = load_model(path)
        for kind in [t for t in args.types.split(",") if t]:
            out = Path(tmp) / f"export-{kind}.gguf"
            export_gguf(dense, tok, out, kind)
            rows[f"sputnik convert --type {kind}"] = measure(out, ids, reference)

    print(f"\nperplexity over a fixed text of {len(ids)} tokens; the dequantized float32 model: "
          f"{ppl_of(reference):.3f}")
    print(machine.line())
    print(f"{'file':<46}{'engine':<11}{'perplexity':>11}{'vs fp32':>9}{'|dlogp| vs fp32':>17}{'vs llama.cpp':>14}")
    for name, engines in rows.items():
        for engine, r in engines.items():
            if r["ppl"] is None:
                print(f"{name:<46}{engine:<11}  {r['status'][:40]}")
            else:
                other = r.get("mean_abs_dlogp_vs_llamacpp")
                print(f"{name:<46}{engine:<11}{r['ppl']:>11.3f}{r['vs_fp32']:>+9.2%}{r['mean_abs_dlogp']:>17.4f}"
                      f"{'' if other is None else f'{other:.4f}':>14}")
    shipped = next(iter(rows.values()))
    figures = {"tokens": len(ids), "fp32_ppl": round(ppl_of(reference), 4),
               "q_ppl": shipped["sputnik"]["ppl"], "q_ppl_vs_fp32": shipped["sputnik"]["vs_fp32"],
               "llamacpp_ppl": shipped["llama.cpp"]["ppl"], "llamacpp_ppl_vs_fp32": shipped["llama.cpp"].get("vs_fp32"),
               "llamacpp": shipped["llama.cpp"]["status"],
               "q_mean_abs_dlogp_vs_llamacpp": shipped["sputnik"].get("mean_abs_dlogp_vs_llamacpp"),
               "exports": {k.split()[-1]: v for k, v in list(rows.items())[1:]}, "machine": machine.describe()}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
