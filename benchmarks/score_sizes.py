"""The best model of each run kept by `time_to_accuracy.py --work` scored on its held-out photos at several image
sizes, with and without horizontal-flip test-time augmentation (`evaluate`'s ``tta``).

A model trained on random-resized crops sees objects larger than a resized whole photo shows them
(FixRes, Touvron et al. 2019); this prints which size to score it at:

    python benchmarks/time_to_accuracy.py --contenders fast --budgets 15 --work /tmp/tta
    python benchmarks/score_sizes.py /tmp/tta --sizes 96,112,128,144,160

Each photo is resized with the same PIL bilinear filter that `train` and `evaluate` decode with.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from one_at_a_time import one_at_a_time
from results import record
from time_to_accuracy import train_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="the --work folder of time_to_accuracy.py")
    ap.add_argument("--sizes", default="96,112,128,144,160", help="pixels per side, comma list")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    one_at_a_time()

    import mlflow
    import numpy as np
    import torch

    from sceneml.data.decode import load_rgb
    from sceneml.data.sources import list_images
    from sceneml.engine.inference import predict_log_probs

    torch.set_num_threads(args.threads)
    _, items = list_images(args.work / "data" / "seg_test")
    print(f"{len(items)} held-out photos")
    rows = []
    for store in sorted(p.parent for p in (args.work / "runs").glob("*/mlflow.db")):
        run = train_run(store)
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
        model = mlflow.pytorch.load_model(f"models:/{run.data.tags['sceneml.best_model_id']}")
        classes = json.loads(run.data.params["classes"])
        labels = np.array([classes.index(name) for _, name in items])
        print(f"\n{store.name}: trained at image_size {run.data.params['image_size_resolved']}, "
              f"train_crop_size {run.data.params.get('train_crop_size', '0')}")
        print(f"{'size':>5} {'test_acc':>8} {'with tta':>8}")
        trained = (f"{run.data.params['recipe']} recipe, image_size {run.data.params['image_size_resolved']}, "
                   f"train_crop_size {run.data.params.get('train_crop_size', '0')}")
        for size in (int(s) for s in args.sizes.split(",")):
            pixels = np.stack([load_rgb(path, size) for path, _ in items])
            with torch.no_grad():
                acc = [float((predict_log_probs(model, pixels, torch.device("cpu"), tta=tta).argmax(1) == labels)
                             .mean()) for tta in (False, True)]
            print(f"{size:5d} {acc[0]:8.4f} {acc[1]:8.4f}", flush=True)
            rows.append({"model": trained, "size": size, "test_acc": f"{acc[0]:.4f}", "test_acc_tta": f"{acc[1]:.4f}"})
    record("score_sizes", rows)


if __name__ == "__main__":
    main()
