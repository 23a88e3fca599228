"""The torch engine's pieces by independent routes: the lr schedules against their closed forms (also
across a checkpoint round trip), the random crop measured from its output, and DDP's averaged gradients
against one process on the same global batch."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from sceneml.config import TrainConfig
from sceneml.engine.batches import random_resized_crop
from sceneml.engine.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from sceneml.engine.loop import StepRule, seed_everything, train_one_epoch
from sceneml.engine.optim import build_optimizer, build_scheduler
from sceneml.errors import SceneMLError
from sceneml.models import build_model

LR, EPOCHS = 0.1, 6


def _lrs(name: str, epochs: int = EPOCHS, resume_after: int | None = None, tmp_path=None,
         warmup: int = 0) -> list[float]:
    """The lr of each epoch as `train` logs it (read before the epoch's scheduler step); with
    ``resume_after`` the model, optimizer and schedule go through a checkpoint file at that epoch."""
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer("sgd", model.parameters(), LR, 0.9, 0.0)
    sched = build_scheduler(name, opt, epochs, warmup)
    out = []
    for epoch in range(1, epochs + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if epoch == resume_after:
            save_checkpoint(tmp_path / "last.pt", model, opt, sched, epoch, {})
            model = torch.nn.Linear(2, 2)
            opt = build_optimizer("sgd", model.parameters(), LR, 0.9, 0.0)
            sched = build_scheduler(name, opt, epochs, warmup)
            assert restore_checkpoint(load_checkpoint(tmp_path / "last.pt"), model, opt, sched) == epoch
    return out


def test_cosine_schedule_follows_its_closed_form():
    expected = [LR * (1 + math.cos(math.pi * t / EPOCHS)) / 2 for t in range(EPOCHS)]
    assert _lrs("cosine") == pytest.approx(expected, rel=1e-12)


def test_step_schedule_divides_by_ten_every_third_of_the_run():
    step = EPOCHS // 3
    expected = [LR * 0.1 ** (t // step) for t in range(EPOCHS)]
    assert _lrs("step") == pytest.approx(expected, rel=1e-12)
    assert build_scheduler("none", build_optimizer("sgd", torch.nn.Linear(2, 2).parameters(), LR, 0, 0), 3) is None


def test_linear_schedule_reaches_zero_when_the_last_epoch_ends():
    assert _lrs("linear") == pytest.approx([LR * (1 - t / EPOCHS) for t in range(EPOCHS)], rel=1e-12)


def test_a_budget_plan_grows_and_shrinks_with_the_pace_and_its_lr_line_turns_where_it_is():
    """By hand: a 100 s budget from t=0, 10 steps an epoch. The first epoch (one-time costs) ends at 20 s:
    (100 - 20 - 2) // 20 = 3 more fit, 4 in all, and the line falls from 1 at step 10 to 0 at step 40.
    Epoch 2 ends at 30 s at 10 s an epoch: (100 - 30 - 1) // 10 = 6 more, 8 in all; the line turns at
    step 20, where it is at (40 - 20) / 30 = 2/3, and reaches 0 at step 80. At 20 s an epoch from
    t=50 (after epoch 4) only (100 - 50 - 2) // 20 = 2 more fit: 6, the line from step 40 (factor
    2/3 * 40/60 = 4/9) to 0 at step 60. A plan whose epochs are done stays as it is."""
    from sceneml.engine.budget import BudgetPlan

    plan = BudgetPlan(100.0, 0.0, 10)
    assert plan.factor(5) == 1.0  # no plan yet: full lr while the first epoch measures
    assert plan.fit(1, 20.0, now=20.0) == 4
    assert [plan.factor(s) for s in (10, 25, 40)] == pytest.approx([1.0, 0.5, 0.0])
    assert plan.fit(2, 10.0, now=30.0) == 8
    assert [plan.factor(s) for s in (20, 50, 80, 90)] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    assert plan.fit(4, 20.0, now=50.0) == 6
    assert [plan.factor(s) for s in (40, 50, 60)] == pytest.approx([4 / 9, 2 / 9, 0.0])
    assert plan.fit(6, 1.0, now=55.0) == 6  # the line is at 0: no epoch more, however much time is left
    plan.keep(6, 40, factor=0.5)  # a resume: the plan and the lr its checkpoint holds
    assert [plan.factor(s) for s in (40, 50, 60)] == pytest.approx([0.5, 0.25, 0.0])


def test_a_budget_plan_runs_its_last_epoch_when_it_ends_within_a_tenth_over_the_budget():
    """By hand: a 100 s budget from t=0, 10 steps an epoch; epoch 1 ends at 20 s and plans 4 (the line
    falls from 1 at step 10 to 0 at step 40). Epochs 2 and 3 run slower, epoch 3 ends at 80 s: at 25 s an
    epoch (100 - 80 - 2.5) // 25 = 0 more fit, which would stop the run with the lr at (40 - 30) / 30 =
    1/3 of its full value. Epoch 4 ends at 80 + 25 = 105 s <= 1.1 x 100: the plan keeps it and the
    line reaches 0. At 35 s an epoch it would end at 115 s: the plan is cut to 3 and the run stops there."""
    from sceneml.engine.budget import OVERRUN, BudgetPlan

    assert OVERRUN == 1.1
    for pace, planned in ((25.0, 4), (35.0, 3)):
        plan = BudgetPlan(100.0, 0.0, 10)
        assert plan.fit(1, 20.0, now=20.0) == 4
        assert plan.factor(30) == pytest.approx(1 / 3)
        assert plan.fit(3, pace, now=80.0) == planned
        line = [1 / 3, 1 / 6, 0.0] if planned == 4 else [0.0, 0.0, 0.0]
        assert [plan.factor(s) for s in (30, 35, 40)] == pytest.approx(line)


@pytest.mark.parametrize("name, after", [
    ("none", [1, 1, 1, 1]),
    ("linear", [1, 0.75, 0.5, 0.25]),
    ("cosine", [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]),
])
def test_warmup_rises_linearly_from_a_hundredth_then_the_schedule_runs_over_the_remaining_epochs(name, after):
    # torchvision's warmup: factor 0.01 at the first epoch, rising linearly to 1 at epoch `warmup`
    warm = [0.01, 0.01 + (1 - 0.01) / 2]
    assert _lrs(name, warmup=2) == pytest.approx([LR * f for f in warm + after], rel=1e-9)


@pytest.mark.parametrize("name, warmup", [("cosine", 0), ("step", 0), ("linear", 0), ("cosine", 2), ("none", 3)])
def test_a_resumed_schedule_continues_where_it_stopped(name, warmup, tmp_path):
    assert _lrs(name, resume_after=2, tmp_path=tmp_path, warmup=warmup) == _lrs(name, warmup=warmup)


@pytest.mark.parametrize("crop_size", [0, 40, 96])
def test_random_crop_samples_a_box_inside_the_image_with_the_documented_area_and_aspect(crop_size):
    """An image whose channels hold each pixel's own x and y coordinate: bilinear sampling of a linear
    ramp is exact, so the output's ramps give the box that was sampled (slope = half-width, value at
    the centre = box centre), measured without re-drawing the random numbers. ``crop_size`` (as
    train_crop_size) changes the output's pixels, not the box."""
    size, b = 64, 16
    centres = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1  # pixel centres in [-1, 1]
    x = torch.zeros(b, 3, size, size, dtype=torch.float64)
    x[:, 0] = centres.view(1, 1, size)
    x[:, 1] = centres.view(1, size, 1)
    out = random_resized_crop(x.float(), torch.Generator().manual_seed(0), size=crop_size).double()
    side = crop_size or size
    assert out.shape == (b, 3, side, side)
    inner = slice(side // 4, 3 * side // 4)  # away from the border, where reflection padding bends the ramp
    u = ((2 * torch.arange(side, dtype=torch.float64) + 1) / side - 1)[inner].numpy()  # the output's centres
    areas, aspects = [], []
    for i in range(b):
        w, cx = np.polyfit(u, out[i, 0, side // 2, inner].numpy(), 1)
        h, cy = np.polyfit(u, out[i, 1, inner, side // 2].numpy(), 1)
        assert np.allclose(out[i, 0, inner, inner].numpy(), w * u[None, :] + cx, atol=1e-4)  # a crop, not a warp
        assert abs(cx) + w <= 1 + 1e-4 and abs(cy) + h <= 1 + 1e-4  # inside the image
        areas.append(w * h)
        aspects.append(w / h)
    assert min(areas) >= 0.5 - 1e-3 and max(areas) <= 1 + 1e-3
    assert min(aspects) >= 3 / 4 - 1e-3 and max(aspects) <= 4 / 3 + 1e-3
    assert np.std(areas) > 0.02  # each image draws its own box


DDP_WORKER = """
import sys, torch, torch.distributed as dist
from sceneml.engine.loop import seed_everything, train_one_epoch
from sceneml.engine.optim import build_optimizer
from sceneml.models import build_model
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
seed_everything(0)
model, _ = build_model("resnet18", 6, "none")
g = torch.Generator().manual_seed(1)
x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 6, (8,), generator=g)
ddp = torch.nn.parallel.DistributedDataParallel(model)
model.eval()  # BatchNorm on running statistics: each image's loss depends on that image alone
opt = build_optimizer("sgd", model.parameters(), 0.1, 0.9, 0.0)
train_one_epoch(ddp, opt, [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])], 4, progress=False)
if rank == 0:
    torch.save(model.state_dict(), out)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_on_two_processes_takes_the_step_of_one_process_on_the_global_batch(tmp_path):
    """Two gloo ranks with 4 images each (sceneml's training step under DistributedDataParallel, the
    gradient all-reduced as a mean) end with the weights of one process stepping on all 8."""
    from .processes import python

    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [python(DDP_WORKER, [str(r), init, str(tmp_path / "ddp.pt")], dict(os.environ), tmp_path)
             for r in range(2)]
    for p in ranks:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    seed_everything(0)
    model, _ = build_model("resnet18", 6, "none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 6, (8,), generator=g)
    model.eval()
    train_one_epoch(model, build_optimizer("sgd", model.parameters(), 0.1, 0.9, 0.0), [(x, y)], 8, progress=False)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(moved) > 20  # the step changed the network
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_label_smoothing_trains_on_the_smoothed_loss_computed_by_hand():
    """One step of train_one_epoch with label_smoothing=0.1 reports (1 - e) * CE + e * mean_k(-log p_k),
    written out here (torch's cross_entropy(label_smoothing=...) agrees), and steps along its gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    eps, lr = 0.1, 0.5
    logits = model(x)
    log_p = torch.log_softmax(logits.double(), dim=1)
    by_hand = ((1 - eps) * -log_p[torch.arange(8), y] + eps * -log_p.mean(dim=1)).mean()
    assert by_hand.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y, label_smoothing=eps).item(),
                                           rel=1e-6)
    grads = torch.autograd.grad(by_hand, list(model.parameters()))
    expected = [p.detach().double() - lr * g for p, g in zip(model.parameters(), grads)]
    loss = train_one_epoch(model, build_optimizer("sgd", model.parameters(), lr, 0.0, 0.0), [(x, y)], 8,
                           StepRule(label_smoothing=eps), progress=False)
    assert loss.main == pytest.approx(by_hand.item(), rel=1e-6)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_tta_is_the_mean_of_the_softmax_of_each_image_and_of_its_mirror_image():
    """predict_log_probs(tta=True) against two plain predictions, of the images and of the images
    mirrored in numpy (uint8, before any batching), averaged by hand."""
    from sceneml.engine.inference import predict_log_probs, predict_scores

    seed_everything(0)
    model = build_model("resnet18", 6, "none")[0].eval()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    plain = predict_scores(model, pixels, cpu, batch_size=2)
    mirrored = predict_scores(model, np.ascontiguousarray(pixels[:, :, ::-1]), cpu, batch_size=2)
    tta = predict_log_probs(model, pixels, cpu, batch_size=2, tta=True)
    np.testing.assert_allclose(np.exp(tta), (plain + mirrored) / 2, rtol=1e-6, atol=1e-9)
    assert not np.allclose(plain, mirrored)  # the mirror image is another input: the mean is not trivial


def _batch(b: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.randint(0, 6, (b,), generator=g)


def test_mixup_blends_each_image_with_the_next_by_the_drawn_lambda_and_the_labels_sum_to_one():
    from sceneml.engine.batches import mix_batch

    x, y = _batch()
    mixed, soft, lam = mix_batch(x, y, 6, mixup_alpha=0.4, cutmix_alpha=0.0, generator=torch.Generator().manual_seed(1))
    xn, yn = x.numpy(), y.numpy()
    np.testing.assert_allclose(mixed.numpy(), lam * xn + (1 - lam) * np.roll(xn, 1, axis=0), rtol=1e-6, atol=1e-6)
    expected = lam * np.eye(6)[yn] + (1 - lam) * np.eye(6)[np.roll(yn, 1)]
    np.testing.assert_allclose(soft.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(soft.sum(1).numpy(), 1.0, rtol=1e-6)
    assert 0 < lam < 1


def test_cutmix_pastes_a_box_of_one_minus_lambda_of_the_area_from_the_next_image():
    from sceneml.engine.batches import mix_batch

    x, y = _batch()
    for seed in range(5):
        mixed, soft, lam = mix_batch(x, y, 6, 0.0, 1.0, torch.Generator().manual_seed(seed))
        pasted = (mixed != x).any(dim=1).numpy()  # (B, H, W): the pixels that came from another image
        share = pasted.mean(axis=(1, 2))
        np.testing.assert_allclose(share, 1 - lam, atol=1e-9)  # the same box in every image
        assert torch.equal(mixed[pasted[:, None].repeat(3, 1)], x.roll(1, 0)[pasted[:, None].repeat(3, 1)])
        np.testing.assert_allclose(soft.sum(1).numpy(), 1.0, rtol=1e-6)
        assert soft[torch.arange(8), y].min() >= lam - 1e-6


def test_mix_lambdas_follow_beta_alpha_alpha():
    """Two thousand MixUp lambdas against scipy's Beta(0.4, 0.4) by a Kolmogorov-Smirnov test."""
    from scipy import stats

    from sceneml.engine.batches import mix_batch

    x, y = _batch(b=2, size=2)
    g = torch.Generator().manual_seed(3)
    lams = [mix_batch(x, y, 6, 0.4, 0.0, g)[2] for _ in range(2000)]
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    kinds = [mix_batch(x, y, 6, 0.4, 1.0, g) for _ in range(200)]
    # with both on, each batch is one of the two: a CutMix keeps every pixel of one image or the other
    pasted = [bool(((m == x) | (m == x.roll(1, 0))).all()) for m, _, _ in kinds]
    assert 60 < sum(pasted) < 140


def test_random_erase_fills_one_box_per_chosen_image_with_grey():
    from sceneml.engine.batches import random_erase

    x = torch.rand(400, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = random_erase(x, torch.Generator().manual_seed(1), p=0.5)
    erased = (out == 0.5).all(dim=1) & (x != 0.5).any(dim=1)  # (B, H, W)
    chosen = erased.flatten(1).any(1)
    assert 160 < int(chosen.sum()) < 240  # p = 0.5 of 400 images
    for box in erased[chosen]:
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(box.sum()) == h * w  # one filled rectangle
        assert 0.005 < h * w / 32**2 <= 0.34 + 1e-9
    assert torch.equal(out[~chosen], x[~chosen])  # the others are untouched
    assert torch.equal(random_erase(x, torch.Generator().manual_seed(1), p=0.0), x)


def test_ema_follows_its_recurrence_computed_by_hand_over_three_steps():
    from sceneml.engine.optim import make_ema

    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = make_ema(model, 0.9)
    after: list[dict] = []

    def on_step() -> None:
        ema.update_parameters(model)
        after.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 4, generator=g), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    model.train()
    train_one_epoch(model, optimizer, batches, 12, StepRule(on_step=on_step), progress=False)
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        by_hand = after[0][key]  # the first update copies the weights
        for state in after[1:]:
            by_hand = 0.9 * by_hand + 0.1 * state[key]
        torch.testing.assert_close(ema.module.state_dict()[key], by_hand, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)  # the average is not the last weights


def test_onecycle_follows_its_closed_form_step_by_step_and_across_a_checkpoint(tmp_path):
    """Smith's 1cycle as half cosines by hand: from lr/25 up to lr at step 0.3 T - 1, then down to
    lr/25e4 at the last step T - 1; a schedule restored from a checkpoint mid-way continues it."""
    def cos(start: float, end: float, t: float) -> float:
        return end + (start - end) / 2 * (1 + math.cos(math.pi * t))

    total, top = 12, 0.3 * 12 - 1
    expected = [cos(LR / 25, LR, i / top) if i <= top else cos(LR, LR / 25 / 1e4, (i - top) / (total - 1 - top))
                for i in range(total)]

    def lrs(resume_at: int | None = None) -> list[float]:
        model = torch.nn.Linear(2, 2)
        opt = build_optimizer("sgd", model.parameters(), LR, 0.9, 0.0)
        sched = build_scheduler("onecycle", opt, 3, steps_per_epoch=4)
        out = []
        for i in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            if i == resume_at:
                save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1, {})
                model = torch.nn.Linear(2, 2)
                opt = build_optimizer("sgd", model.parameters(), LR, 0.9, 0.0)
                sched = build_scheduler("onecycle", opt, 3, steps_per_epoch=4)
                restore_checkpoint(load_checkpoint(tmp_path / "last.pt"), model, opt, sched)
        assert opt.param_groups[0]["momentum"] == 0.9  # the optimizer's own momentum, not cycled
        return out

    assert lrs() == pytest.approx(expected, rel=1e-9)
    assert lrs(resume_at=4) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(SceneMLError, match="warms up by itself"):  # refused where the config is built
        TrainConfig(scheduler="onecycle", warmup_epochs=1, epochs=3)


@pytest.mark.parametrize("policy", ["trivial", "randaugment"])
def test_auto_augment_draws_an_op_per_image_from_the_epochs_generator(policy):
    from sceneml.engine.batches import auto_augment

    one = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = one.repeat(16, 1, 1, 1)  # sixteen copies of one image
    state = torch.random.get_rng_state()
    out = auto_augment(x, policy, torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    assert torch.equal(out, auto_augment(x, policy, torch.Generator().manual_seed(5)))  # seeded: a resume repeats it
    assert out.shape == x.shape and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) >= 6  # copies of one image come out differently: each drew its own op
    assert not torch.equal(out, auto_augment(x, policy, torch.Generator().manual_seed(6)))
