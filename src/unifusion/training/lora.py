"""LoRA (Hu et al. 2021): low-rank updates W + (alpha / r) B A of a network's Linear and Conv2d
weights, B zero-initialised so training starts from the network as it was.

A small own implementation rather than `peft`: peft is not a dependency (it pulls transformers-side
packages), and its wrapper renames every parameter (base_model.model.<name>.base_layer.weight),
while the library's model folders, EMA and strict weight loading key everything by the network's
own names. Our networks are plain Linear / Conv2d modules, which is all LoRA needs. `inject`
replaces those layers in place; `merged_state_dict` folds the adapters back into the original keys,
so a fine-tuned model is saved as an ordinary model folder (`unifusion sample` / `eval` read it
unchanged); `disabled` runs the base network (the frozen reference of the KL term, with no copy).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.scale, self.enabled = base, rank, alpha / rank, True
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation

    def delta(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class LoRAConv2d(nn.Module):
    """A (rank, in, kh, kw) convolution with the base's stride / padding / dilation, then B a 1x1
    convolution (out, rank): delta W = B @ A reshaped to the base's (out, in, kh, kw)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.scale, self.enabled = base, rank, alpha / rank, True
        out_c, in_c, kh, kw = base.weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_c, kh, kw, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_c, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> Tensor:
        return (self.lora_B @ self.lora_A.flatten(1)).view_as(self.base.weight) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        b = self.base
        if isinstance(b.padding, str) or b.padding_mode != "zeros":  # rare: go through the merged delta
            return y + b._conv_forward(x, self.delta(), None)
        h = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
        return y + F.conv2d(h, self.lora_B[:, :, None, None]) * self.scale


class _Delegate:
    """The base layer's weight and bias stay readable (networks read a layer's dtype and device off them)."""

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias


for _cls in (LoRALinear, LoRAConv2d):
    _cls.weight, _cls.bias = _Delegate.weight, _Delegate.bias


def _adaptable(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1)


def inject(module: nn.Module, rank: int, alpha: float | None = None) -> list[str]:
    """Replace every nn.Linear and (ungrouped) nn.Conv2d under `module` by its LoRA wrapper and freeze
    every parameter of `module` except the adapters. Returns the wrapped layers' names."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1 (0 fine-tunes every weight), got {rank}")
    alpha = float(rank if alpha is None or alpha <= 0 else alpha)
    for p in module.parameters():
        p.requires_grad_(False)
    names = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if _adaptable(child):
                wrapper = (LoRALinear if isinstance(child, nn.Linear) else LoRAConv2d)(child, rank, alpha)
                setattr(parent, child_name, wrapper)
                names.append(f"{name}.{child_name}" if name else child_name)
    if not names:
        raise ValueError("--lora-rank: the network has no nn.Linear or nn.Conv2d layer to adapt; fine-tune every "
                         "weight with --lora-rank 0")
    return names


def layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}


class Adapters(nn.Module):
    """The adapters' A and B as one module (what the optimizer, the EMA and checkpoints hold);
    names are the layer names with '/' for '.', e.g. 'net/blocks/0/fc/A'."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.params = nn.ParameterDict()
        for n, m in layers(module).items():
            key = n.replace(".", "/")
            self.params[f"{key}/A"], self.params[f"{key}/B"] = m.lora_A, m.lora_B

    def forward(self, *a, **k):  # a container, never called
        raise NotImplementedError


def merged_state_dict(module: nn.Module, adapters: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """`module`'s state dict under its original (pre-inject) keys with every adapter folded into
    its base weight: W + scale B A. adapters: other values of A and B (e.g. their EMA), keyed as in
    Adapters; default the current ones."""
    wrapped = layers(module)
    out = {}
    for key, value in module.state_dict().items():
        owner = next((n for n in wrapped if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value.detach().clone()
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base."):
            continue  # lora_A / lora_B themselves
        if rest == "base.weight":
            m = wrapped[owner]
            if adapters is None:
                delta = m.delta().detach()
            else:
                k = owner.replace(".", "/")
                A, B = adapters[f"params.{k}/A"], adapters[f"params.{k}/B"]
                delta = (B.to(A) @ A.flatten(1)).view_as(m.base.weight) * m.scale
            value = value.detach() + delta.to(value)
        out[f"{owner}.{rest[len('base.'):]}"] = value.detach().clone()
    return out


@contextmanager
def disabled(module: nn.Module):
    """Run `module` without its adapters (the base network) inside the block."""
    wrapped = list(layers(module).values())
    before = [m.enabled for m in wrapped]
    for m in wrapped:
        m.enabled = False
    try:
        yield module
    finally:
        for m, b in zip(wrapped, before):
            m.enabled = b
