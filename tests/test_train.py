"""The `train` entry point: the logging contract, recomputable metrics, determinism, resume, bad params."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from sklearn.metrics import average_precision_score

from sceneml.config import TrainConfig
from sceneml.data.sources import cache_dir
from sceneml.engine.saver import superseded_epochs
from sceneml.errors import SceneMLError
from sceneml.scores import scores_from_csv
from sceneml.tasks.train import train

from .conftest import REPO, new_store, subprocess_env, using_store
from .faults import injected

CLASSES = ["buildings", "forest", "glacier", "mountain", "sea", "street"]
EPOCH_KEYS = ["train_loss", "val_loss", "val_acc", "val_mAP", "val_mean_class_acc", "lr",
              *[f"val_ap_{c}" for c in CLASSES], *[f"val_acc_{c}" for c in CLASSES]]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, hermetic_env):
    """One real `.venv/bin/mlflow run . -e train` in a temporary sqlite store, shared by the tests below,
    as a user runs it without activating the venv: the venv not on PATH, and no ImageNet file for
    `weights=auto`; one recipe parameter given (label_smoothing), which MLproject does not list. Returns
    (tracking uri, the run, the finished process)."""
    tmp = tmp_path_factory.mktemp("cli-train")
    uri = new_store(tmp)
    exp_id = MlflowClient(uri).create_experiment("train-test", artifact_location=(tmp / "artifacts").as_uri())
    env = {k: v for k, v in subprocess_env().items() if k != "VIRTUAL_ENV"}
    env.update(PATH="/usr/bin:/bin", MLFLOW_TRACKING_URI=uri, TORCH_HOME=str(tmp / "empty-torch-home"))
    proc = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "train",
                           "--env-manager", "local", "--experiment-id", exp_id, "-P", "data=synthetic:80",
                           "-P", "epochs=3", "-P", "weights=auto", "-P", "keep_checkpoints=all",
                           "-P", "label_smoothing=0.05"],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = MlflowClient(uri).search_runs([exp_id])
    assert len(runs) == 1
    with using_store(uri, tmp):
        yield uri, runs[0], proc


@pytest.mark.slow
def test_cli_run_beats_chance_and_logs_every_key_with_its_steps(cli_run):
    uri, run, _ = cli_run
    client = MlflowClient(uri)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["val_mean_class_acc_best"] >= 0.6, metrics["val_mean_class_acc_best"]  # chance is 1/6
    for key in EPOCH_KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    batches = client.get_metric_history(run.info.run_id, "train_batch_loss")
    steps_per_epoch = math.ceil(int(run.data.params["n_train"]) / 32)
    assert sorted(m.step for m in batches) == list(range(1, 3 * steps_per_epoch + 1))
    for key in ("best_epoch", "val_mean_class_acc_best", "val_mAP_best", "val_acc_best", "val_loss_best"):
        assert key in metrics
    params = run.data.params
    assert json.loads(params["classes"]) == CLASSES and params["num_classes"] == "6"
    assert int(params["n_train"]) + int(params["n_val"]) + int(params["n_test"]) == 480
    assert params["weights_resolved"] == "none" and params["images_skipped"] == "0"
    # a recipe parameter given with -P is logged as given, the others with the recipe's value, by the run
    assert (params["recipe"], params["label_smoothing"], params["lr"], params["batch_size"], params["image_size"]) \
        == ("classic", "0.05", "0.001", "32", "0")
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [params["data_digest"]]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {f"figures/{n}.png" for n in ("loss_curves", "val_per_class_ap", "val_per_class_acc",
                                                      "val_scores_per_epoch", "val_confusion_matrix")}
    history = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/history.csv"))))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3] and set(EPOCH_KEYS) <= set(history[0])
    manifest = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/split_manifest.csv")
    assert manifest.startswith("path,label,split\n") and manifest.count("\n") == 481


@pytest.mark.slow
def test_one_logged_model_per_epoch_and_the_best_is_tagged(cli_run):
    _, run, _ = cli_run
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    by_epoch = {int(m.tags["sceneml.epoch"]): m for m in models}
    assert sorted(by_epoch) == [1, 2, 3]
    best = int(run.data.metrics["best_epoch"])
    assert [e for e, m in by_epoch.items() if m.tags.get("sceneml.best") == "true"] == [best]
    client = MlflowClient()
    for epoch, model in by_epoch.items():
        # every val metric of the epoch is linked to its checkpoint (MLflow itself also copies any
        # un-attributed run metric logged at the same step, e.g. train_batch_loss of batch `epoch`)
        linked = {m.key: m.value for m in model.metrics if m.key.startswith("val_")}
        assert len(linked) == 5 + 2 * len(CLASSES)  # loss, acc, mAP, mean class acc, ece; per class
        for key, value in linked.items():
            assert value == [h.value for h in client.get_metric_history(run.info.run_id, key) if h.step == epoch][0]


@pytest.mark.slow
def test_logged_ap_equals_recomputation_from_saved_val_scores(cli_run):
    _, run, _ = cli_run
    client = MlflowClient()
    for epoch in (1, 2, 3):
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/val_scores/epoch_{epoch:03d}.csv")
        _, y_true, scores, classes, _ = scores_from_csv(text)
        assert len(y_true) == int(run.data.params["n_val"])
        # sklearn's AP of each class, one-vs-rest, straight from the file (not sceneml.metrics)
        ap = [average_precision_score(y_true == k, scores[:, k]) for k in range(len(classes))]
        for c, value in zip(classes, ap):
            logged = [m.value for m in client.get_metric_history(run.info.run_id, f"val_ap_{c}") if m.step == epoch]
            assert logged[0] == pytest.approx(value, abs=1e-6)
        logged_map = [m.value for m in client.get_metric_history(run.info.run_id, "val_mAP") if m.step == epoch]
        assert logged_map[0] == pytest.approx(float(np.mean(ap)), abs=1e-6)


def _epoch_metrics(run_id: str) -> dict[tuple[str, int], float]:
    client = MlflowClient()
    return {(k, m.step): m.value for k in EPOCH_KEYS for m in client.get_metric_history(run_id, k)}


@pytest.mark.slow
def test_same_seed_same_metrics_and_resume_matches_a_straight_run(tracking_uri, monkeypatch):
    """Also the cosine schedule across the resume: the logged lr of each epoch is its closed form; the EMA
    weights (validated, so in every val metric), TrivialAugment, MixUp/CutMix and random erasing continue
    exactly; and
    MLflow's system metrics, sampled every second here, continue their steps across the resume."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = dict(data="synthetic:30", epochs=3, weights="none", batch_size=16, quiet=True, device="cpu",
               image_size=32, arch="mobilenet_v3_small", scheduler="cosine", lr=0.002, ema=0.8, mixup_alpha=0.2,
               cutmix_alpha=1.0, random_erase=0.25, auto_augment="trivial")
    straight = train(TrainConfig(**cfg))
    steps_per_epoch = -(-int(MlflowClient().get_run(straight).data.params["n_train"]) // 16)
    with injected(SCENEML_FAULT_AT_STEP=f"{steps_per_epoch + 2}:interrupt"), pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg))  # Ctrl-C in epoch 2
    stopped = MlflowClient().search_runs([mlflow.get_experiment_by_name("Default").experiment_id],
                                         filter_string="attributes.status = 'KILLED'")[0].info.run_id
    assert {s for _, s in _epoch_metrics(stopped)} == {1}
    resumed = train(TrainConfig(**cfg, resume=stopped))
    assert resumed == stopped
    a, b = _epoch_metrics(straight), _epoch_metrics(resumed)
    assert a.keys() == b.keys() and len(a) == 3 * len(EPOCH_KEYS)
    assert a == b  # bit-identical on CPU: same seed, and resume restores model, optimizer and RNG state
    assert [b[("lr", e)] for e in (1, 2, 3)] == pytest.approx([0.002 * (1 + math.cos(math.pi * t / 3)) / 2
                                                               for t in range(3)], rel=1e-9)
    assert MlflowClient().get_run(resumed).info.status == "FINISHED"
    for run_id in (straight, resumed):
        cpu = MlflowClient().get_metric_history(run_id, "system/cpu_utilization_percentage")
        steps = [m.step for m in cpu]
        assert cpu and all(0 <= m.value <= 100 * os.cpu_count() for m in cpu)
        assert len(steps) == len(set(steps))  # the resumed process went on from the killed one's last step
    other = _epoch_metrics(train(TrainConfig(**{**cfg, "epochs": 1}, seed=7)))
    assert other[("val_loss", 1)] != a[("val_loss", 1)]  # a different seed gives a different run


