"""``time_budget``: how many epochs fit in the minutes given, and the lr line that ends with them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# How far past its budget a time_budget run may end its last epoch, rather than stop with the lr above 0
# (the whole process may overshoot its budget by a tenth, plus a minute for start-up and the end)
OVERRUN = 1.1


@dataclass
class BudgetPlan:
    """``time_budget``: how many epochs fit, and the lr factor of each optimizer step. ``epochs`` is 0 until
    the first epoch has measured how long an epoch takes (training, validation, checkpoint and logging);
    until then the lr stays at its full value, afterwards it falls linearly to 0 at the end of the last
    epoch, the schedule of Li, Yumer & Ramanan's "Budgeted Training" (ICLR 2020). Each later epoch may
    move that end (more epochs when they run faster than planned, fewer when slower): the line then
    turns where it is, at ``anchor_step`` and ``anchor_factor``, and falls from there to 0 at the new end."""

    budget_s: float
    started: float  # time.monotonic() when the task started
    steps_per_epoch: int
    epochs: int = 0
    anchor_step: int = 0
    anchor_factor: float = 1.0
    seconds: list[float] = field(default_factory=list)  # this process's epochs, as measured
    fixed: bool = False  # a resumed run keeps the plan its checkpoint was made under

    def last_epoch(self, current: int) -> int:
        """The plan's last epoch, or ``current`` while the first epoch measures."""
        return self.epochs or current

    @property
    def pace(self) -> float:
        """Seconds an epoch takes, from the epochs so far. It leaves out the first epoch once a second has
        run: the first also pays one-time costs (kernel selection, the first checkpoint), and counting it
        would end runs early."""
        measured = self.seconds[1:] or self.seconds
        return sum(measured) / len(measured)

    def after_epoch(self, done: int, epoch_seconds: float, now: float | None = None, measures: bool = True) -> int:
        """Epoch ``done`` took ``epoch_seconds`` (its whole wall time): the epochs that fit now. An epoch that
        does not ``measure`` (a head-only epoch of ``freeze_epochs``, several times cheaper than the epochs that
        train every layer) spends the budget but sets no pace: the plan waits for the first epoch that does,
        unless the budget is already spent."""
        if not measures and not self.fixed:
            now = time.monotonic() if now is None else now
            if now - self.started >= self.budget_s:
                self.keep(done, done * self.steps_per_epoch)
            return self.epochs
        self.seconds.append(epoch_seconds)
        return self.epochs if self.fixed else self.fit(done, self.pace, now)

    def resume(self, epochs: int, step: int, factor: float) -> None:
        """A resumed run keeps its plan (``epochs``) and its lr line, from ``factor`` at ``step`` to 0."""
        self.keep(epochs, step, factor)
        self.fixed = True

    def factor(self, step: int) -> float:
        if not self.epochs:
            return 1.0
        end = self.epochs * self.steps_per_epoch
        if end <= self.anchor_step:
            return 0.0
        return self.anchor_factor * max(0.0, (end - step) / (end - self.anchor_step))

    def fit(self, done: int, epoch_seconds: float, now: float | None = None) -> int:
        """The epochs that fit once ``done`` epochs are over, an epoch taking ``epoch_seconds`` from now on
        (at least ``done``; a tenth of an epoch is kept for the run's end). A finished plan stays as it is.
        When not one more epoch fits, one more still runs if it ends within ``OVERRUN`` times the budget: the lr
        has not reached 0 yet (the line ends with the last planned epoch), and stopping would keep weights
        that were never annealed."""
        if self.epochs and done >= self.epochs:
            return self.epochs  # the line has reached 0: more epochs would train at lr 0
        now = time.monotonic() if now is None else now
        left = self.budget_s - (now - self.started) - 0.1 * epoch_seconds
        fits = done + max(0, int(left // epoch_seconds))
        if fits == done and now - self.started + epoch_seconds <= OVERRUN * self.budget_s:
            fits = done + 1
        if fits != self.epochs:
            self.keep(fits, done * self.steps_per_epoch)
        return self.epochs

    def keep(self, epochs: int, step: int, factor: float | None = None) -> None:
        """End the line after ``epochs`` epochs, turning it at ``step`` where its factor is ``factor`` (by
        default the current line's there; a resumed run passes the factor its checkpoint holds)."""
        self.anchor_factor = self.factor(step) if factor is None else factor
        self.anchor_step, self.epochs = step, epochs
