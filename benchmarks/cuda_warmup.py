"""Why is the first epoch of every training on CUDA slow? (issue 8: the default's cv took ≈ 9 min on an H200,
≈ 115 s of it in first epochs; benchmarks/results/cuda.md).

The H200 run's logs fit one explanation: a first epoch was slow (8-31 s, later epochs ≈ 0.6 s) exactly when it met a
training batch size the process had not trained on yet — every fold's last partial batch (537 images: 16 x 32 + 25)
and every refit's (681: ... + 9) — and fast (1 s) when the size was already known (fold 5's 26 after fold 3's, fold
2's refit whose one-image remainder is dropped). cuDNN builds execution plans per shape, and cuDNN >= 9.10
compiles depthwise-convolution kernels at run time (NVIDIA/cudnn-frontend#1066, about 1.5 s each); PyTorch sends
depthwise convolutions to cuDNN whenever the input is channels_last, which SkinLesionNet always makes it.

This script times, in a fresh process per variant, one training step (bf16 autocast, backward, AdamW) of the
default's Lite0 + AGFN at each batch size the default meets on fold 1 (32, the 25 remainder, the refit's 9, then 32
again), first and second call, plus evaluation forwards at 64 and 16:

    channels_last   today's path
    contiguous      NCHW input and weights (depthwise convolutions go to PyTorch's own kernel)
    no_cudnn        torch.backends.cudnn.enabled = False

    python benchmarks/cuda_warmup.py --out OUT/cuda_warmup.json      # about 1-2 min on one H100/H200

Random weights (no download): timing only. Reads nothing from the dataset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

VARIANTS = ("channels_last", "contiguous", "no_cudnn")
TRAIN_SIZES = (32, 25, 9, 32)
EVAL_SIZES = (64, 16)


def _timed(fn, torch) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return round(time.perf_counter() - t, 3)


def run_variant(variant: str, image_size: int, device: str) -> dict:
    import torch

    from mpoxscope.config import ModelConfig
    from mpoxscope.models import factory
    from mpoxscope.models.factory import create_model

    if variant == "no_cudnn":
        torch.backends.cudnn.enabled = False
    t0 = time.perf_counter()
    model = create_model(ModelConfig(pretrained="none", image_size=image_size), 6).to(device)
    if variant == "contiguous":
        model = model.to(memory_format=torch.contiguous_format)

        def forward_features(self, x, start=0, stop=None):  # SkinLesionNet's, without the channels_last copy
            for stage in self.stages[start:stop]:
                x = stage(x)
            return x
        factory.SkinLesionNet.forward_features = forward_features
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    setup_s = round(time.perf_counter() - t0, 2)

    def step(n: int) -> None:
        x = torch.randn(n, 3, image_size, image_size, device=device)
        y = torch.randint(0, 6, (n,), device=device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def evaluate(n: int) -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            model(torch.randn(n, 3, image_size, image_size, device=device))

    model.train()
    train = [{"batch": n, "first_s": _timed(lambda n=n: step(n), torch), "second_s": _timed(lambda n=n: step(n), torch)}
             for n in TRAIN_SIZES]
    model.eval()
    evals = [{"batch": n, "first_s": _timed(lambda n=n: evaluate(n), torch),
              "second_s": _timed(lambda n=n: evaluate(n), torch)} for n in EVAL_SIZES]
    return {"variant": variant, "setup_s": setup_s, "train": train, "eval": evals,
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else device}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    ap.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (used internally)")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.image_size, args.device)))
        return 0
    results = []
    for v in VARIANTS:  # a fresh process each: plan caches and loaded kernels must not carry over
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--out", args.out, "--variant", v, "--image-size", str(args.image_size),
               "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        lines = proc.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"variant": v, "error": proc.stderr[-2000:]}
        row["process_s"] = round(time.perf_counter() - t, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
