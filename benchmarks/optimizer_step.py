"""One optimizer step over ResNet18's parameters (6 classes), torch's implementations side by side:
the per-tensor loop (torch's default on the CPU), the multi-tensor one (``foreach``) and the fused
kernel (``fused``, what sceneml uses for Adam, AdamW and SGD). The contenders alternate, round after
round, and each prints its min and median over the rounds.

    python benchmarks/optimizer_step.py                 # adamw and sgd, torch's default threads
    python benchmarks/optimizer_step.py --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from one_at_a_time import one_at_a_time
from results import record

OPTIMIZERS = {
    "adamw": lambda params, **kw: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, **kw),
    "sgd": lambda params, **kw: torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4,
                                                **kw),
}
KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per round and contender")
    args = ap.parse_args()
    one_at_a_time()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, resnet18 (6 classes), ms per step")
    rows = []
    for name, make in OPTIMIZERS.items():
        models = {k: torchvision.models.resnet18(num_classes=6) for k in KINDS}
        optimizers = {}
        for kind, model in models.items():
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            optimizers[kind] = make(model.parameters(), **KINDS[kind])
            optimizers[kind].step()  # creates the state
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        for _ in range(args.rounds):
            for kind, optimizer in optimizers.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    optimizer.step()
                times[kind].append((time.perf_counter() - start) / args.steps * 1000)
        loop = statistics.median(times["loop"])
        for kind, t in times.items():
            print(f"{name:6} {kind:8} min {min(t):6.1f}  median {statistics.median(t):6.1f}  "
                  f"loop/{kind} {loop / statistics.median(t):4.1f}x")
            rows.append({"optimizer": name, "kind": kind, "threads": args.threads, "min_ms": f"{min(t):.1f}",
                         "median_ms": f"{statistics.median(t):.1f}"})
    record("optimizer_step", rows)


if __name__ == "__main__":
    main()
