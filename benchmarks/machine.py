"""The benchmarks' machine line: sputnik.machine, where every recorded figure gets its machine from."""

from sputnik.machine import KERNEL_FLAGS, describe, line

__all__ = ["KERNEL_FLAGS", "describe", "line"]