@pytest.mark.parametrize("bad,match", [
    (dict(arch="vgg16"), "unknown arch 'vgg16'; choose one of resnet18"),
    (dict(optimizer="lion"), "unknown optimizer 'lion'; choose one of adamw, adam, rmsprop, sgd"),
    (dict(lr=-1.0), "lr must be > 0"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(scheduler="warm"), "choose one of none, cosine, step"),
    (dict(device="tpu"), "unknown device 'tpu'; choose auto, cpu or cuda"),
    (dict(seed=-5), r"seed must be in 0 .. 2\*\*32 - 1"),
    (dict(seed=2**32), r"seed must be in 0 .. 2\*\*32 - 1"),
    (dict(batch_size=1), "batch_size must be >= 2"),
    (dict(early_stop=-1), "early_stop must be >= 0"),
    (dict(random_erase=1.5), r"random_erase is a probability in \[0, 1\]"),
    (dict(cutmix_alpha=-1.0), "cutmix_alpha must be >= 0"),
    (dict(ema=1.0), r"ema is a decay in \[0, 1\)"),
    (dict(time_budget=5, scheduler="cosine"), "time_budget shapes the lr schedule itself"),
    (dict(time_budget=-1), "time_budget is in minutes"),
    (dict(train_crop_size=48), "train_crop_size is the side of the random-resized crops: >= 32 with random_crop=true"),
    (dict(train_crop_size=16, random_crop=True), "got 16 with random_crop=True"),
    (dict(freeze_backbone=True, mixup_alpha=0.2), "act on images, which freeze_backbone replaces by cached features"),
])
def test_bad_values_fail_before_training(bad, match):
    with pytest.raises(SceneMLError, match=match):
        TrainConfig(**bad)


