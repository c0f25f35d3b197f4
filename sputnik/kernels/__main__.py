"""`python -m sputnik.kernels`: compile the CPU kernels now (as `make model` does at install time) and say which
paths this CPU runs, or why they cannot be built (exit status 1: block weights are then dequantized)."""

import sys
import time

from sputnik import kernels

start = time.perf_counter()
if not kernels.available():
    print(f"sputnik kernels: unavailable ({kernels._ext_error}); block-format weights will be dequantized",
          file=sys.stderr)
    sys.exit(1)
print(f"sputnik kernels: ready in {time.perf_counter() - start:.1f} s at {kernels.build_dir()}; "
      f"CPU paths {', '.join(kernels.cpu_paths())}")
