"""Predict latency per image: PyTorch (Predictor) vs ONNX Runtime (OnnxPredictor) on real MSLD v2.0 photos.

    python benchmarks/latency.py RUN [--threads 2]

RUN is a trained run directory (its model.onnx is exported if missing). Prints the median over repeats of the
model call alone and of ``predict_images`` (preprocessing included), per image, at batch 1 and batch 16.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mpoxscope.data.images import load_image
from mpoxscope.data.samples import msld_root
from mpoxscope.engine.predict import Predictor
from mpoxscope.export.onnx import OnnxPredictor


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(Path(msld_root(), "images").rglob("*.jpg"))[::40][:16]
    images = [load_image(p) for p in files]
    predictors = {"torch": Predictor.from_run(args.run, device="cpu"),
                  "onnxruntime": OnnxPredictor.from_run(args.run, threads=args.threads)}
    print(f"run {args.run}, {args.threads} threads, {len(images)} MSLD v2.0 images")
    for batch_size, reps in ((1, 25), (16, 5)):
        imgs = images[:batch_size]
        for name, p in predictors.items():
            batch = p.preprocess(imgs)
            model = median_seconds(lambda p=p, batch=batch: p.logits(batch), reps)
            e2e = median_seconds(lambda p=p, imgs=imgs: p.predict_images(imgs), reps)
            print(f"{name:12s} batch {batch_size:2d}: model {1000 * model / batch_size:6.1f} ms/image, "
                  f"predict_images {1000 * e2e / batch_size:6.1f} ms/image", flush=True)


if __name__ == "__main__":
    main()
