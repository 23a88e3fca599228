"""A time-to-accuracy run's best checkpoint on Intel *test* photos: the 120 of
``../shared/data/intel-mini/seg_test`` (Kaggle's seg_test, 20 per class). time_to_accuracy.py scores on a
held-out part of intel-train (the Kaggle training set); these photos come from the other set, and the
script checks that none of them is in intel-train, byte for byte or as a near copy (the pHash of
sceneml.data.duplicates within its 6 bits): the row records the nearest distance it found.

    python benchmarks/time_to_accuracy.py ... --work W         # keeps each run's store under W/runs/
    python benchmarks/official_test.py W/runs/<store>           # one row for that run's best checkpoint

Scored by `python -m sceneml predict` (the command a user types), with and without flip TTA; accuracy
and macro AP as sceneml logs them (sceneml.metrics.classification_metrics), with a 95 % percentile bootstrap interval of
the macro AP over the photos (scipy.stats.bootstrap, 2,000 resamples): 120 photos pin it down less than
the 1,676 of the held-out part. Appends a row to ``benchmarks/results/official_test.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from one_at_a_time import one_at_a_time
from results import record
from time_to_accuracy import INTEL_TRAIN, REPO, train_run

OFFICIAL_TEST = REPO.parent / "shared" / "data" / "intel-mini" / "seg_test" / "seg_test"
NAME = "official_test"  # benchmarks/results/official_test.csv


def nearest_phash_bits(photos: list[Path], reference: Path) -> tuple[int, int]:
    """(byte-identical files, fewest pHash bits between a photo and any photo under ``reference``)."""
    import hashlib

    from PIL import Image

    from sceneml.data.duplicates import perceptual_hashes

    def digests(paths):
        return {hashlib.md5(p.read_bytes()).hexdigest() for p in paths}

    def hashes(paths):
        return perceptual_hashes([np.asarray(Image.open(p).convert("RGB")) for p in paths])

    train = sorted(reference.rglob("*.jpg"))
    identical = len(digests(photos) & digests(train))
    bits = np.bitwise_count(hashes(photos)[:, None] ^ hashes(train)[None, :])
    return identical, int(bits.min())


def scores(store: Path, model_uri: str, classes: list[str], tta: bool) -> tuple[list[str], np.ndarray]:
    """`sceneml predict` on the test photos: (each photo's class folder, its probability of each of
    ``classes``)."""
    out = store / f"official_test{'_tta' if tta else ''}.csv"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "SCENEML_CACHE": str(store / "cache")}
    subprocess.run([sys.executable, "-m", "sceneml", "predict", "--model-uri", model_uri, "--input", str(OFFICIAL_TEST),
                    "--output", str(out), "--tta", str(tta).lower()], env=env, cwd=store, check=True,
                   capture_output=True)
    table = pd.read_csv(out, keep_default_na=False)
    assert not table["error"].any(), table[table["error"] != ""]
    probs = table[[f"prob_{c}" for c in classes]].to_numpy()
    return [Path(p).parent.name for p in table["path"]], probs


def macro_ap_interval(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of the macro AP, resampling the photos."""
    from scipy.stats import bootstrap

    from sceneml.metrics import nanmean_or_nan, per_class_average_precision

    interval = bootstrap((np.arange(len(y)),), lambda i: nanmean_or_nan(per_class_average_precision(y[i], probs[i])),
                         vectorized=False, n_resamples=2000, method="percentile", random_state=0).confidence_interval
    return round(float(interval.low), 4), round(float(interval.high), 4)


def main() -> None:
    from sceneml.metrics import classification_metrics

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path, help="a time-to-accuracy run's store (W/runs/<store> of its --work W)")
    args = ap.parse_args()
    if not OFFICIAL_TEST.is_dir():
        sys.exit(f"error: {OFFICIAL_TEST} is missing (../shared/data/intel-mini beside the checkout)")
    one_at_a_time()
    run = train_run(args.store)
    model_uri = f"models:/{run.data.tags['sceneml.best_model_id']}"
    photos = sorted(OFFICIAL_TEST.rglob("*.jpg"))
    identical, nearest = nearest_phash_bits(photos, INTEL_TRAIN)
    row = {"store": args.store.name, "model": model_uri, "photos": len(photos), "identical_in_train": identical,
           "nearest_phash_bits": nearest}
    classes = json.loads(run.data.params["classes"])
    for tta in (False, True):
        folders, probs = scores(args.store, model_uri, classes, tta)
        y = np.array([classes.index(f) for f in folders])
        suffix, metrics = "_tta" if tta else "", classification_metrics(y, probs, classes, "test")
        row["acc" + suffix], row["mAP" + suffix] = round(metrics["test_acc"], 4), round(metrics["test_mAP"], 4)
        if not tta:
            row["mAP_low"], row["mAP_high"] = macro_ap_interval(y, probs)
    print(row)
    record(NAME, [row])


if __name__ == "__main__":
    main()
