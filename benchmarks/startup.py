"""A short `python -m sceneml train` from the shell, whole process, with the task's modules imported the
plain way and as sceneml imports them (`sceneml.cli.import_for_good`: with the cyclic garbage collector
off during the imports, then one collection and `gc.freeze`). The two alternate, round after round, each
in a fresh process on a fresh sqlite store; the script prints min and median wall and CPU seconds of each.

    python benchmarks/startup.py        # 5 rounds, mobilenet_v3_small, 2 epochs of 126 training images at 32 px
    python benchmarks/startup.py --rounds 9 --arch resnet18
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from one_at_a_time import one_at_a_time
from results import record

# the process each round starts: `python -m sceneml <args>`, with the task imported by `importer`
DRIVER = """
import importlib, sys
import sceneml.cli as cli
if sys.argv.pop(1) == "plain":
    cli.import_for_good = importlib.import_module
cli.main(sys.argv[1:])
"""


def one_run(importer: str, args: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one process, on a store of its own."""
    with tempfile.TemporaryDirectory(prefix="sceneml-startup-") as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "SCENEML_OFFLINE": "1"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", DRIVER, importer, *args], env=env, cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arch", default="mobilenet_v3_small")
    args = ap.parse_args()
    one_at_a_time()
    train = ["train", "--data", "synthetic:30", "--arch", args.arch, "--weights", "none", "--image-size", "32",
             "--batch-size", "16", "--epochs", "2", "--quiet"]
    one_run("frozen", train)  # renders the embedded data set into the cache once, outside the timing
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "frozen": []}
    for _ in range(args.rounds):
        for importer in times:
            times[importer].append(one_run(importer, train))
    rows = []
    for importer, runs in times.items():
        wall, cpu = [w for w, _ in runs], [c for _, c in runs]
        print(f"{importer:7} wall min {min(wall):5.2f} median {statistics.median(wall):5.2f}  "
              f"cpu min {min(cpu):5.2f} median {statistics.median(cpu):5.2f}")
        rows.append({"arch": args.arch, "imports": importer, "rounds": args.rounds,
                     "wall_min_s": f"{min(wall):.2f}", "wall_median_s": f"{statistics.median(wall):.2f}",
                     "cpu_min_s": f"{min(cpu):.2f}", "cpu_median_s": f"{statistics.median(cpu):.2f}"})
    plain, frozen = (statistics.median(w for w, _ in times[k]) for k in ("plain", "frozen"))
    print(f"plain / frozen (median wall): {plain / frozen:.2f}")
    record("startup", rows)


if __name__ == "__main__":
    main()
