"""What a study costs. By default, how the cost grows: `mlflow run -e main` for 1, 2 and 4 children and
for 300, 1,200 and 4,800 embedded images per class (64 px, 1 epoch), and a tiny `train` run (1 epoch,
30 images). With --default-study: the whole embedded study, `mlflow run .` with its defaults.

    python benchmarks/study_time.py            # every row (about 15 minutes on 2 cores)
    python benchmarks/study_time.py --quick    # children 1, 2 and 300 / 1,200 per class only
    python benchmarks/study_time.py --default-study [--warm] [-- -P epochs=1]

Each row is one `mlflow run` on a fresh sqlite store in a temporary folder, with one shared cache in
which the scenes are rendered before any timing (rendering is the embedded data's cost, not a
study's). Prints wall time and peak RSS per row, and a least-squares split of wall time into a
fixed part and a part per image (over the data-size rows) and per child (over the children rows).
The default study runs on a fresh store and a cold cache (renders the scenes) unless --warm; it prints
the wall time, the peak RSS of the study process, and each run's duration from the store.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from one_at_a_time import one_at_a_time
from results import record

REPO = Path(__file__).resolve().parents[1]
# the peak RSS of one command and everything it starts, reported by a wrapper process of its own
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL).returncode; "
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
# the tiny run: 5 embedded images per class, 30 in all, 6 per split
TINY = {"data": "synthetic:5", "epochs": "1", "weights": "none", "val_fraction": "0.2", "test_fraction": "0.2"}


def render_scenes(cache: Path, per_class: list[int]) -> None:
    """Render the embedded scenes into ``cache`` before any timing: rendering is the embedded data's
    cost, not a study's."""
    for n in per_class:
        render = f"from sceneml.data import resolve_source; resolve_source('synthetic:{n}')"
        subprocess.run([sys.executable, "-c", render], env={**os.environ, "SCENEML_CACHE": str(cache)}, check=True)


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


