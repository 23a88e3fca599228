"""The training core without MLflow: the checkpoint saver, the evaluator, the budget planner, early
stopping, and the epoch loop with the recorder that records nothing (library use)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score

from sceneml.data import PreparedData, SplitData
from sceneml.engine.batches import Augmentation
from sceneml.engine.budget import BudgetPlan
from sceneml.engine.early_stop import EarlyStop
from sceneml.engine.evaluator import validate
from sceneml.engine.fit import Fit
from sceneml.engine.loop import EpochTrainer, LrSchedule, Optimisation, seed_everything
from sceneml.engine.optim import build_optimizer, build_scheduler
from sceneml.engine.recorder import Recorder
from sceneml.engine.saver import CheckpointSaver, TrainState
from sceneml.models import build_model
from sceneml.scores import scores_from_csv

CLASSES = ["a", "b", "c"]


def _data(n_per_class: int = 12, size: int = 32) -> PreparedData:
    """Three classes that differ in mean colour, plus noise: ResNet18 tells them apart within 3 epochs."""
    rng = np.random.default_rng(0)

    def split(n: int, name: str) -> SplitData:
        labels = np.repeat(np.arange(3), n)
        base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[labels][:, None, None, :]
        pixels = np.clip(base + rng.normal(0, 40, (len(labels), size, size, 3)), 0, 255).astype(np.uint8)
        return SplitData([f"{name}/{i}.png" for i in range(len(labels))], labels.astype(np.int64), pixels)

    splits = {"train": split(n_per_class, "train"), "val": split(n_per_class // 2, "val"), "test": split(2, "test")}
    return PreparedData(None, CLASSES, size, "", "digest", splits)


def _trainer(data: PreparedData, ema: float = 0.0, epochs: int = 3) -> EpochTrainer:
    seed_everything(0)
    model, _ = build_model("resnet18", 3, "none")
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer("adamw", model.parameters(), 2e-3, 0.9, 0.0)
    schedule = LrSchedule(build_scheduler("cosine", optimizer, epochs))
    return EpochTrainer("resnet18", data, model, optimizer, schedule, torch.device("cpu"), None,
                        Optimisation(batch_size=8, ema=ema, seed=0), Augmentation(mixup_alpha=0.2, num_classes=3))


def test_the_saver_puts_back_every_state_and_keeps_the_checkpoints_keep_says(tmp_path):
    data = _data()
    trainer = _trainer(data, ema=0.5)
    trainer.train_pass(1, 3)
    history = [{"epoch": e, "val_mean_class_acc": acc, "val_loss": 1.0} for e, acc in ((1, 0.5), (2, 0.7), (3, 0.6))]
    state = TrainState(3, history, [(1, 2.0), (2, 1.5)], {1: "m1", 2: "m2", 3: "m3"}, "path,label\n")
    saver = CheckpointSaver(tmp_path / "last.pt", keep="best")
    saver.save(trainer, state)
    fresh = _trainer(data, ema=0.5)
    restored = saver.restore(fresh)
    assert restored == state  # epoch ids come back as ints, batch losses as tuples
    for a, b in ((trainer.model, fresh.model), (trainer.ema, fresh.ema)):
        for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), key
    assert fresh.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"] > 0
    assert fresh.schedule.scheduler.last_epoch == trainer.schedule.scheduler.last_epoch == 1
    # retention: best keeps epoch 2 alone; improved drops the newest when it did not improve; all drops none
    assert saver.prune(dataclasses.replace(state, models=dict(state.models))) == ["m1", "m3"]
    improved = CheckpointSaver(tmp_path / "x.pt", keep="improved")
    assert improved.prune(dataclasses.replace(state, models=dict(state.models))) == ["m3"]
    assert improved.prune(dataclasses.replace(state, history=history[:2], models={1: "m1", 2: "m2"})) == []
    assert CheckpointSaver(tmp_path / "y.pt", keep="all").prune(state) == [] and len(state.models) == 3


def test_the_evaluator_metrics_are_what_sklearn_makes_of_its_scores_file():
    trainer = _trainer(_data())
    trainer.train_pass(1, 3)
    val = validate(trainer)
    paths, labels, scores, classes, _ = scores_from_csv(val.scores_csv)
    split = trainer.data.splits["val"]
    assert paths == split.paths and list(labels) == list(split.labels) and classes == CLASSES
    assert val.metrics["val_acc"] == pytest.approx(accuracy_score(labels, scores.argmax(1)), abs=1e-12)
    aps = [average_precision_score(labels == k, scores[:, k]) for k in range(3)]
    assert val.metrics["val_mAP"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert val.metrics["val_loss"] == pytest.approx(-np.mean(np.log(scores[np.arange(len(labels)), labels])),
                                                    rel=1e-6)


def test_the_budget_plans_at_the_pace_after_the_first_epoch_and_a_resumed_plan_stays():
    plan = BudgetPlan(budget_s=100.0, started=0.0, steps_per_epoch=10)
    assert plan.last_epoch(1) == 1  # the first epoch measures
    # 30 s epoch, 30 s in: 100 - 30 - 3 (a tenth of an epoch kept) leaves room for 2 more
    assert plan.after_epoch(1, 30.0, now=30.0) == 3
    # the second took 10 s: the pace leaves out the first (one-time costs), 100 - 40 - 1 fits 5 more
    assert plan.after_epoch(2, 10.0, now=40.0) == 7 and plan.pace == 10.0
    # the 3-epoch line fell from 1 at step 10 to 0 at step 30: the 7-epoch one turns at its 0.5 at step 20
    assert plan.factor(20) == pytest.approx(0.5) and plan.factor(45) == pytest.approx(0.25)
    resumed = BudgetPlan(budget_s=100.0, started=0.0, steps_per_epoch=10)
    resumed.resume(7, 20, 0.4)
    assert resumed.after_epoch(3, 50.0, now=95.0) == 7  # kept, however slow the epoch
    assert resumed.factor(20) == pytest.approx(0.4) and resumed.factor(70) == 0.0


def test_head_only_epochs_spend_the_budget_without_setting_its_pace():
    plan = BudgetPlan(budget_s=100.0, started=0.0, steps_per_epoch=10)
    # a 5 s head-only epoch plans nothing: 19 more such epochs would "fit", but the body's epochs are slower
    assert plan.after_epoch(1, 5.0, now=5.0, measures=False) == 0 and plan.last_epoch(2) == 2
    # the first epoch of every layer took 30 s, 35 s in: 100 - 35 - 3 leaves room for 2 more
    assert plan.after_epoch(2, 30.0, now=35.0) == 4 and plan.pace == 30.0
    assert plan.factor(20) == 1.0 and plan.factor(30) == pytest.approx(0.5)
    spent = BudgetPlan(budget_s=100.0, started=0.0, steps_per_epoch=10)
    assert spent.after_epoch(1, 120.0, now=120.0, measures=False) == 1  # the budget is gone: no second epoch


def test_early_stop_names_the_epoch_once_the_best_is_patience_behind():
    rows = [{"epoch": e, "val_mean_class_acc": a, "val_loss": 1.0} for e, a in ((1, 0.5), (2, 0.8), (3, 0.7))]
    assert EarlyStop("val_mean_class_acc", 2).stopped_at(rows) is None
    assert EarlyStop("val_mean_class_acc", 1).stopped_at(rows) == 3
    assert EarlyStop("val_mean_class_acc", 0).stopped_at(rows) is None  # off


class _Listing(Recorder):
    """The silent recorder, listing what the loop tells it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def log_epoch(self, history, scores_csv, model_id):
        self.calls.append(("epoch", history[-1]["epoch"], model_id))

    def drop_models(self, model_ids):
        self.calls.append(("drop", *model_ids))


