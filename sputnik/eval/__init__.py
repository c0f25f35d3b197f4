"""R1-style evaluation (pass@1 over k samples, cons@k) and its reports."""

from sputnik.eval.run import EvalConfig, EvalSummary, evaluate, load_summary, majority_vote, pass_at_k, summarize

__all__ = ["EvalConfig", "EvalSummary", "evaluate", "load_summary", "majority_vote", "pass_at_k", "summarize"]
