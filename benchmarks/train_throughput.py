"""Training throughput, side by side in one process on the same JPEG files:

  limit    forward + backward + step on tensors already in memory (the hardware's rate for this model)
  sceneml  the real `train` loop (decode-once cache, channels_last, batched MLflow logging)
  naive    torchvision ImageFolder + DataLoader decoding JPEGs every epoch, a plain loop and a
           synchronous mlflow.log_metric per batch (the common tutorial baseline)

    python benchmarks/train_throughput.py --arch resnet18 --image-size 150 --batch-size 32
    python benchmarks/train_throughput.py --freeze-backbone --epochs 5
    python benchmarks/train_throughput.py --precision bf16 --compile     # limit and sceneml only change
    python benchmarks/train_throughput.py --whole-process 3   # `mlflow run -e train` vs the naive loop as
                                                              # whole processes, alternating, 3 pairs

`--data` defaults to ../shared/data/intel-mini when present, else the embedded scenes written out
as 150 px JPEGs (so every method decodes real JPEG files). Epoch 1 of sceneml includes decoding
into its cache (all splits); epoch 2 reads the warm cache.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from one_at_a_time import one_at_a_time
from results import record

REPO = Path(__file__).resolve().parents[1]
INTEL_MINI = REPO.parent / "shared" / "data" / "intel-mini"


def jpeg_folder(data: str, size: int, per_class: int, out: Path) -> Path:
    """A class-folder tree of JPEGs: the given folder, or the embedded scenes re-encoded at ``size``."""
    from PIL import Image

    from sceneml.data.sources import list_images, resolve_source

    if data != "synthetic":
        return Path(data)
    source = resolve_source(f"synthetic:{per_class}")
    _, items = list_images(source.train_dir)
    for path, label in items:
        (out / label).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(
                out / label / (path.stem + ".jpg"), quality=90)
    return out


def measure_limit(arch: str, pixels: np.ndarray, labels: np.ndarray, batch_size: int, epochs: int,
                  device, frozen: bool, amp_dtype=None, compile_model: bool = False) -> list[float]:
    """img/s per epoch of the bare step on float tensors already on the device (under autocast to
    ``amp_dtype`` when given; compiled with torch.compile when asked: epoch 1 then includes compiling)."""
    import torch
    import torch.nn.functional as F

    from sceneml.models import build_model, freeze_backbone, split_logits

    torch.manual_seed(0)
    model, _ = build_model(arch, int(labels.max()) + 1, "none")
    if frozen:
        freeze_backbone(arch, model)
    model = model.to(device, memory_format=torch.channels_last).train()
    x_all = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255).contiguous(
        memory_format=torch.channels_last).to(device)
    y_all = torch.from_numpy(labels).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step_model = torch.compile(model) if compile_model else model
    rates = []
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(y_all), batch_size):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits, _ = split_logits(step_model(x_all[i:i + batch_size]))
                loss = F.cross_entropy(logits.float(), y_all[i:i + batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        rates.append(len(y_all) / (time.perf_counter() - start))
    return rates


def measure_naive(arch: str, folder: Path, keep: set[str], size: int, batch_size: int, epochs: int, device,
                  frozen: bool, workers: int) -> list[float]:
    """img/s per epoch of the ImageFolder + DataLoader + per-batch log_metric loop."""
    import mlflow
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision import transforms as T

    from sceneml.architectures import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=tf,
                                               is_valid_file=lambda p: str(Path(p).resolve()) in keep)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    torch.manual_seed(0)
    if arch in torchvision.models.list_models():
        model = torchvision.models.get_model(arch, weights=None, num_classes=len(dataset.classes),
                                             **({"aux_logits": False, "init_weights": True} if arch == "googlenet"
                                                else {}))
    else:  # efficientnet_lite0, timm/<name>: the model of timm's zoo, as a timm user builds it
        import timm

        model = timm.create_model(arch.removeprefix("timm/"), num_classes=len(dataset.classes))
    if frozen:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(("fc.", "classifier."))
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rates, step = [], 0
    with mlflow.start_run(run_name="naive-baseline"):
        for _ in range(epochs):
            start, seen = time.perf_counter(), 0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                mlflow.log_metric("batch_loss", loss.item(), step=step)
                seen += len(y)
            rates.append(seen / (time.perf_counter() - start))
    return rates


def whole_process(args) -> None:
    """Wall time of two whole processes on the same JPEG files, alternating (this VM is noisy):
    ``mlflow run -e train`` (launcher, imports, decode, training, validation, checkpoints, figures)
    and the naive loop (imports, ImageFolder/DataLoader, per-batch log_metric; no validation)."""
    import subprocess
    import sys

    work = Path(tempfile.mkdtemp(prefix="sceneml-whole-"))
    folder = jpeg_folder(args.data, args.image_size, args.per_class, work / "jpeg")
    from sceneml.config import TrainConfig
    from sceneml.data import Splitting, prepare_data

    cfg = TrainConfig()  # the naive loop trains on the images of sceneml's train split, decoded by itself
    splitting = Splitting(cfg.seed, cfg.val_fraction, cfg.test_fraction)
    data = prepare_data(str(folder), args.image_size, splitting, cfg.decode_workers(), progress=False,
                        cache=work / "split-cache")
    keep_file = work / "train_files.txt"
    keep_file.write_text("\n".join(str((data.source.root / p).resolve()) for p in data.splits["train"].paths))
    env = {**os.environ, "SCENEML_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    sceneml_cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
                   "-P", f"data={folder}", "-P", f"epochs={args.epochs}", "-P", f"image_size={args.image_size}",
                   "-P", f"batch_size={args.batch_size}", "-P", f"arch={args.arch}", "-P", "weights=none",
                   "-P", f"precision={args.precision}", "-P", f"compile={str(args.compile).lower()}"]
    # ImageFolder needs the folder whose subfolders are the classes (Kaggle: seg_train/seg_train)
    naive_cmd = [sys.executable, __file__, "--naive-only", str(keep_file), "--data", str(data.source.train_dir),
                 "--epochs", str(args.epochs), "--image-size", str(args.image_size),
                 "--batch-size", str(args.batch_size), "--arch", args.arch,
                 "--naive-workers", str(args.naive_workers)]
    times: dict[str, list[float]] = {"sceneml": [], "naive": []}
    for i in range(args.whole_process):
        for name, cmd in (("sceneml", sceneml_cmd), ("naive", naive_cmd)):
            run_dir = work / f"{name}-{i}"
            run_dir.mkdir()
            # each process starts with a cold decode cache and a fresh store, as a first run would
            run_env = {**env, "SCENEML_CACHE": str(run_dir / "cache"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlflow.db'}"}
            started = time.perf_counter()
            subprocess.run(cmd, cwd=run_dir, env=run_env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
            print(f"pair {i + 1} {name:<8} {times[name][-1]:7.1f} s", flush=True)
    s, n = np.array(times["sceneml"]), np.array(times["naive"])
    print(f"\nwhole process, {args.epochs} epochs, {args.image_size} px, {folder}:")
    print(f"  sceneml (mlflow run -e train): min {s.min():.1f} s, median {np.median(s):.1f} s")
    print(f"  naive loop:                    min {n.min():.1f} s, median {np.median(n):.1f} s")
    print(f"  naive/sceneml: min-to-min {n.min() / s.min():.2f}, median-to-median {np.median(n) / np.median(s):.2f}")
    record("train_throughput", [{"setting": setting(args), "epoch": "whole process", "pairs": len(s),
                                 "sceneml_min_s": f"{s.min():.1f}", "sceneml_median_s": f"{np.median(s):.1f}",
                                 "naive_min_s": f"{n.min():.1f}", "naive_median_s": f"{np.median(n):.1f}"}])


def naive_process(args) -> None:
    """One whole naive process for --whole-process: it imports only what a plain script would (torch,
    torchvision, MLflow), trains on the images of sceneml's train split (listed in ``args.naive_only``)
    and logs to the store ``MLFLOW_TRACKING_URI`` names."""
    import mlflow

    from sceneml.models import pick_device

    mlflow.set_experiment("throughput")
    keep = set(Path(args.naive_only).read_text().splitlines())
    measure_naive(args.arch, Path(args.data), keep, args.image_size, args.batch_size, args.epochs,
                  pick_device(args.device), args.freeze_backbone, args.naive_workers)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def setting(args) -> str:
    """What a row measured, in words: the model, the images and the arithmetic."""
    data = {str(INTEL_MINI): "intel-mini", "synthetic": "embedded scenes"}.get(args.data, args.data)
    return ", ".join([args.arch, f"{args.image_size} px", f"batch {args.batch_size}", data, args.precision,
                      *(["compile"] if args.compile else []), *(["frozen backbone"] if args.freeze_backbone else [])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(INTEL_MINI) if INTEL_MINI.exists() else "synthetic")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=60, help="synthetic images per class (when --data synthetic)")
    ap.add_argument("--freeze-backbone", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--naive-workers", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--precision", default="fp32", help="of limit and sceneml: fp32, auto, bf16, fp16")
    ap.add_argument("--compile", action="store_true", help="torch.compile in limit and sceneml")
    ap.add_argument("--whole-process", type=int, default=0, metavar="PAIRS",
                    help="time whole processes instead: `mlflow run -e train` and the naive loop, alternating")
    ap.add_argument("--naive-only", default="", help=argparse.SUPPRESS)  # file of train images: one naive process
    args = ap.parse_args()
    one_at_a_time()
    if args.whole_process:
        return whole_process(args)
    if args.naive_only:
        return naive_process(args)

    work = Path(tempfile.mkdtemp(prefix="sceneml-bench-"))
    os.environ["SCENEML_CACHE"] = str(work / "cache")  # cold decode cache: epoch 1 pays for decoding
    os.environ.setdefault("SCENEML_OFFLINE", "1")
    import mlflow
    import torch

    from sceneml.config import TrainConfig
    from sceneml.data import Splitting, prepare_data
    from sceneml.models import pick_device
    from sceneml.tasks.train import train as run_train

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("throughput")
    device = pick_device(args.device)
    folder = jpeg_folder(args.data, args.image_size, args.per_class, work / "jpeg")
    cfg = TrainConfig(data=str(folder), arch=args.arch, weights="none", epochs=args.epochs,
                      batch_size=args.batch_size, image_size=args.image_size, freeze_backbone=args.freeze_backbone,
                      device=args.device, quiet=True, precision=args.precision, compile=args.compile)

    started = time.perf_counter()
    splitting = Splitting(cfg.seed, cfg.val_fraction, cfg.test_fraction)
    data = prepare_data(cfg.data, cfg.image_size, splitting, cfg.decode_workers(), progress=False)
    decode_seconds = time.perf_counter() - started
    n_all = sum(len(s) for s in data.splits.values())
    train = data.splits["train"]
    keep = {str((data.source.root / p).resolve()) for p in train.paths}
    print(f"device {device} ({torch.get_num_threads()} threads), {args.arch}, {args.image_size} px, batch "
          f"{args.batch_size}, {len(train)} train JPEGs of {n_all} ({folder}), freeze_backbone={args.freeze_backbone}")
    print(f"decode of all {n_all} images into the cache: {decode_seconds:.1f} s")

    from sceneml.engine.precision import resolve_precision
    from sceneml.models import build_model

    amp = resolve_precision(args.precision, device, build_model(args.arch, 6, "none")[0])
    print(f"precision {args.precision} -> {amp or torch.float32}, compile={args.compile} (limit and sceneml; "
          "naive is fp32 eager)")
    limit = measure_limit(args.arch, train.pixels, train.labels, args.batch_size, args.epochs, device,
                          args.freeze_backbone, amp, args.compile)
    run_id = run_train(cfg)  # the cache is warm now; its decode time is added to epoch 1 below
    client = mlflow.MlflowClient()

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    train_s, epoch_s, log_s = history("train_seconds"), history("epoch_seconds"), history("log_seconds")
    cache_s = history("feature_cache_seconds")[0] if args.freeze_backbone else 0.0
    # sceneml's epoch 1 pays for decoding every split and (frozen) for the feature cache
    sceneml = [len(train) / (t + (decode_seconds + cache_s if e == 0 else 0.0)) for e, t in enumerate(train_s)]
    sceneml_full = [len(train) / (t + (decode_seconds + cache_s if e == 0 else 0.0)) for e, t in enumerate(epoch_s)]
    naive = measure_naive(args.arch, data.source.train_dir, keep, args.image_size, args.batch_size, args.epochs, device,
                          args.freeze_backbone, args.naive_workers)

    print(f"\n{'epoch':>5} {'limit':>8} {'sceneml':>8} {'+val+ckpt':>9} {'naive':>8} {'log s':>6}"
          f" {'sceneml/limit':>13} {'sceneml/naive':>13}   (img/s)")
    for e in range(args.epochs):
        print(f"{e + 1:>5} {limit[e]:8.1f} {sceneml[e]:8.1f} {sceneml_full[e]:9.1f} {naive[e]:8.1f} {log_s[e]:6.2f}"
              f" {sceneml[e] / limit[e]:13.2f} {sceneml[e] / naive[e]:13.2f}")
    total_sceneml = decode_seconds + cache_s + sum(train_s)
    total_naive = sum(len(train) / r for r in naive)
    total_full = decode_seconds + cache_s + sum(epoch_s)
    print(f"\nwhole run, {args.epochs} epochs: sceneml {total_sceneml:.1f} s (training passes + decode"
          f"{' + feature cache' if args.freeze_backbone else ''}), naive {total_naive:.1f} s: "
          f"sceneml/naive = {total_naive / total_sceneml:.2f}")
    print(f"  with sceneml's validation and per-epoch checkpoint export too: {total_full:.1f} s, "
          f"sceneml/naive = {total_naive / total_full:.2f}")
    print(f"  MLflow logging inside sceneml's epochs: {sum(log_s):.1f} s in all"
          + (f"; feature cache (train + val): {cache_s:.1f} s" if args.freeze_backbone else ""))
    rows = [{"setting": setting(args), "epoch": e + 1, "limit": f"{limit[e]:.1f}",
             "sceneml": f"{sceneml[e]:.1f}", "with_val_ckpt": f"{sceneml_full[e]:.1f}", "naive": f"{naive[e]:.1f}",
             "log_s": f"{log_s[e]:.2f}"}
            for e in range(args.epochs)]
    rows.append({"setting": setting(args), "epoch": "run", "sceneml_s": f"{total_sceneml:.1f}",
                 "with_val_ckpt_s": f"{total_full:.1f}", "naive_s": f"{total_naive:.1f}", "log_s": f"{sum(log_s):.2f}"})
    record("train_throughput", rows)


if __name__ == "__main__":
    main()
