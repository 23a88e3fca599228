"""bf16 autocast against float32 on the CPU, architecture by architecture: images per second of sceneml's
bare training step (the model as `train` builds it, channels_last, AdamW, cross-entropy) on random
tensors already in memory, the two precisions alternating round by round in one process.

    python benchmarks/precision.py                                  # every architecture of the registry
    python benchmarks/precision.py --archs resnet18,efficientnet_lite0 --image-size 160 --threads 2

`precision=auto` on a CPU with AMX takes bf16 only for the architectures where it measured faster
(sceneml/engine/precision.py says which); each row here is one architecture at one size.
"""

from __future__ import annotations

import argparse
import statistics
import time

from one_at_a_time import one_at_a_time
from results import record


def step_rate(model, opt, x, y, amp_dtype, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from sceneml.models import split_logits

    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, _ = split_logits(model(x))
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * len(y) / (time.perf_counter() - start)


def measure(arch: str, size: int, batch_size: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """img/s of each precision per round; each round runs fp32 then bf16 (after one warm-up step each)."""
    import torch

    from sceneml.models import build_model

    torch.manual_seed(0)
    x = torch.rand(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch_size,))
    models = {}
    for name in ("fp32", "bf16"):
        model, _ = build_model(arch, 6, "none")
        model = model.to(memory_format=torch.channels_last).train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for name, (model, opt) in models.items():
        step_rate(model, opt, x, y, dtypes[name], 1)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name, (model, opt) in models.items():
            rates[name].append(step_rate(model, opt, x, y, dtypes[name], steps))
    return rates


def main() -> None:
    from sceneml.architectures import ARCHS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="training steps per precision and round")
    args = parser.parse_args()
    one_at_a_time()
    import torch

    from sceneml.engine.precision import cpu_has_bf16_tiles

    torch.set_num_threads(args.threads)
    print(f"AMX bf16 tiles: {cpu_has_bf16_tiles()}; {args.threads} threads, batch {args.batch_size}, "
          f"{args.image_size} px")
    rows = []
    for arch in args.archs.split(","):
        rates = measure(arch, args.image_size, args.batch_size, args.rounds, args.steps)
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"arch": arch, "image_size": args.image_size, "batch_size": args.batch_size,
                     "threads": args.threads, "fp32_img_s": f"{med['fp32']:.1f}", "bf16_img_s": f"{med['bf16']:.1f}",
                     "bf16_over_fp32": f"{med['bf16'] / med['fp32']:.2f}"})
        print(f"{arch:20s} fp32 {med['fp32']:7.1f} img/s   bf16 {med['bf16']:7.1f} img/s   "
              f"bf16/fp32 {med['bf16'] / med['fp32']:.2f}  (medians of {args.rounds} rounds)", flush=True)
    record("precision", rows)


if __name__ == "__main__":
    main()
