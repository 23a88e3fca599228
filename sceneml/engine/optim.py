"""The optimizers and LR schedules a run can take (torchvision references/classification's ``--opt``,
``--lr-scheduler`` and ``--lr-warmup-epochs``), and the EMA of the weights (``--model-ema``)."""

from __future__ import annotations

import torch
from torch import nn

from sceneml.config import OPTIMIZERS, SCHEDULERS
from sceneml.errors import SceneMLError


def build_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """The ``--opt`` switch of torchvision's references/classification, for the optimizers we sweep.
    ``params``: tensors (those that require a gradient are trained) or param groups (dicts, each with its
    own ``lr``).

    Adam, AdamW and SGD take torch's fused kernel (one pass over all parameters, on the CPU too): the
    same update to float rounding, in a fraction of the time of the per-parameter loop
    (benchmarks/optimizer_step.py measures it). RMSprop has no fused kernel: it takes the multi-tensor one."""
    params = [p for p in params if isinstance(p, dict) or p.requires_grad]  # param groups (dicts) as given
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    fused = all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0, fused=fused)
    if name == "rmsprop":
        # eps/alpha as in torchvision's references (TF-style RMSprop)
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   eps=0.0316, alpha=0.9, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    raise SceneMLError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


WARMUP_START = 0.01  # the first warmup epoch's share of lr (torchvision's --lr-warmup-decay)


PER_STEP_SCHEDULERS = ("onecycle",)  # stepped after every optimizer step; the others once per epoch


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0,
                    steps_per_epoch: int = 1):
    """An LR schedule, or None: ``warmup_epochs`` of linear warmup from ``WARMUP_START`` x lr, then
    ``name`` over the remaining epochs, as torchvision's references do, stepped once per epoch; or
    ``onecycle`` (Smith's 1cycle, torch's OneCycleLR with its defaults: up from lr/25 over the first 30 %
    of the steps, then down to lr/25e4, both along a half cosine), stepped after each of the
    ``epochs * steps_per_epoch`` steps."""
    lr_sched = torch.optim.lr_scheduler
    rest = epochs - warmup_epochs
    if name == "onecycle":  # its own warmup: a config with warmup_epochs too is refused where it is built
        # the momentum stays the optimizer's own (its `momentum` param) rather than cycling
        return lr_sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                   total_steps=epochs * steps_per_epoch, cycle_momentum=False)
    if name == "none":
        main = None
    elif name == "cosine":
        main = lr_sched.CosineAnnealingLR(optimizer, T_max=rest)
    elif name == "step":
        main = lr_sched.StepLR(optimizer, step_size=max(1, rest // 3), gamma=0.1)
    elif name == "linear":  # to zero when the last epoch ends (the budgeted-training schedule)
        main = lr_sched.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=rest)
    else:
        raise SceneMLError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if warmup_epochs == 0:
        return main
    warmup = lr_sched.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup_epochs)
    if main is None:
        return warmup
    return lr_sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torchvision's --model-ema: a copy of ``model`` whose weights (and BatchNorm buffers) follow
    ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; the first update copies
    the weights."""
    swa = torch.optim.swa_utils
    return swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay), use_buffers=True)
