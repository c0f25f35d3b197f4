"""The engine: every sampled token in sputnik comes from here."""

from sputnik.engine.generate import Completion, Delta, Engine
from sputnik.engine.sampling import SamplingParams

__all__ = ["Completion", "Delta", "Engine", "SamplingParams"]
