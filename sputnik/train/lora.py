"""LoRA: low-rank adapters on chosen linear layers, trained while the base weights stay frozen; checkpoint.save_model
folds them into the weights (merged_weight)."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ, with W frozen. B starts at zero, so training starts from the base model."""

    r: int
    scale: float

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scale


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """Freeze every parameter and put trainable adapters on the nn.Linear layers whose name ends with a target.

    Returns the number of trainable parameters. The layers stay in place (same names), so HF-named weights still
    load into them; the adapters add `lora_A` / `lora_B` beside each `weight`.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    pattern = re.compile(r"(^|\.)(" + "|".join(map(re.escape, targets)) + r")$")
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not pattern.search(name):
            continue
        module.__class__ = LoRALinear
        module.r, module.scale = r, alpha / r
        w = module.weight
        module.lora_A = nn.Parameter(torch.empty(r, w.shape[1], device=w.device, dtype=w.dtype))
        module.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
        count += module.lora_A.numel() + module.lora_B.numel()
    if count == 0:
        raise ValueError(f"LoRA: no nn.Linear layer matches targets {targets}")
    return count
