"""Peak memory of `analyze`'s activation and covariance statistics, for n_images 200 and 2000.

    python benchmarks/analyze_memory.py [--arch resnet18] [--sizes 200,2000]

Each size runs in a fresh process: ResNet18 (random init; the statistics' cost does not depend on
the weights) with forward hooks on the five default modules, over that many embedded-scene images
read batch by batch, as `analyze` does. Reported: the process's peak RSS, and its growth during the
statistics (peak minus the resident size just before, after one warm-up batch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from one_at_a_time import one_at_a_time
from results import record


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(arch: str, n_images: int) -> None:
    import torch

    from sceneml import analysis
    from sceneml.models import build_model
    from sceneml.tasks.analyze import _synthetic_files, file_set, float_batches

    torch.manual_seed(0)
    model, _ = build_model(arch, 6, "none")
    model.eval()
    modules = analysis.resolve_modules(model, analysis.default_modules(arch, model))
    images = file_set("synthetic", _synthetic_files(math.ceil(n_images / 6)), 64)
    device = torch.device("cpu")
    analysis.module_statistics(model, modules, float_batches(images, 64, 64, 64, device, seed=1))  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    started = time.perf_counter()
    stats = analysis.module_statistics(model, modules, float_batches(images, n_images, 64, 64, device, seed=0))
    seconds = time.perf_counter() - started
    print(json.dumps({"n_images": next(iter(stats.values())).nonpos_pct.n, "peak_kib": _rss_kib("VmHWM"),
                      "before_kib": before, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--sizes", default="200,2000")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.arch, args.child)
        return
    one_at_a_time()
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--child", str(n)], check=True,
                             capture_output=True, text=True, env={**os.environ, "SCENEML_OFFLINE": "1"})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"n_images {r['n_images']:>5}: peak RSS {r['peak_kib'] / 1024:7.1f} MiB, growth during the "
              f"statistics {(r['peak_kib'] - r['before_kib']) / 1024:6.1f} MiB, {r['seconds']:.1f} s")
    a, b = results[0], results[-1]
    print(f"peak RSS ratio {b['n_images']} vs {a['n_images']} images: {b['peak_kib'] / a['peak_kib']:.3f}; "
          f"growth difference {(b['peak_kib'] - b['before_kib'] - a['peak_kib'] + a['before_kib']) / 1024:+.1f} MiB")
    record("analyze_memory", [{"arch": args.arch, "n_images": r["n_images"], "peak_mib": f"{r['peak_kib'] / 1024:.1f}",
                               "growth_mib": f"{(r['peak_kib'] - r['before_kib']) / 1024:.1f}",
                               "seconds": f"{r['seconds']:.1f}"} for r in results])


if __name__ == "__main__":
    main()
