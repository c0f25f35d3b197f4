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
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
