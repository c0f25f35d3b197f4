"""Deriving reproducible seeds for the parts of a run (a prompt's samples, a step's rollouts, an epoch's order)."""

from __future__ import annotations

# A prime multiplier, so runs with neighbouring seeds do not share the streams of their parts.
SPREAD = 1_000_003


def mix(seed: int, *parts: int, bits: int | None = None) -> int:
    """`seed` spread apart, plus the parts that tell one stream from another (each caller weights its parts), reduced
    to `bits` bits when the consumer wants a bounded seed (None: as is)."""
    mixed = seed * SPREAD + sum(parts)
    return mixed if bits is None else mixed % 2**bits
