"""The machine's pace: images per second of a ResNet18 training step (forward, backward, SGD step) at
96 px, batch 32, float32, on random tensors already in memory. The pace of one VM moves from one day to
the next, so every timing in benchmarks/README.md is shown beside this figure, and the test suite's
budget scales with it (5 minutes at 90 img/s).

    python benchmarks/pace.py                      # the pace (about 15 s), a row in results/pace.csv
    python benchmarks/pace.py --since <epoch s>    # and the wall time since then against the suite's
                                                   # budget at this pace (`make test` calls this;
                                                   # --record adds it to results/pace.csv)
"""

from __future__ import annotations

import argparse
import time

from results import record

FULL_PACE = 90.0  # img/s of this probe at which the suite's budget is SUITE_BUDGET_S
SUITE_BUDGET_S = 300.0
THREADS = 2
BATCH = 32
SIZE = 96


def pace(seconds: float = 10.0, threads: int = THREADS) -> float:
    """Median images per second over one-second windows of training steps, after three warm-up steps."""
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = torchvision.models.resnet18(num_classes=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 6, (BATCH,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    rates, until = [], time.perf_counter() + seconds
    while time.perf_counter() < until:
        started, steps = time.perf_counter(), 0
        while time.perf_counter() - started < 1.0:
            step()
            steps += 1
        rates.append(steps * BATCH / (time.perf_counter() - started))
    return sorted(rates)[len(rates) // 2]


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to measure")
    parser.add_argument("--since", type=float, help="a start time (seconds since the epoch) to compare with the "
                                                    "suite's budget at the measured pace")
    parser.add_argument("--record", action="store_true", help="with --since: add the row to results/pace.csv")
    args = parser.parse_args()
    took = time.time() - args.since if args.since else None
    rate = pace(args.seconds)
    print(f"pace: {rate:.0f} img/s (ResNet18 training step, {SIZE} px, batch {BATCH}, {THREADS} threads, fp32)")
    if took is None:
        record("pace", [{}], pace=rate)
        return
    budget = SUITE_BUDGET_S * FULL_PACE / rate
    print(f"the tests took {minutes(took)}; their budget at this pace: 5 min x {FULL_PACE:.0f} / {rate:.0f} = "
          f"{minutes(budget)}")
    if args.record:
        record("pace", [{"command": "make test PACE_ARGS=--record", "tests_s": f"{took:.0f}",
                         "budget_s": f"{budget:.0f}"}], pace=rate)


if __name__ == "__main__":
    main()
