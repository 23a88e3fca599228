"""``freeze_epochs``: a pretrained body waits while a new head learns, then every layer trains, as fastai's
``fine_tune`` (``freeze_epochs``) and Lightning's ``BackboneFinetuning`` (``unfreeze_backbone_at_epoch``) do:
a head of random weights would otherwise send large gradients into the ImageNet features first."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Unfreeze:
    """The first ``epochs`` epochs train the head alone; the body's parameters join after them."""

    epochs: int
    body: tuple[nn.Parameter, ...]

    def before_epoch(self, epoch: int) -> None:
        """Set whether the body trains in ``epoch`` (asked before every epoch, so a resume agrees)."""
        trains = epoch > self.epochs
        for param in self.body:
            param.requires_grad = trains