def test_a_last_batch_of_one_image_is_dropped_not_handed_to_batchnorm(tracking_uri):
    # synthetic:30 gives 126 training images: at batch_size 25, five batches and a last one of a single image
    cfg = TrainConfig(data="synthetic:30", epochs=1, batch_size=25, image_size=32, weights="none", quiet=True)
    run = MlflowClient().get_run(train(cfg))
    assert int(run.data.params["n_train"]) % 25 == 1
    steps = MlflowClient().get_metric_history(run.info.run_id, "train_batch_loss")
    assert len(steps) == int(run.data.params["n_train"]) // 25  # the batch of one made no step
    assert run.info.status == "FINISHED"


def test_train_crop_size_trains_on_crops_of_that_size_and_validates_at_image_size(tracking_uri):
    """What the stem convolution is given, seen by a forward hook on every module: in training mode the
    crops' side, in eval mode (validation, the logged model's example) the images'."""
    seen = set()

    def stem_input(module, args):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            seen.add((module.training, tuple(args[0].shape[-2:])))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(stem_input)
    try:
        run_id = train(TrainConfig(data="synthetic:10", epochs=1, image_size=64, random_crop=True, train_crop_size=40,
                                   weights="none", quiet=True))
    finally:
        hook.remove()
    assert seen == {(True, (40, 40)), (False, (64, 64))}
    params = MlflowClient().get_run(run_id).data.params
    assert (params["train_crop_size"], params["image_size_resolved"]) == ("40", "64")


@pytest.mark.slow
def test_epoch_seconds_is_the_wall_time_between_two_epochs_ends_validation_included(tracking_uri):
    """By another clock: each metric carries the wall time it was logged at, and epoch_seconds is logged
    at the same line of every epoch, so two epochs' stamps lie one whole epoch apart. Validation is
    made most of the epoch (80 % of the images, 96 px), so a figure that left it out would miss by
    far more than the tolerance."""
    cfg = TrainConfig(data="synthetic:40", epochs=2, image_size=96, val_fraction=0.8, batch_size=16, weights="none",
                      quiet=True)
    run_id = train(cfg)
    history = {key: sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
               for key in ("epoch_seconds", "train_seconds", "val_seconds")}
    epoch, train_s, val_s = (history[key][1].value for key in ("epoch_seconds", "train_seconds", "val_seconds"))
    between = (history["epoch_seconds"][1].timestamp - history["epoch_seconds"][0].timestamp) / 1000
    assert val_s > train_s > 0  # the set-up above: validation dominates
    assert epoch >= train_s + val_s
    # what happens between two epochs outside the measured one (a metric flush, the next epoch's setup)
    # is milliseconds; a stamp is rounded to one
    assert abs(epoch - between) <= 0.25 * val_s + 0.05, (epoch, between, val_s)


