"""Rewards given as module:function (tests/test_finetune.py): well-formed ones and the bad ones
the fine-tuning command must refuse or skip."""
import torch


def first_coordinate(x, cond, factor=1.0):
    """factor * x[:, 0]: differentiable; `factor` comes from --reward-args."""
    return factor * x.flatten(1)[:, 0]


def wrong_shape(x, cond):
    return x.flatten(1)[:, :1]  # (B, 1) instead of (B,)


def all_nan(x, cond):
    return torch.full((len(x),), float("nan"))


def some_nan(x, cond):
    """NaN for the rows whose first coordinate is negative."""
    r = -(x.flatten(1) ** 2).sum(1)
    return torch.where(x.flatten(1)[:, 0] < 0, torch.full_like(r, float("nan")), r)


def detached(x, cond):
    return torch.as_tensor(x.detach().flatten(1).sum(1).numpy())
