"""CPU inference throughput of every runtime variant, interleaved in one process, on real MSLD v2.0 photos.

    nice -n 19 .venv/bin/python benchmarks/inference.py RUN [--rounds 7] [--threads N]
        [--out benchmarks/results/inference.md]

Variants: (a) torchvision ResNet50, eager fp32, *random weights* (the seed's backbone; speed does not depend
on the weights), (b) the run's model in PyTorch fp32 (``Predictor``), (c) the same under bf16 autocast,
(d) ONNX Runtime fp32 (``RUN/model.onnx``), (e) ONNX Runtime int8 (``RUN/model.int8.onnx``, static QDQ,
with the fp32 fallback for near ties that ``mpoxscope export --quantize int8`` writes; made here when
missing), and (f, g) ONNX Runtime fp32/int8 graphs that take uint8 pixels and normalise inside
(``export --quantize int8 --pixel-input``; :mod:`mpoxscope.export.lite`, torch-free: Pillow resize only),
(i) the same int8 graph without the fallback (``--fallback-margin off``), (h) the run as recorded (its
test-time views).

Protocol: "end to end" is JPEG file bytes -> logits (decode with the product's decoder, resize, normalise,
model), "model only" is a preprocessed batch -> logits; each preprocessing step is also timed on its own. Every round
runs every variant once per setting in a shuffled order, so load from other processes hits all variants
alike; numbers are medians over rounds, in ms per image and images/s. Top-1 agreement is each variant's
argmax against (b) on all MSLD v2.0 images (the int8 calibration images, from the run's training split, are
among them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mpoxscope.data.images import IMAGE_EXTENSIONS, decode_image, load_image
from mpoxscope.data.samples import msld_root
from mpoxscope.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from mpoxscope.engine.predict import Predictor
from mpoxscope.export.lite import LiteOnnxPredictor, preprocess_numpy, resized_pixels, with_pixel_input
from mpoxscope.export.onnx import OnnxPredictor

TARGET_RATIO, TARGET_AGREEMENT = 15.0, 0.995


@dataclass
class Variant:
    key: str
    label: str
    preprocess: Callable[[list[Image.Image]], object]
    model: Callable[[object], object]  # preprocessed batch -> logits
    probs: Callable[[list[Image.Image]], np.ndarray] | None  # None: no agreement (random weights)
    times: dict[str, list[float]] = field(default_factory=dict)
    agreement: float | None = None
    session: object = None  # the ONNX Runtime session (a FallbackSession counts its fp32 recomputations)

    def e2e(self, photos: list[bytes]) -> object:
        """JPEG bytes -> logits: decode (the product's decoder), resize, normalise, model."""
        return self.model(self.preprocess([decode_image(b) for b in photos]))


def resnet50_variant(size: int) -> Variant:
    from torchvision.models import resnet50

    net = resnet50(weights=None).eval()  # random weights: the speed of the architecture is what is compared
    transform = eval_transform(size)

    def model(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(batch)

    return Variant("a", f"torchvision ResNet50, eager fp32 (random weights), {size} px",
                   lambda imgs: torch.stack([transform(i) for i in imgs]), model, None)


def torch_variant(p: Predictor, bf16: bool) -> Variant:
    def model(batch: torch.Tensor) -> torch.Tensor:
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return p.logits(batch)
        return p.logits(batch)

    def probs(images: list[Image.Image]) -> np.ndarray:
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return p.predict_images(images)
        return p.predict_images(images)

    return Variant("c" if bf16 else "b", "mpoxscope PyTorch " + ("bf16 autocast" if bf16 else "fp32"),
                   p.preprocess, model, probs)


def onnx_variant(key: str, label: str, p: OnnxPredictor) -> Variant:
    return Variant(key, label, p.preprocess, p.logits, p.predict_images, session=p.session)


def lite_variant(key: str, label: str, p: LiteOnnxPredictor) -> Variant:
    return Variant(key, label, p.preprocess, p.logits, p.predict_images, session=p.session)


#: variant key -> (photos recomputed in fp32, photos run, margin) during the agreement pass
FALLBACK_SHARE: dict[str, tuple[int, int, float]] = {}


CLOCK = time.perf_counter  # --clock cpu: time.process_time, for a machine where this process is starved


def timed(fn: Callable[[], object]) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def warm_up(variants: list[Variant], raws: list[bytes]) -> None:
    for v in variants:  # first calls allocate and pick kernels
        for batch in (raws[:16], raws[:1]):
            v.e2e(batch)


def measure(variants: list[Variant], raws: list[bytes], images: list[Image.Image], rounds: range,
            b1_reps: int, seed: int = 0) -> None:
    """One batch of 16 (and ``b1_reps`` single photos) per variant per round, variants in a shuffled order;
    ``raws[i]`` is the JPEG file of ``images[i]``."""
    rng = random.Random(seed + rounds.start)
    starts = list(range(0, len(images) - 15, 16))
    for r in rounds:
        order = variants[:]
        rng.shuffle(order)
        for v in order:
            i = starts[(r * 7) % len(starts)]
            raw, imgs = raws[i:i + 16], images[i:i + 16]
            pre = v.preprocess(imgs)
            v.times.setdefault("b16_e2e", []).append(timed(lambda v=v, raw=raw: v.e2e(raw)) / 16)
            v.times.setdefault("b16_model", []).append(timed(lambda v=v, pre=pre: v.model(pre)) / 16)
            for k in range(b1_reps):
                one = raw[k % 16:k % 16 + 1]
                pre1 = v.preprocess(imgs[k % 16:k % 16 + 1])
                v.times.setdefault("b1_e2e", []).append(timed(lambda v=v, one=one: v.e2e(one)))
                v.times.setdefault("b1_model", []).append(timed(lambda v=v, pre1=pre1: v.model(pre1)))
        print(f"round {r + 1}/{rounds.stop} done", file=sys.stderr, flush=True)


def preprocessing_costs(raws: list[bytes], images: list[Image.Image], size: int, mean, std,
                        rounds: int) -> dict[str, float]:
    """Median ms per image of decoding (JPEG bytes -> RGB) and of resize+normalise (torch / numpy)."""
    raw = raws[:64]
    sample = images[:64]
    transform = eval_transform(size, tuple(mean), tuple(std))
    fns = {
        "decode (JPEG bytes -> RGB, Pillow)": lambda: [decode_image(b) for b in raw],
        "resize + normalise, torchvision (PyTorch/ONNX predictors)": lambda: torch.stack(
            [transform(i) for i in sample]),
        "resize + normalise, Pillow + numpy float (torch-free)": lambda: preprocess_numpy(sample, size, mean,
                                                                                          std),
        "resize only, Pillow -> uint8 pixels (pixel-input graphs normalise inside)": lambda: resized_pixels(
            sample, size),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn) / len(sample))
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def agreement(variants: list[Variant], images: list[Image.Image], chunk: int = 64,
              after_chunk: Callable[[int], object] | None = None) -> None:
    """Top-1 agreement with (b), accumulated ``chunk`` images at a time (``after_chunk(n_done)`` after each, so
    a run cut short still records the images it got through)."""
    reference = next(v for v in variants if v.key == "b")
    same = {v.key: 0 for v in variants if v.probs is not None}
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        ref = np.concatenate([reference.probs(part[i:i + 16]) for i in range(0, len(part), 16)]).argmax(1)
        for v in variants:
            if v.probs is None:
                continue
            got = np.concatenate([v.probs(part[i:i + 16]) for i in range(0, len(part), 16)]).argmax(1)
            same[v.key] += int((got == ref).sum())
            v.agreement = same[v.key] / (start + len(part))
        AGREEMENT_N[0] = start + len(part)
        if after_chunk is not None:
            after_chunk(start + len(part))
    print("agreement: " + ", ".join(f"{v.key} {100 * v.agreement:.2f} %" for v in variants
                                    if v.agreement is not None), file=sys.stderr, flush=True)


AGREEMENT_N = [0]  # images the agreement figures cover so far


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    try:
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def render(args, run_desc: str, variants: list[Variant], pre: dict[str, float], n_images: int,
           load: tuple[tuple[float, ...], tuple[float, ...]], seconds: float) -> str:
    med = {v.key: {k: statistics.median(t) for k, t in v.times.items()} for v in variants}
    ref = med["a"]
    lines = [
        "# CPU inference throughput: ResNet50 vs mpoxscope runtimes",
        "",
        f"Command: `.venv/bin/python benchmarks/inference.py {' '.join(sys.argv[1:])}` (niceness {os.nice(0)}; "
        f"{seconds / 60:.1f} min).",
        "",
        "Times are " + ("**CPU time of the benchmark process** (time.process_time), not elapsed time: the "
                        "machine's cores were shared with other jobs (see the load average below), so elapsed "
                        "times would measure mostly waiting. With one thread, CPU time is what an idle core "
                        "needs; images/s are per core." if args.clock == "cpu" else "elapsed (wall-clock) time."),
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs ({cpu_flags()}), {args.threads} threads per "
        f"runtime; torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}. Load average "
        f"(1/5/15 min) {', '.join(f'{x:.1f}' for x in load[0])} at the start and "
        f"{', '.join(f'{x:.1f}' for x in load[1])} at the end: "
        + ("**contended** (other jobs were running on these cores; absolute times are inflated, ratios between "
           "interleaved variants are the meaningful numbers)." if max(load[0][0], load[1][0]) > 0.5 * args.threads
           else "quiet.") ,
        "",
        f"Model: {run_desc}.",
        "",
        f"Protocol: {args.rounds} rounds; each round runs every variant in a shuffled order: one batch of 16 and "
        f"{args.b1_reps} single images, end to end (JPEG file bytes -> decode, resize, normalise, model: all of "
        "preprocessing included) and model only (preprocessed batch -> logits). Medians over rounds, per image. "
        f"Preprocessing steps are also measured separately below. Agreement: top-1 class vs (b) PyTorch fp32 on "
        + (f"all {n_images}" if AGREEMENT_N[0] >= n_images else f"the first {AGREEMENT_N[0]} (of {n_images}, "
           "in a fixed shuffled order; the run was cut short)") + " MSLD v2.0 images "
        "(the int8 calibration images, 96 from the fold's training split, are among them).",
        "",
        "| variant | b16 end-to-end ms/img | img/s | × ResNet50 | b16 model ms/img | × | b1 end-to-end ms | "
        "img/s | × | b1 model ms | × | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        m = med[v.key]
        agree = (f"{100 * v.agreement:.2f} %" if v.agreement is not None else "pending" if v.probs else
                 "n/a (random weights)" if v.key == "a" else "n/a (another model than (b))")
        lines.append(
            f"| ({v.key}) {v.label} | {1000 * m['b16_e2e']:.2f} | {1 / m['b16_e2e']:.0f} | "
            f"{ref['b16_e2e'] / m['b16_e2e']:.1f} | {1000 * m['b16_model']:.2f} | "
            f"{ref['b16_model'] / m['b16_model']:.1f} | {1000 * m['b1_e2e']:.2f} | {1 / m['b1_e2e']:.0f} | "
            f"{ref['b1_e2e'] / m['b1_e2e']:.1f} | {1000 * m['b1_model']:.2f} | "
            f"{ref['b1_model'] / m['b1_model']:.1f} | {agree} |")
    ok = [v for v in variants if v.agreement is not None and v.agreement >= TARGET_AGREEMENT]
    best = min(ok, key=lambda v: med[v.key]["b16_e2e"]) if ok else None
    lines += [f"({k}) recomputed {r} of {n} photos ({100 * r / n:.1f} %) in fp32 during the agreement pass "
              f"(int8 top-2 logit gap below {m:.3f})." for k, (r, n, m) in FALLBACK_SHARE.items() if n]
    lines += ["", "Preprocessing, per image (median of rounds over 64 photos):", "",
              "| step | ms/img |", "|---|---:|"]
    lines += [f"| {k} | {ms:.3f} |" for k, ms in pre.items()]
    lines += [""]
    if best is not None:
        ratio = ref["b16_e2e"] / med[best.key]["b16_e2e"]
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        if AGREEMENT_N[0] < n_images:
            verdict += f" — provisional: agreement so far covers {AGREEMENT_N[0]} of {n_images} images"
        lines.append(f"Fastest variant with ≥ {100 * TARGET_AGREEMENT:.1f} % agreement at batch 16, preprocessing "
                     f"included: **({best.key}) {best.label}**, {ratio:.1f}× ResNet50 eager fp32 "
                     f"(target ≥ {TARGET_RATIO:.0f}×: {verdict} it).")
    if "h" in med:
        lines.append(f"The default model as recorded (row h, test-time views): "
                     f"{ref['b16_e2e'] / med['h']['b16_e2e']:.2f}× ResNet50 eager fp32 at batch 16, preprocessing "
                     "included (PyTorch fp32; its views run inside the exported ONNX graph too).")
    for v in variants:
        if v.agreement is not None and v.agreement < TARGET_AGREEMENT:
            lines.append(f"({v.key}) misses the {100 * TARGET_AGREEMENT:.1f} % agreement bar by "
                         f"{100 * (TARGET_AGREEMENT - v.agreement):.2f} points ({100 * v.agreement:.2f} %).")
    return "\n".join(lines) + "\n"


def single_model_dir(run: Path) -> tuple[Path, str | None]:
    """(run directory of one network without test-time views, note). A run recorded with TTA views or as an
    ensemble gets a copy beside it (``RUN/benchmark_single``: model.json without ``tta``, the first member's
    weights linked) so the 15x target is measured on the single network, as the issue defines it."""
    meta = json.loads((run / "model.json").read_text())
    source = run
    if meta.get("kind") == "ensemble":
        source = (run / str(meta["members"][0]["dir"])).resolve()
        meta = json.loads((source / "model.json").read_text())
    views = (meta.get("tta") or {}).get("views") or ["id"]
    if source == run and list(views) == ["id"]:
        return run, None
    single = run / "benchmark_single"
    single.mkdir(exist_ok=True)
    meta.pop("tta", None)
    text = json.dumps(meta, indent=1)
    if not (single / "model.json").is_file() or (single / "model.json").read_text() != text:
        (single / "model.json").write_text(text)
    link = single / "best.safetensors"
    if not link.exists():
        link.symlink_to((source / "best.safetensors").resolve())
    return single, (f"the run predicts with {len(views)} test-time views"
                    + (" and an ensemble" if source != run else "") + "; rows (b)-(g) are its single network "
                    "without views (as the 15x target is defined), row (h) is the run as recorded")


def describe(meta: dict) -> str:
    m = meta.get("model", {})
    views = (meta.get("tta") or {}).get("views") or []
    extra = [f"TTA {len(views)} views"] if len(views) > 1 else []
    extra += ["ensemble"] if meta.get("kind") == "ensemble" else []
    return (f"{m.get('backbone', '?')} + {m.get('head', '?')}, {meta.get('image_size')} px"
            + (f" ({', '.join(map(str, extra))})" if extra else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="trained run directory")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--b1-reps", type=int, default=4, help="single-image calls per variant per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/results/inference.md")
    ap.add_argument("--limit", type=int, help="use only this many images (a quick check, not the result)")
    ap.add_argument("--skip-recorded", action="store_true",
                    help="leave out row (h), the run with its test-time views / ensemble (8x the single model)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time (default); cpu: CPU time of this process, for a machine where other "
                         "jobs take the cores (use with --threads 1: no thread spins waiting for a preempted "
                         "partner, so CPU time is the compute an idle core would need)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    start = time.perf_counter()
    load0 = os.getloadavg()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    files = sorted(p for p in Path(msld_root(), "images").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        sys.exit(f"no MSLD v2.0 images under {msld_root()}/images (set MPOXSCOPE_MSLD)")
    files = files[:args.limit] if args.limit else files
    random.Random(0).shuffle(files)  # batches mix classes
    raws = [p.read_bytes() for p in files]
    images = [load_image(p) for p in files]
    recorded = run
    run, note = single_model_dir(run)
    int8, int8_pixels = run / "model.int8.onnx", run / "model.int8.pixels.onnx"
    plain_pixels = run / "model.int8.pixels.plain.onnx"
    for path, pixels, fallback in ((int8, False, "auto"), (int8_pixels, True, "auto"), (plain_pixels, True, "off")):
        if not path.is_file():  # as 'mpoxscope export RUN --quantize int8 [--pixel-input] --out PATH' writes it
            from mpoxscope.export.quantize import quantize_int8

            print(quantize_int8(run, out_file=path, min_agreement=0.0, pixel_input=pixels,
                                fallback=fallback).summary(), file=sys.stderr)
    fp32_onnx = OnnxPredictor.from_run(run, threads=args.threads)
    torch_p = Predictor.from_run(run, device="cpu")
    size = torch_p.image_size
    norm = torch_p.meta.get("normalization", {})
    mean, std = tuple(norm.get("mean", IMAGENET_MEAN)), tuple(norm.get("std", IMAGENET_STD))
    fp32_pixels = run / "model.pixels.onnx"  # benchmark-only: fp32 with the pixel input, for comparison
    import onnx

    onnx.save(with_pixel_input(onnx.load(str(run / "model.onnx")), mean, std), str(fp32_pixels))
    variants = [
        resnet50_variant(224),
        torch_variant(torch_p, bf16=False),
        torch_variant(torch_p, bf16=True),
        onnx_variant("d", "ONNX Runtime fp32", fp32_onnx),
        onnx_variant("e", "ONNX Runtime int8 (static QDQ, per-channel, bias-corrected, stem float, pads folded) "
                          "+ fp32 fallback for near ties", OnnxPredictor.from_run(run, onnx_file=int8,
                                                                                   threads=args.threads)),
        lite_variant("f", "ONNX Runtime fp32, uint8 pixel input (Pillow resize only)",
                     LiteOnnxPredictor(fp32_pixels, args.threads)),
        lite_variant("g", "ONNX Runtime int8 + fp32 fallback for near ties, uint8 pixel input (export --quantize "
                          "int8 --pixel-input)", LiteOnnxPredictor(int8_pixels, args.threads)),
        lite_variant("i", "ONNX Runtime int8 alone, uint8 pixel input (export --quantize int8 --pixel-input "
                          "--fallback-margin off)", LiteOnnxPredictor(plain_pixels, args.threads)),
    ]
    if note and not args.skip_recorded:
        as_recorded = Predictor.from_run(recorded, device="cpu")
        variants.append(Variant("h", "the run as recorded (" + describe(as_recorded.meta) + "), PyTorch fp32",
                                as_recorded.preprocess, as_recorded.logits, None))
    desc = describe(torch_p.meta) + (f". Note: {note}" if note else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(pre: dict[str, float], status: str) -> str:
        """Results so far (on a starved machine the run may be cut short: each phase is kept)."""
        text = render(args, desc, variants, pre, len(images), (load0, os.getloadavg()),
                      time.perf_counter() - start) + status
        out.write_text(text)
        raw = {v.key: {"label": v.label, "agreement": v.agreement, "seconds_per_image": v.times}
               for v in variants}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
        return text

    # Phases in order of what matters most: one timing round, preprocessing, agreement, further rounds.
    warm_up(variants, raws)
    measure(variants, raws, images, range(0, 1), args.b1_reps)
    pre = preprocessing_costs(raws, images, size, mean, std, 3)
    write(pre, "\n(partial: 1 timing round, agreement pending)\n")
    sessions = {v.key: v.session for v in variants if hasattr(v.session, "recomputed")}
    for s in sessions.values():
        s.rows = s.recomputed = 0
    agreement(variants, images, after_chunk=lambda n: write(pre, f"\n(partial: agreement on {n} of "
                                                                  f"{len(images)} images so far)\n"))
    FALLBACK_SHARE.update({k: (s.recomputed, s.rows, s.margin) for k, s in sessions.items()})
    for r in range(1, args.rounds):
        write(pre, f"\n(partial: {r} of {args.rounds} timing rounds)\n")
        measure(variants, raws, images, range(r, r + 1), args.b1_reps)
    print(write(pre, ""))


if __name__ == "__main__":
    main()