def test_cli_prints_one_line_and_starts_no_run(tracking_uri):
    proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "train.py"), "--optimizer", "lion"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown optimizer 'lion'; choose one of adamw, adam, rmsprop, sgd"]
    assert "Traceback" not in proc.stderr
    assert MlflowClient().search_runs([mlflow.get_experiment_by_name("Default").experiment_id]) == []


@pytest.mark.slow
def test_freeze_backbone_trains_the_head_on_cached_features(tracking_uri, tmp_path, monkeypatch):
    # a cache of its own: the features are computed here, and no test beside this one adds files to it
    monkeypatch.setenv("SCENEML_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(data="synthetic:60", epochs=5, weights="none", freeze_backbone=True, quiet=True)
    run_id = train(cfg)
    client = MlflowClient()
    m = client.get_run(run_id).data.metrics
    assert m["feature_cache_seconds"] > 0  # features computed once, before epoch 1
    # log_seconds includes the batch-loss writes made during the training pass; an epoch's wall time
    # holds its training pass and its validation, and the epochs fit in the run's own wall time
    assert m["epoch_seconds"] >= max(m["train_seconds"] + m["val_seconds"], m["log_seconds"]) > 0
    assert m["val_seconds"] > 0
    run = client.get_run(run_id).info
    epochs = [h.value for h in client.get_metric_history(run_id, "epoch_seconds")]
    assert len(epochs) == 5 and sum(epochs) <= (run.end_time - run.start_time) / 1000
    losses = [h.value for h in client.get_metric_history(run_id, "train_loss")]
    assert losses[-1] < losses[0]
    # a linear probe on random-initialised ResNet18 features still beats chance (1/6) by a margin
    assert m["val_mean_class_acc_best"] > 0.25

    # a second child of a frozen sweep (same seed, so the same backbone) reuses the features on disk
    files = set((cache_dir() / "features").glob("*.pt"))
    other = client.get_run(train(dataclasses.replace(cfg, optimizer="sgd", lr=0.01))).data.metrics
    assert set((cache_dir() / "features").glob("*.pt")) == files
    assert other["features_from_disk"] == 1.0


def test_patience_runs_out_when_the_best_epoch_is_that_many_epochs_behind():
    from sceneml.metrics import patience_ran_out

    accs = [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7]
    history = [{"epoch": e, "val_mean_class_acc": a, "val_loss": 1.0} for e, a in enumerate(accs, 1)]
    # best so far after each epoch: 1, 2, 2, 2, 5, 5, 5 (a tie at the same val loss keeps the earlier epoch)
    ran_out = [patience_ran_out(history[:e], "val_mean_class_acc", 2) for e in range(1, 8)]
    assert ran_out == [False, False, False, True, False, False, True]
    assert not any(patience_ran_out(history[:e], "val_mean_class_acc", 0) for e in range(1, 8))  # 0 = off
    # val_loss: lower is better, and a lower val loss breaks a tie of the select metric
    losses = [{"epoch": e, "val_loss": v, "val_mean_class_acc": 0.5} for e, v in enumerate([0.9, 0.8, 0.85, 0.81], 1)]
    assert patience_ran_out(losses, "val_loss", 2) and not patience_ran_out(losses[:3], "val_loss", 2)
    # epoch 2's lower loss broke the tie of the select metric with epoch 1, epoch 3's higher one did not
    metric = "val_mean_class_acc"
    assert not patience_ran_out(losses[:2], metric, 1) and patience_ran_out(losses[:3], metric, 1)


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [h.value for h in sorted(client.get_metric_history(run_id, key), key=lambda h: h.step)]


@pytest.mark.slow
def test_early_stop_ends_the_run_at_the_first_epoch_whose_patience_ran_out(tracking_uri):
    """A frozen backbone and lr 1e-12: every epoch scores exactly what epoch 1 scored, so epoch 1 stays
    the best and patience 2 runs out after epoch 3, which the logged history must show by hand. The
    schedule is onecycle, stepped per batch: epoch 1 starts at lr/25 and the run steps it without error."""
    cfg = TrainConfig(data="synthetic:12", epochs=8, early_stop=2, optimizer="sgd", lr=1e-12, momentum=0.0,
                      weight_decay=0.0, freeze_backbone=True, image_size=32, weights="none", quiet=True,
                      scheduler="onecycle")
    client = MlflowClient()
    run_id = train(cfg)
    values = [(h.step, h.value) for h in client.get_metric_history(run_id, "val_mean_class_acc")]
    losses = dict((h.step, h.value) for h in client.get_metric_history(run_id, "val_loss"))
    best, stopped = None, None
    for epoch, value in sorted(values):  # the first epoch two epochs after the best so far
        if best is None or value > best[1] or (value == best[1] and losses[epoch] < losses[best[0]]):
            best = (epoch, value)
        if epoch - best[0] >= 2:
            stopped = epoch
            break
    assert stopped == 3 and [e for e, _ in values] == [1, 2, 3]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["stopped_epoch"] == 3 and metrics["best_epoch"] == 1
    lrs = _history(client, run_id, "lr")
    assert lrs[0] == pytest.approx(1e-12 / 25) and lrs[1] > lrs[0]  # rising through the first 30 % of the steps
    assert client.get_run(run_id).info.status == "FINISHED"


# The time-budget tests need a plan of at least two epochs on a busy machine: a 6 s budget of
# mobilenet_v3_small epochs (in fp32, under a third of ResNet18's time at 32 px, and a checkpoint a seventh
# of its size) plans four on the 2-core CPU beside the pace probe's two threads (a 9 s budget of ResNet18
# planned a single epoch once under `make test`)
BUDGET_ARCH = "mobilenet_v3_small"


@pytest.mark.slow
def test_a_time_budget_fits_its_epochs_and_ends_the_lr_line_at_zero_within_it(tracking_uri):
    """A 6 s budget: the first epoch measures, then after each epoch the run plans the epochs that fit
    (metric epochs_planned; the last plan is param epochs_resolved) and it ends within the budget plus a
    tenth and a minute. The lr follows the plans by hand: full in epochs 1 and 2, then during epoch e
    a line from its lr to 0 at the end of the P epochs planned after epoch e - 1, so that epoch e + 1
    starts at lr_e (P - e) / (P - e + 1)."""
    import time

    # scheduler=linear (fast's) is the budget's own line: accepted, and the line below is the budget's
    cfg = TrainConfig(data="synthetic:30", image_size=32, batch_size=16, weights="none", quiet=True, time_budget=0.1,
                      scheduler="linear", arch=BUDGET_ARCH)
    started = time.monotonic()
    run_id = train(cfg)
    elapsed = time.monotonic() - started
    client = MlflowClient()
    run = client.get_run(run_id)
    assert cfg.time_budget * 60 / 2 <= elapsed <= cfg.time_budget * 60 * 1.1 + 60, elapsed
    plans, lrs = _history(client, run_id, "epochs_planned"), _history(client, run_id, "lr")
    assert 2 <= len(lrs) == len(plans) == int(run.data.params["epochs_resolved"]) == plans[-1]
    assert run.data.params["epochs"] == "3"  # the epochs param is not what ran
    expected = [0.001, 0.001]
    for e in range(2, len(lrs)):
        p = plans[e - 2]  # the plan after epoch e - 1
        expected.append(expected[-1] * (p - e) / (p - e + 1))
    assert lrs == pytest.approx(expected, rel=1e-6) and all(a >= b > 0 for a, b in zip(lrs, lrs[1:]))


@pytest.mark.slow
def test_a_resumed_time_budget_run_keeps_its_plan(tracking_uri):
    cfg = TrainConfig(data="synthetic:30", image_size=32, batch_size=16, weights="none", quiet=True, time_budget=0.1,
                      arch=BUDGET_ARCH)
    steps_per_epoch = -(-int(0.7 * 180) // 16)  # 126 training images
    with injected(SCENEML_FAULT_AT_STEP=f"{steps_per_epoch + 2}:interrupt"), pytest.raises(KeyboardInterrupt):
        train(cfg)  # Ctrl-C in epoch 2, after the plan
    client = MlflowClient()
    stopped = client.search_runs([mlflow.get_experiment_by_name("Default").experiment_id])[0]
    [planned] = _history(client, stopped.info.run_id, "epochs_planned")  # after epoch 1
    planned = int(planned)
    run_id = train(dataclasses.replace(cfg, resume=stopped.info.run_id))
    lrs = _history(client, run_id, "lr")
    assert len(lrs) == planned == int(client.get_run(run_id).data.params["epochs_resolved"])
    # the resumed process did the epochs planned before, not a new count, on the line planned then: full
    # lr to the end of epoch 1, then from there to 0 at the end of epoch `planned`
    assert lrs == pytest.approx([0.001] + [0.001 * (planned - e + 1) / (planned - 1) for e in range(2, planned + 1)],
                                rel=1e-6)


@pytest.mark.slow
def test_ema_validates_and_checkpoints_the_averaged_weights(tracking_uri):
    """Two runs of one seed, with and without ema: the raw training is the same, so the checkpoints
    differ only by the averaging, and the ema run's logged val_loss recomputes from its own checkpoint."""
    from sceneml.data import load_split_from_manifest
    from sceneml.engine.inference import predict_log_probs

    cfg = TrainConfig(data="synthetic:12", epochs=1, batch_size=8, image_size=32, weights="none", quiet=True)
    client = MlflowClient()
    runs = {decay: client.get_run(train(dataclasses.replace(cfg, ema=decay))) for decay in (0.0, 0.9)}
    nets = {d: mlflow.pytorch.load_model(f"models:/{r.data.tags['sceneml.best_model_id']}") for d, r in runs.items()}
    raw, averaged = (nets[d].state_dict()["fc.weight"] for d in (0.0, 0.9))
    assert not torch.allclose(raw, averaged)
    run = runs[0.9]
    manifest = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/split_manifest.csv")
    classes = ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    val = load_split_from_manifest("synthetic:12", manifest, classes, 32, "val", progress=False)
    log_p = predict_log_probs(nets[0.9], val.pixels, torch.device("cpu"))
    assert -log_p[np.arange(len(val)), val.labels].mean() == pytest.approx(run.data.metrics["val_loss"], rel=1e-5)
    assert run.data.params["ema"] == "0.9"


def test_keep_checkpoints_drops_what_it_does_not_keep():
    history = [{"epoch": e, "val_mean_class_acc": v, "val_loss": 1 - v} for e, v in
               [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7)]]
    models = {e: f"m{e}" for e in range(1, 5)}
    assert superseded_epochs(history, models, "best", "val_mean_class_acc") == [1, 3, 4]  # the tie goes to 2
    assert superseded_epochs(history, models, "all", "val_mean_class_acc") == []
    assert superseded_epochs(history[:3], models, "improved", "val_mean_class_acc") == [3]  # 3 did not improve
    assert superseded_epochs(history[:2], models, "improved", "val_mean_class_acc") == []
    assert superseded_epochs(history, models, "best", "val_loss") == [1, 3, 4]  # lowest loss: epoch 2 (first)


@pytest.mark.slow
def test_venv_mlflow_runs_the_project_without_activation_and_weights_auto_warns_on_the_console(cli_run):
    """`.venv/bin/mlflow run .` with the venv not on PATH: the MLproject command must still run with the
    venv's Python (a bare `python` would be the system's, without mlflow or torch). With no ImageNet
    file, `weights=auto` falls back to random weights and says so on the console, although importing
    mlflow.pytorch configures the root logger at ERROR."""
    _, run, proc = cli_run
    assert "finished" in proc.stdout
    assert "resnet18-f37072fd.pth" in proc.stderr and "weights_resolved=none" in proc.stderr
    assert "RANDOM" in proc.stderr
    assert run.data.params["weights"] == "auto" and run.data.params["weights_resolved"] == "none"


def test_precision_choices_are_checked_before_any_work():
    from sceneml.engine.precision import resolve_precision
    from sceneml.models import build_model

    cpu = torch.device("cpu")
    # auto is bf16 exactly where the CPU has AMX bf16 tiles; the kernel's own list of CPU flags tells
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    if flags is not None:
        assert resolve_precision("auto", cpu) == (torch.bfloat16 if "amx_bf16" in flags else None), "amx_bf16" in flags
        # ... and the model has no depthwise convolution, which bf16 slows down on the CPU
        dense, _ = build_model("resnet18", 6, "none")
        depthwise, _ = build_model("mobilenet_v3_small", 6, "none")
        assert resolve_precision("auto", cpu, dense) == (torch.bfloat16 if "amx_bf16" in flags else None)
        assert resolve_precision("auto", cpu, depthwise) is None
        assert resolve_precision("bf16", cpu, depthwise) == torch.bfloat16  # asked for: given
    assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(SceneMLError, match="precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32"):
        resolve_precision("fp16", cpu)
    with pytest.raises(SceneMLError, match="precision=fp16 needs a CUDA device"):
        TrainConfig(precision="fp16", device="cpu")
    with pytest.raises(SceneMLError, match="unknown precision 'fp8'; choose one of auto, fp32, bf16, fp16"):
        TrainConfig(precision="fp8")


def _train_fp32_and_bf16(train_split, val, cpu) -> dict:
    from sceneml.engine.batches import Augmentation, iterate_batches
    from sceneml.engine.inference import predict_scores
    from sceneml.engine.loop import StepRule, train_one_epoch
    from sceneml.engine.optim import build_optimizer
    from sceneml.metrics import cross_entropy_from_probs
    from sceneml.models import build_model

    results = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        # channels_last as in train(): bf16 convolutions on this CPU are ~6x slower in the contiguous format
        model = build_model("resnet18", 6, "none")[0].to(memory_format=torch.channels_last)
        optimizer = build_optimizer("adamw", model.parameters(), 0.001, 0.9, 0.0)
        losses = []
        for epoch in range(1, 7):
            model.train()
            batches = iterate_batches(train_split.pixels, train_split.labels, 32, cpu,
                                      torch.Generator().manual_seed(epoch), Augmentation())
            losses.append(train_one_epoch(model, optimizer, batches, len(train_split), StepRule(amp_dtype=dtype),
                                          progress=False).main)
        scores = predict_scores(model, val.pixels, cpu)  # validation stays float32
        acc = float(np.mean(scores.argmax(1) == val.labels))
        results[dtype] = losses, cross_entropy_from_probs(val.labels, scores), acc, model
    return results


@pytest.mark.slow  # twelve epochs on one thread: 11-18 s with AMX, about 55 s without (bf16 then runs 6x slower)
def test_bf16_autocast_trains_close_to_fp32_on_the_embedded_data():
    from sceneml.data import prepare_data

    data = prepare_data("synthetic:30", image_size=32, progress=False)
    train_split, val = data.splits["train"], data.splits["val"]
    # one thread: the sums of a convolution depend on how many threads share them, and six epochs turn
    # that rounding into different runs; with one, the figures below are the same wherever pytest runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = _train_fp32_and_bf16(train_split, val, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    (fp32_losses, fp32_val, fp32_acc, _), (bf16_losses, bf16_val, bf16_acc, bf16_model) = results.values()
    # the same first epoch to bf16's precision (rounding differences then grow: training is chaotic)
    np.testing.assert_allclose(bf16_losses[0], fp32_losses[0], rtol=0.1)
    assert bf16_losses[-1] < 0.5 * math.log(6) and fp32_losses[-1] < 0.5 * math.log(6)  # both learn
    # on val (27 images, chance 1/6): both at least twice chance, within 4 images and 20 % in loss of each other
    assert min(fp32_acc, bf16_acc) >= 2 / 6 and abs(bf16_acc - fp32_acc) <= 4 / len(val), (fp32_acc, bf16_acc)
    assert bf16_val == pytest.approx(fp32_val, rel=0.2), (fp32_val, bf16_val)
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())  # the weights stay float32
