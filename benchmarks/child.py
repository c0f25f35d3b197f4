"""Part of a benchmark in a child process: a crash in an anchor's native code (llama.cpp segfaulted on one Intel
machine) loses that part's figures, not the run."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_json(script: str, *args: str) -> tuple[Any, str]:
    """`python script args…`: the last line it prints, as JSON, and "ran"; or None and why not."""
    child = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if child.returncode == 0 and child.stdout.strip():
        return json.loads(child.stdout.strip().splitlines()[-1]), "ran"
    if child.returncode < 0:
        return None, f"crashed (signal {-child.returncode})"
    return None, (child.stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1]
