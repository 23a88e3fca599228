"""How the cost of a study grows: `mlflow run -e main` for 1, 2 and 4 children and for 300, 1,200 and
4,800 embedded images per class (64 px, 1 epoch), and a tiny `train` run (1 epoch, 30 images).

    python benchmarks/study_scaling.py            # every row (about 15 minutes on 2 cores)
    python benchmarks/study_scaling.py --quick    # children 1, 2 and 300 / 1,200 per class only

Each row is one `mlflow run` on a fresh sqlite store in a temporary folder, with one shared cache in
which the scenes are rendered before any timing (rendering is the embedded data's cost, not a
study's). Prints wall time and peak RSS per row, and a least-squares split of wall time into a
fixed part and a part per image (over the data-size rows) and per child (over the children rows).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# the peak RSS of one command and everything it starts, reported by a wrapper process of its own
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL).returncode; "
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")


def run(entry: str, params: dict[str, str], cache: Path) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp(prefix="sceneml-scaling-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "SCENEML_OFFLINE": "1",
           "SCENEML_CACHE": str(cache), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
           "--experiment-name", "scaling"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    rc, peak = out.stdout.split()
    if rc != "0":
        sys.exit(f"{entry} {params} failed (rc {rc}); rerun it by hand in {work}")
    return wall, float(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [300, 1200] if args.quick else [300, 1200, 4800]
    children = ["adamw", "adamw,sgd"] if args.quick else ["adamw", "adamw,sgd", "adamw,sgd,rmsprop,adam"]
    cache = Path(tempfile.mkdtemp(prefix="sceneml-scaling-cache-"))
    env = {**os.environ, "SCENEML_CACHE": str(cache)}
    for n in sorted({*sizes, 5}):  # render before timing
        render = f"from sceneml.data import resolve_source; resolve_source('synthetic:{n}')"
        subprocess.run([sys.executable, "-c", render], env=env, check=True)
    common = {"epochs": "1", "weights": "none", "n_images": "60", "image_size": "64"}
    print(f"{'row':<34} {'images':>7} {'wall s':>8} {'peak RSS MiB':>13}", flush=True)
    tiny_wall, tiny_peak = run("train", {"data": "synthetic:5", "epochs": "1", "weights": "none", "val_fraction": "0.2",
                                         "test_fraction": "0.2"}, cache)  # 30 images: 6 per split
    print(f"{'tiny train (30 images, 1 epoch)':<34} {30:>7} {tiny_wall:8.1f} {tiny_peak:13.0f}", flush=True)
    by_size = []
    for n in sizes:
        wall, peak = run("main", {**common, "data": f"synthetic:{n}", "optimizers": "adamw"}, cache)
        by_size.append((6 * n, wall))
        print(f"{f'main, 1 child, {n}/class':<34} {6 * n:>7} {wall:8.1f} {peak:13.0f}", flush=True)
    by_child = []
    for opts in children:
        k = len(opts.split(","))
        wall, peak = run("main", {**common, "data": "synthetic:300", "optimizers": opts}, cache)
        by_child.append((k, wall))
        print(f"{f'main, {k} child(ren), 300/class':<34} {1800:>7} {wall:8.1f} {peak:13.0f}", flush=True)
    x, y = np.array(by_size, dtype=float).T
    per_image, fixed = np.polyfit(x, y, 1)
    xc, yc = np.array(by_child, dtype=float).T
    per_child, study_fixed = np.polyfit(xc, yc, 1)
    print(f"\nwall = {fixed:.1f} s + {per_image * 1000:.2f} ms x images   (1 child, 1 epoch, 64 px; fit over sizes)")
    print(f"wall = {study_fixed:.1f} s + {per_child:.1f} s x children (300/class; fit over children)")
    print(f"tiny train run: {tiny_wall:.1f} s wall (target <= 5 s), {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
