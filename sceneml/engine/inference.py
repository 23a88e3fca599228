"""Predictions of a model on decoded images or on cached backbone features, as float64 log-probabilities
(torchvision references/classification's ``evaluate``, without the metrics: those are :mod:`sceneml.metrics`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sceneml.engine.batches import iterate_batches
from sceneml.models import split_logits


@torch.inference_mode()
def predict_log_probs(model: nn.Module, pixels: np.ndarray, device: torch.device, batch_size: int = 256,
                      progress: bool = False, desc: str = "eval", tta: bool = False) -> np.ndarray:
    """Log-softmax (n, C) in float64, in the order of ``pixels`` (the model is put in eval mode).

    Taken from the logits in float64: a probability that would underflow to 0 in a softmax still has
    its exact log here, so a loss computed from these never hits a clipping floor. ``tta``: the log of
    the mean of the softmax of each image and of its mirror image (log-sum-exp of the two, less log 2).
    """
    model.eval()
    dummy = np.zeros(len(pixels), dtype=np.int64)
    out = []
    for x, _ in tqdm(iterate_batches(pixels, dummy, batch_size, device), desc=desc, disable=not progress,
                     leave=False, total=(len(pixels) + batch_size - 1) // batch_size):
        logits, _ = split_logits(model(x))
        log_p = torch.log_softmax(logits.double(), dim=1)
        if tta:
            mirrored = torch.log_softmax(split_logits(model(x.flip(-1)))[0].double(), dim=1)
            log_p = torch.logaddexp(log_p, mirrored) - math.log(2)
        out.append(log_p.cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def predict_scores(model: nn.Module, pixels: np.ndarray, device: torch.device, batch_size: int = 256,
                   progress: bool = False, desc: str = "eval", tta: bool = False) -> np.ndarray:
    """Softmax probabilities (n, C) as float64, in the order of ``pixels`` (``tta``: see predict_log_probs)."""
    return np.exp(predict_log_probs(model, pixels, device, batch_size, progress, desc, tta))


@torch.inference_mode()
def log_probs_from_features(head: nn.Module, features: torch.Tensor, device: torch.device,
                            batch_size: int = 4096) -> np.ndarray:
    """Log-softmax (n, C) in float64 from cached backbone features."""
    was_training = head.training
    head.eval()
    try:
        out = [torch.log_softmax(head(features[i:i + batch_size].to(device)).double(), dim=1).cpu()
               for i in range(0, len(features), batch_size)]
    finally:
        head.train(was_training)
    return torch.cat(out).numpy()