@pytest.mark.slow
def test_the_loop_trains_without_tracking_and_a_resume_from_the_saver_equals_a_straight_run(tmp_path):
    data = _data()
    straight, recorder = TrainState(), _Listing()
    Fit(_trainer(data), recorder, CheckpointSaver(tmp_path / "a.pt", keep="all"), epochs=3)(straight)
    assert [r["epoch"] for r in straight.history] == [1, 2, 3]
    assert [c for c in recorder.calls if c[0] == "epoch"] == [("epoch", e, f"epoch-{e}") for e in (1, 2, 3)]
    assert straight.history[-1]["val_acc"] > 1 / 3 + 0.25  # three colours: well above chance
    assert [s for s, _ in straight.batch_losses] == list(range(1, len(straight.batch_losses) + 1))
    # two epochs, then a fresh process's trainer restored from the saved state runs the third
    saver = CheckpointSaver(tmp_path / "b.pt", keep="all")
    first = Fit(_trainer(data), Recorder(), saver, epochs=2)(TrainState())
    assert first.epoch == 2
    resumed_trainer = _trainer(data)
    state = saver.restore(resumed_trainer)
    Fit(resumed_trainer, Recorder(), saver, epochs=3)(state)
    assert json.dumps(state.history) == json.dumps(straight.history)
    assert state.batch_losses == straight.batch_losses


