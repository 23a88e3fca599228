"""Test accuracy against wall time of the whole training process, on real photos, for three contenders:

  naive    torchvision ImageFolder + DataLoader decoding JPEGs every epoch, 150 px, AdamW 1e-3 constant,
           no augmentation: the plain loop of a tutorial. One process trains for the longest budget and
           is scored on the test photos every ``--every`` minutes (the clock stops while it is scored): with
           a constant lr, the model at minute m is what a run of m minutes gives.
  classic  `python -m sceneml train --recipe classic --time-budget B`, one fresh process per budget
  fast     `python -m sceneml train --recipe fast --time-budget B`, one fresh process per budget

Every contender trains from scratch (ResNet18) on the same stratified 80 % of ``--data`` and is scored
on the same held-out 20 % (never trained or validated on): a Kaggle-layout folder of links
(``seg_train``/``seg_test``) that sceneml reads as its own train/test division. A sceneml run is
scored by `evaluate` on its logged model (the best epoch by val_mean_class_acc), after the clock;
its time is the whole `train` process, imports and decoding into an empty cache included.

    python benchmarks/time_to_accuracy.py                              # 5, 10, 20 min each: ~2 h on 2 cores
    python benchmarks/time_to_accuracy.py --contenders fast --budgets 15   # one row
    python benchmarks/time_to_accuracy.py --naive-minutes 60           # the naive curve past the budgets
    python benchmarks/time_to_accuracy.py --contenders fast --budgets 5 --set image_size=48   # a variant
    python benchmarks/time_to_accuracy.py --contenders ""             # the table and plot of the CSV

Appends to ``benchmarks/results/time_to_accuracy.csv`` (one row per contender and time, with the training
speed in images per second: a sceneml run's median epoch, the naive loop's since its first batch, beside
the machine's pace) and redraws ``benchmarks/results/time_to_accuracy.png``, and prints the table and the
ratio "naive minutes to reach the accuracy that fast reaches in
``--target`` minutes" over ``--target`` (for each fast run at that budget, from one machine's rows).
Rows already in the CSV are kept (a second invocation adds the rest, so the two hours can be spent in
pieces); each row names its machine, and the plot has a panel per machine. A contender run again adds
rows (a repeat is another draw from the run-to-run spread, which the table should show); the ratio uses
the newest naive curve of this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from one_at_a_time import one_at_a_time
from results import RESULTS, machine, read, record

REPO = Path(__file__).resolve().parents[1]
INTEL_TRAIN = REPO.parent / "shared" / "data" / "intel-train"
NAME = "time_to_accuracy"  # benchmarks/results/time_to_accuracy.csv and .png


def held_out_layout(data: Path, out: Path, test_share: float, seed: int) -> Path:
    """``out/seg_train/<class>/`` and ``out/seg_test/<class>/``: links to a stratified split of the training
    photos of ``data`` (any layout sceneml reads). A test photo whose bytes equal a training photo's is
    dropped: the Intel set holds such copies, and a copy in both parts would be scored as seen."""
    import hashlib

    from sklearn.model_selection import train_test_split

    from sceneml.data.sources import list_images, resolve_source

    _, items = list_images(resolve_source(str(data)).train_dir)
    paths, labels = zip(*items)
    train, test = train_test_split(list(paths), test_size=test_share, stratify=list(labels), random_state=seed)
    digest = {path: hashlib.sha1(Path(path).read_bytes()).hexdigest() for path in paths}
    seen = {digest[path] for path in train}
    kept = [path for path in test if digest[path] not in seen]
    print(f"{len(train)} training photos, {len(kept)} test photos ({len(test) - len(kept)} byte copies of training "
          "photos dropped)", flush=True)
    for part, chosen in (("seg_train", train), ("seg_test", kept)):
        for path in chosen:
            link = out / part / Path(path).parent.name / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(path).resolve())
    return out


def naive(layout: Path, minutes: float, every: float, threads: int) -> list[dict]:
    """The naive loop, scored every ``every`` minutes of its own clock (imports included) up to ``minutes``."""
    started = time.monotonic()
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision import transforms

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tf = transforms.Compose([transforms.Resize((150, 150)), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    train_set = torchvision.datasets.ImageFolder(str(layout / "seg_train"), transform=tf)
    test_set = torchvision.datasets.ImageFolder(str(layout / "seg_test"), transform=tf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, num_workers=2,
                                         persistent_workers=True)
    model = torchvision.models.resnet18(num_classes=len(train_set.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    paused, rows, next_score, epoch, images = 0.0, [], every, 0, 0

    def clock() -> float:
        return (time.monotonic() - started - paused) / 60

    trains_from = clock()  # the pace counts from the first batch: imports and the file listing are not training
    while clock() < minutes:
        epoch += 1
        for x, y in loader:
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            images += len(y)
            if clock() >= next_score:
                stop = time.monotonic()
                rows.append({"minutes": round(clock(), 2), "test_acc": score(model, test_set), "epochs": epoch,
                             "img_per_s": round(images / ((clock() - trains_from) * 60), 1)})
                print(f"naive {rows[-1]}", flush=True)
                paused += time.monotonic() - stop
                next_score += every
                if clock() >= minutes:
                    break
    return rows


def score(model, dataset) -> float:
    import torch

    model.eval()
    right = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=128, num_workers=2):
            right += int((model(x).argmax(1) == y).sum())
    return right / len(dataset)


def sceneml_run(layout: Path, recipe: str, budget: float, work: Path, threads: int, settings: list[str],
                launcher: str = "sceneml") -> dict:
    """One `train` process of ``budget`` minutes with an empty cache and store, then `evaluate` on seg_test,
    with and without horizontal-flip test-time augmentation. ``settings``: ``name=value`` parameters given on
    top of the recipe. ``launcher``: ``sceneml`` (`python -m sceneml train`) or ``mlflow-run`` (`mlflow run .
    -e train --env-manager local` offline: an empty TORCH_HOME, HF_HUB_OFFLINE=1, SCENEML_OFFLINE=1)."""
    import mlflow

    store = work / f"{recipe}-{budget:g}-{'-'.join(settings)}-{time.strftime('%Y%m%dT%H%M%S')}"  # one per run
    store.mkdir(parents=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "SCENEML_CACHE": str(store / "cache"), "OMP_NUM_THREADS": str(threads)}
    params = {"data": str(layout), "recipe": recipe, "time_budget": f"{budget:g}", "weights": "none",
              "quiet": "true", **dict(setting.partition("=")[::2] for setting in settings)}
    if launcher == "mlflow-run":
        (store / "torch_home").mkdir()
        env.update(TORCH_HOME=str(store / "torch_home"), HF_HUB_OFFLINE="1", SCENEML_OFFLINE="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
        cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
               *(arg for name, value in params.items() for arg in ("-P", f"{name}={value}"))]
    else:
        cmd = [sys.executable, "-m", "sceneml", "train",
               *(arg for name, value in params.items() for arg in (f"--{name.replace('_', '-')}", value))]
    started = time.monotonic()
    subprocess.run(cmd, env=env, cwd=store, check=True)
    minutes = (time.monotonic() - started) / 60
    run = train_run(store)
    scores = {}
    for tta in (False, True):
        out = subprocess.run([sys.executable, "-m", "sceneml", "evaluate", "--model-uri",
                              f"models:/{run.data.tags['sceneml.best_model_id']}", "--split", "test",
                              "--tta", str(tta).lower()],
                             env=env, cwd=store, check=True, capture_output=True, text=True).stdout
        for key in ("test_acc", "test_mAP"):
            scores[key + ("_tta" if tta else "")] = float(out.split(f"{key} = ")[1].split()[0])
    speeds = sorted(m.value for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id,
                                                                                   "train_images_per_sec"))
    return {"minutes": round(minutes, 2), **scores, "epochs": int(run.data.params["epochs_resolved"]),
            "img_per_s": round(speeds[len(speeds) // 2], 1)}  # the median epoch's training speed


def train_run(store: Path):
    """The `train` run of a contender's store (``<store>/mlflow.db``): the run that names its best model
    (the store also holds `evaluate`'s run)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    return next(r for r in runs if "sceneml.best_model_id" in r.data.tags)


def minutes_to_reach(curve: list[dict], accuracy: float) -> float | None:
    """The first time a (minutes-sorted) curve reaches ``accuracy``, None if it never does."""
    return next((r["minutes"] for r in sorted(curve, key=lambda r: r["minutes"]) if r["test_acc"] >= accuracy), None)


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy against minutes, a panel per machine (the same contenders run at another speed there)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machines = sorted({r["machine"] for r in rows})
    fig, axes = plt.subplots(1, len(machines), figsize=(7 * len(machines), 5), sharey=True, squeeze=False)
    styles = {"naive": "o-", "classic": "s-", "fast": "^-"}
    pretrained = sorted({r["contender"] for r in rows if "weights=imagenet" in r["contender"]})
    colours = {name: f"C{i}" for i, name in enumerate([*styles, *pretrained])}
    for ax, name in zip(axes[0], machines):
        here = [r for r in rows if r["machine"] == name]
        # the recipes' variants ("fast image_size=96 ..."): thin grey, one legend entry; the table names them
        variants = sorted({r["contender"] for r in here} - set(styles) - set(pretrained))
        labelled = False
        for contender in (*styles, *pretrained, *variants):
            mine = sorted((r for r in here if r["contender"] == contender), key=lambda r: float(r["minutes"]))
            if not mine:
                continue
            if contender in variants:
                style, colour, extra = "x--", "grey", {"linewidth": 0.7, "alpha": 0.6, "markersize": 4}
                label = None if labelled else "variants of the recipes (see the table)"
                labelled = True
            else:
                style, colour, extra = styles.get(contender, "D-"), colours[contender], {}
                label = contender.replace("arch=efficientnet_lite0 weights=imagenet", "Lite0 ImageNet")
            if contender == "naive":  # one curve: a score every few minutes of one run
                line = [(float(r["minutes"]), float(r["test_acc"])) for r in mine]
            else:  # a run per budget, repeats of a budget as points of their own, the line through their means
                ax.plot([float(r["minutes"]) for r in mine], [float(r["test_acc"]) for r in mine], style[0],
                        color=colour, alpha=0.5, markersize=4)
                budgets = sorted({float(r["budget_min"]) for r in mine})
                line = [tuple(np.mean([(float(r["minutes"]), float(r["test_acc"])) for r in mine
                                       if float(r["budget_min"]) == b], axis=0)) for b in budgets]
            ax.plot(*zip(*line), style, color=colour, label=label, **extra)
        ax.set(xlabel="wall time of the whole process (min)", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("ResNet18 from scratch; EfficientNet-Lite0 fine-tuned from ImageNet where labelled Lite0", fontsize=10)
    axes[0][0].set_ylabel("test accuracy (Intel photos, held-out 20 %)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def naive_curve(rows: list[dict]) -> list[dict]:
    """The newest naive run among ``rows`` (one machine's): its scores, one row per ``--every`` minutes."""
    runs = [(r["date"], r["command"]) for r in rows if r["contender"] == "naive"]
    newest = max(runs, default=None)
    return [{"minutes": float(r["minutes"]), "test_acc": float(r["test_acc"])} for r in rows
            if r["contender"] == "naive" and (r["date"], r["command"]) == newest]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=INTEL_TRAIN)
    ap.add_argument("--contenders", default="naive,classic,fast")
    ap.add_argument("--budgets", default="5,10,20", help="minutes, comma list (sceneml contenders)")
    ap.add_argument("--naive-minutes", type=float, default=0, help="the naive run's length; 0 = the largest budget")
    ap.add_argument("--every", type=float, default=2.5, help="minutes between the naive run's scores")
    ap.add_argument("--target", type=float, default=15, help="the fast budget whose accuracy the naive run must reach")
    ap.add_argument("--test-share", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, help="keep the held-out layout and each run's store here (else a "
                                              "temporary folder)")
    ap.add_argument("--launcher", choices=("sceneml", "mlflow-run"), default="sceneml",
                    help="how a sceneml contender starts: python -m sceneml train, or mlflow run . -e train offline "
                         "(the row is labelled mlflow-run)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a train parameter on top of the recipe (repeatable); the rows are labelled with it")
    args = ap.parse_args()
    one_at_a_time()

    budgets = [float(b) for b in args.budgets.split(",")]
    kept = contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="tta-")
    contenders = [c for c in args.contenders.split(",") if c]  # none: redraw the plot from the CSV
    with kept as tmp:
        if contenders:
            layout = held_out_layout(args.data, Path(tmp) / "data", args.test_share, args.seed)
        for contender in contenders:
            if contender == "naive":
                found = naive(layout, args.naive_minutes or max(budgets), args.every, args.threads)
                new = [{"budget_min": "", **r} for r in found]
            else:
                new = [{"budget_min": b, **sceneml_run(layout, contender, b, Path(tmp) / "runs", args.threads,
                                                       args.set, args.launcher)} for b in budgets]
            label = " ".join([contender, *args.set, *(["mlflow-run"] if args.launcher == "mlflow-run" else [])])
            record(NAME, [{"contender": label, **r} for r in new])  # after each contender: nothing lost on a crash
    rows = read(NAME)
    plot(rows, RESULTS / "time_to_accuracy.png")
    print(f"\n{'contender':9} {'budget':>6} {'minutes':>8} {'test_acc':>8} {'test_mAP':>8} {'epochs':>6} {'img/s':>6}"
          "  machine")
    for r in sorted(rows, key=lambda r: (r["machine"], r["contender"], float(r["minutes"]))):
        print(f"{r['contender']:9} {r['budget_min']!s:>6} {float(r['minutes']):8.2f} {float(r['test_acc']):8.3f} "
              f"{r.get('test_mAP') or '':>8} {r['epochs']!s:>6} {r.get('img_per_s') or '':>6}  {r['machine']}")
    here = [r for r in rows if r["machine"] == machine()]  # the ratio compares runs of one machine
    fast = [r for r in here if r["contender"] == "fast" and float(r["budget_min"]) == args.target]
    curve = naive_curve(here)

    # the shared VM's speed moves over a day: each line names the dates and paces of the runs it compares
    def when(row: dict) -> str:
        return f"{row['date']}, pace {row.get('pace') or '?'} img/s"

    naive_end = max((r for r in here if r["contender"] == "naive"), key=lambda r: (r["date"], float(r["minutes"])),
                    default=None)
    for run in fast if curve else []:  # each run of fast at the target
        goal = float(run["test_acc"])
        reached = minutes_to_reach(curve, goal)
        longest = max(r["minutes"] for r in curve)
        print(f"\nfast in {args.target:g} min: test_acc {goal:.3f} ({when(run)}); "
              f"naive ({when(naive_end)}) reaches it after "
              + (f"{reached:.1f} min: ratio {reached / args.target:.2f}" if reached is not None else
                 f"more than {longest:.1f} min (not within its run): ratio > {longest / args.target:.2f}"))


if __name__ == "__main__":
    main()