def default_study(warm: bool, mlflow_args: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="sceneml-study-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SCENEML_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if not warm:
        env["SCENEML_CACHE"] = str(work / "cache")
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", *mlflow_args]
    print(" ".join(cmd), f"(cache: {'warm' if warm else 'cold'}, cwd {work})", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"mlflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    import mlflow

    mlflow.set_tracking_uri(uri)
    for run in sorted(mlflow.search_runs(search_all_experiments=True, output_format="list"),
                      key=lambda r: r.info.start_time):
        print(f"  {run.info.run_name:<20} {(run.info.end_time - run.info.start_time) / 1000:6.1f} s  {run.info.status}")
    print(next((line for line in proc.stdout.splitlines() if line.startswith("champion:")), ""))
    print(f"study wall time {wall:.0f} s ({wall / 60:.1f} min), peak RSS {peak:.0f} MiB, {os.cpu_count()} CPU cores")
    label = " ".join(["mlflow run .", *mlflow_args, f"({'warm' if warm else 'cold'} cache)"])
    record("study_time", [{"row": label, "wall_s": f"{wall:.1f}", "peak_mib": f"{peak:.0f}"}])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--default-study", action="store_true", help="time `mlflow run .` with its defaults instead")
    ap.add_argument("--warm", action="store_true", help="--default-study: keep the user's cache, not a cold one")
    ap.add_argument("mlflow_args", nargs="*", help="--default-study: extra arguments of `mlflow run`")
    ap.add_argument("--tiny", action="store_true", help="only where the tiny run's time goes")
    args = ap.parse_args()
    one_at_a_time()
    if args.tiny:
        cache = Path(tempfile.mkdtemp(prefix="sceneml-scaling-cache-"))
        render_scenes(cache, [5])
        return tiny_parts(cache)
    if args.default_study:
        return default_study(args.warm, args.mlflow_args)
    sizes = [300, 1200] if args.quick else [300, 1200, 4800]
    children = ["adamw", "adamw,sgd"] if args.quick else ["adamw", "adamw,sgd", "adamw,sgd,rmsprop,adam"]
    cache = Path(tempfile.mkdtemp(prefix="sceneml-scaling-cache-"))
    render_scenes(cache, sorted({*sizes, 5}))
    common = {"epochs": "1", "weights": "none", "n_images": "60", "image_size": "64"}
    print(f"{'row':<34} {'images':>7} {'wall s':>8} {'peak RSS MiB':>13}", flush=True)
    tiny_wall, tiny_peak = run("train", TINY, cache)
    print(f"{'tiny train (30 images, 1 epoch)':<34} {30:>7} {tiny_wall:8.1f} {tiny_peak:13.0f}", flush=True)
    rows = [{"row": "tiny train (30 images, 1 epoch)", "images": 30, "wall_s": f"{tiny_wall:.1f}",
             "peak_mib": f"{tiny_peak:.0f}"}]
    by_size = []
    for n in sizes:
        wall, peak = run("main", {**common, "data": f"synthetic:{n}", "optimizers": "adamw"}, cache)
        by_size.append((6 * n, wall))
        print(f"{f'main, 1 child, {n}/class':<34} {6 * n:>7} {wall:8.1f} {peak:13.0f}", flush=True)
        rows.append({"row": f"main, 1 child, {n}/class", "images": 6 * n, "wall_s": f"{wall:.1f}",
                     "peak_mib": f"{peak:.0f}"})
    by_child = []
    for opts in children:
        k = len(opts.split(","))
        wall, peak = run("main", {**common, "data": "synthetic:300", "optimizers": opts}, cache)
        by_child.append((k, wall))
        print(f"{f'main, {k} child(ren), 300/class':<34} {1800:>7} {wall:8.1f} {peak:13.0f}", flush=True)
        rows.append({"row": f"main, {k} child(ren), 300/class", "images": 1800, "wall_s": f"{wall:.1f}",
                     "peak_mib": f"{peak:.0f}"})
    x, y = np.array(by_size, dtype=float).T
    per_image, fixed = np.polyfit(x, y, 1)
    xc, yc = np.array(by_child, dtype=float).T
    per_child, study_fixed = np.polyfit(xc, yc, 1)
    print(f"\nwall = {fixed:.1f} s + {per_image * 1000:.2f} ms x images   (1 child, 1 epoch, 64 px; fit over sizes)")
    print(f"wall = {study_fixed:.1f} s + {per_child:.1f} s x children (300/class; fit over children)")
    print(f"tiny train run: {tiny_wall:.1f} s wall, {os.cpu_count()} CPU cores")
    rows += [{"row": "fit over sizes: fixed s + ms per image", "wall_s": f"{fixed:.1f}",
              "per_unit": f"{per_image * 1000:.2f} ms/image"},
             {"row": "fit over children: fixed s + s per child", "wall_s": f"{study_fixed:.1f}",
              "per_unit": f"{per_child:.1f} s/child"}]
    record("study_time", rows)
    tiny_parts(cache)


def tiny_parts(cache: Path, repeats: int = 3) -> None:
    """Where the tiny run's time goes (min of ``repeats``): `import sceneml.tasks.train` alone (torch,
    torchvision, MLflow, sklearn), the entry point run directly (imports + the run itself), and
    `mlflow run` of it (+ MLflow's launcher process: its imports, the project, the run it creates)."""
    times: dict[str, list[float]] = {"imports": [], "entry point": [], "mlflow run": []}
    for _ in range(repeats):
        work = Path(tempfile.mkdtemp(prefix="sceneml-tiny-"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "SCENEML_OFFLINE": "1",
               "SCENEML_CACHE": str(cache)}
        subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"],
                       cwd=work, env=env, check=True, capture_output=True)  # the store exists, as for a user
        for name, cmd in (("imports", [sys.executable, "-c", "import sceneml.tasks.train"]),
                          ("entry point", [sys.executable, str(REPO / "entrypoints" / "train.py"), "--quiet",
                                           *[a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", v)]]),
                          ("mlflow run", [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train",
                                          "--env-manager", "local",
                                          *[a for k, v in TINY.items() for a in ("-P", f"{k}={v}")]])):
            started = time.perf_counter()
            subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
            times[name].append(time.perf_counter() - started)
    imports, direct, launched = (min(times[k]) for k in ("imports", "entry point", "mlflow run"))
    print(f"\ntiny run on an existing store, min of {repeats}: imports {imports:.1f} s; entry point run directly "
          f"{direct:.1f} s (so the run itself {direct - imports:.1f} s); mlflow run {launched:.1f} s (so MLflow's "
          f"launcher {launched - direct:.1f} s)")
    record("study_time", [{"row": f"tiny run, {what} (min of {repeats})", "images": 30, "wall_s": f"{value:.1f}"}
                          for what, value in (("import sceneml.tasks.train", imports),
                                              ("entry point run directly", direct), ("mlflow run -e train", launched))])


if __name__ == "__main__":
    main()
