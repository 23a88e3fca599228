"""Wall time of the whole embedded study, `mlflow run .` with its defaults, end to end.

    python benchmarks/study_time.py            # fresh store and a cold cache (renders the scenes)
    python benchmarks/study_time.py --warm     # reuse ~/.cache/sceneml (the scenes already rendered)
    python benchmarks/study_time.py -- -P epochs=1   # extra arguments go to `mlflow run`

Runs in a temporary folder with its own sqlite store; prints the wall time, the peak RSS of the
study process, and each run's duration from the store.
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

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", action="store_true", help="keep the user's cache instead of a cold one")
    ap.add_argument("mlflow_args", nargs="*")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sceneml-study-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SCENEML_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if not args.warm:
        env["SCENEML_CACHE"] = str(work / "cache")
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", *args.mlflow_args]
    print(" ".join(cmd), f"(cache: {'warm' if args.warm else 'cold'}, cwd {work})", flush=True)
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


if __name__ == "__main__":
    main()
