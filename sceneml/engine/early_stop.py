"""``early_stop``: training ends once the best epoch by the select metric is ``patience`` epochs behind."""

from __future__ import annotations

from dataclasses import dataclass

from sceneml.metrics import patience_ran_out


@dataclass(frozen=True)
class EarlyStop:
    metric: str
    patience: int  # 0 = off

    def stopped_at(self, history: list[dict]) -> int | None:
        """The epoch training stops after (the newest), or None to go on. Asked before each epoch, so a run
        resumed after its deciding epoch stops too."""
        if patience_ran_out(history, self.metric, self.patience):
            return history[-1]["epoch"]
        return None