@pytest.mark.slow
def test_the_loop_asks_early_stop_before_each_epoch_and_on_epoch_after_it(tmp_path):
    data = _data()
    # patience 1 with a metric that cannot improve after epoch 1 (identical rows are ties: the first wins)
    state = TrainState(1, [{"epoch": 1, "val_mean_class_acc": 1.0, "val_loss": 0.0}])
    stopped = Fit(_trainer(data), Recorder(), CheckpointSaver(tmp_path / "c.pt"), epochs=5,
                  early_stop=EarlyStop("val_mean_class_acc", 1))(state)
    assert stopped.epoch == 2  # epoch 2 ran (the best, 1, was 0 behind), then 1 behind: stop
    seen = []
    pruned = Fit(_trainer(data), Recorder(), CheckpointSaver(tmp_path / "d.pt"), epochs=5,
                 on_epoch=lambda epoch, row: seen.append(epoch) or epoch == 2)(TrainState())
    assert pruned.epoch == 2 and seen == [1, 2]


def test_freeze_epochs_keep_the_body_still_while_the_head_learns_then_both_train_at_their_lrs(tmp_path):
    """freeze_epochs=1 with the body at a quarter of the head's lr (the finetune recipe's shape): after
    epoch 1 every body tensor is where it started and the head moved; after epoch 2 the body moved too,
    and the optimizer's two groups kept their 4:1 ratio under the schedule."""
    from sceneml.engine.unfreeze import Unfreeze
    from sceneml.models import head_and_body

    data = _data()
    trainer = _trainer(data)
    head, body = head_and_body("resnet18", trainer.model)
    optimizer = build_optimizer("adamw", [{"params": head, "lr": 2e-3}, {"params": body, "lr": 5e-4}], 2e-3, 0.9,
                                0.0)
    trainer = dataclasses.replace(trainer, optimizer=optimizer,
                                  schedule=LrSchedule(build_scheduler("cosine", optimizer, 3)))
    start = [p.detach().clone() for p in (*head, *body)]
    fit = Fit(trainer, Recorder(), CheckpointSaver(tmp_path / "u.pt"), epochs=1, unfreeze=Unfreeze(1, tuple(body)))
    fit(state := TrainState())
    moved = [not torch.equal(p, s) for p, s in zip((*head, *body), start)]
    assert any(moved[:len(head)]) and not any(moved[len(head):])
    fit.epochs = 2
    fit(state)
    assert sum(not torch.equal(p, s) for p, s in zip(body, start[len(head):])) > len(body) // 2
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[0] == pytest.approx(4 * lrs[1]) and lrs[0] < 2e-3
