"""End-to-end training throughput (images/s) per backbone, input size and precision, on random batches.

    python benchmarks/train_throughput.py [--backbones tf_efficientnet_lite0 tf_efficientnet_lite2]
        [--sizes 224 256 260] [--precisions bf16 fp32] [--batch 16] [--steps 6] [--threads 2]
        [--out benchmarks/results/train_throughput]

One training step is what ``engine.train`` does for a fully fine-tuned model: AGFN head, channels_last, autocast
at the given precision, cross-entropy, backward, AdamW step. Data loading and augmentation are not included (the
engine decodes once and augments tensors; that costs a few per cent). Median of ``--steps`` timed steps after two
warm-up steps. No weights are loaded (speed does not depend on them: Lite0 224 px gave 16.5 img/s random, 16.6 with
its ImageNet weights), so nothing needs the network. The allocator
is tuned as the CLI tunes it for batch work (``engine.allocator``; without it these numbers are 1.3-1.8x lower).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mpoxscope.config import ModelConfig
from mpoxscope.engine.allocator import tune_for_batch_work
from mpoxscope.engine.batches import forward_from
from mpoxscope.engine.device import autocast
from mpoxscope.models.factory import create_model


def images_per_second(backbone: str, size: int, precision: str, batch: int, steps: int) -> float:
    model = create_model(ModelConfig(backbone=backbone, image_size=size, pretrained="none"), 6, load_weights=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 6, (batch,))
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            loss = torch.nn.functional.cross_entropy(forward_from(model, x, 0, 0).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 256, 260])
    ap.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=["bf16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args()
    if min(args.sizes) < 32 or args.batch < 1 or args.steps < 1:
        ap.error("--sizes must be >= 32, --batch and --steps >= 1")
    torch.set_num_threads(args.threads)
    tune_for_batch_work()
    rows = []
    for backbone in args.backbones:
        for precision in args.precisions:
            for size in args.sizes:
                ips = images_per_second(backbone, size, precision, args.batch, args.steps)
                rows.append({"backbone": backbone, "image_size": size, "precision": precision,
                             "images_per_s": round(ips, 2)})
                print(f"{backbone:24s} {size:4d} px {precision:5s} {ips:6.2f} img/s", flush=True)
    if args.out:
        meta = {"batch": args.batch, "steps": args.steps, "threads": args.threads, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(), "rows": rows}
        Path(args.out + ".json").write_text(json.dumps(meta, indent=2) + "\n")
        lines = [f"# End-to-end training throughput (batch {args.batch}, {args.threads} threads, torch "
                 f"{torch.__version__}; `python benchmarks/train_throughput.py`)", "",
                 "| backbone | px | precision | images/s |", "|---|---|---|---|"]
        lines += [f"| {r['backbone']} | {r['image_size']} | {r['precision']} | {r['images_per_s']:.1f} |" for r in rows]
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
