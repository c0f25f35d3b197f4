"""Runs a script under `torchrun --nproc_per_node N` (gloo on CPU) for the multi-process equality tests."""

import os
import subprocess
import sys
from pathlib import Path

from live import free_port

TESTS = Path(__file__).resolve().parent


def torchrun(script: Path, nproc: int = 2) -> None:
    """Run script on nproc processes from the repository root; fail with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)],
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _checkout_first()})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def write_shared(path: Path, text: str) -> None:
    """Write a file every rank of a torchrun script writes alike: aside, then renamed into place, so no rank reads
    another's half-written file (a rank that read an empty task file once failed CI)."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    part.write_text(text)
    os.replace(part, path)


def _checkout_first() -> str:
    """The checkout under test ahead of the rest of the path: a script outside the repository would otherwise import
    the package the environment installed (another checkout, for an editable install in a git worktree)."""
    return os.pathsep.join(p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH")) if p)


def assert_two_equal_one(two: Path, one: Path, model, atol: float = 1e-5) -> tuple[list[dict], list[dict]]:
    """The two-process run's step-2 checkpoint holds `model`'s weights (trained by the one-process run) to atol, and
    both runs logged the same losses; returns both runs' metric rows (two, one)."""
    import json

    import pytest
    import torch

    from sputnik.checkpoint import load_state

    _, got, _ = load_state(two / "checkpoints" / "step_000002")
    for name, t in model.state_dict().items():
        if name in got:
            torch.testing.assert_close(got[name], t, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (two, one)]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-5)
    return rows[0], rows[1]
