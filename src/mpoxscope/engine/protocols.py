"""Where a 99.81 % comes from: one model configuration under an honest and two leaky evaluation protocols.

* ``official``: the dataset's patient-level folds (or patient-grouped k-fold): no patient on both sides.
* ``image-level`` (LEAKY): stratified random k-fold of images, ignoring patients, so photos of a test patient
  sit in training (patient leakage only).
* ``augment-then-split`` (LEAKY): every image is first expanded into ``k`` offline-augmented copies (rotation,
  translation, flips, shear, scaling, colour jitter, noise: the augmentation MSLD v2.0 ships), written under
  ``OUT/augmented/``; the copies are then split at random, so siblings of a test copy are in training.

The leaky protocols exist to demonstrate the leak; every report and printed line says so. :func:`run_protocols`
writes ``protocols.md``, ``protocols.json`` and ``protocols.png`` (accuracy and macro-F1 with 95 % CIs, test
sizes) plus the arithmetic of what a reported accuracy implies about the test set.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpoxscope.data.samples import Sample, SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.errors import MpoxscopeError

PROTOCOLS = ("official", "image-level", "augment-then-split")
LEAKY = frozenset({"image-level", "augment-then-split"})
BANNER = "FOR DEMONSTRATION: LEAKY"
#: Most augmented copies per image: 100 copies of MSLD v2.0 are 75,500 JPEG files (several GB); more is a typo.
MAX_COPIES = 100
_DESCRIPTION = {
    "official": "patient-level folds: no patient in two of train/validation/test (honest)",
    "image-level": "stratified random split of images, patients ignored: photos of a test patient are in "
                   "training",
    "augment-then-split": "each image expanded into k augmented copies first, copies split at random: "
                          "augmented siblings of a test image are in training",
}


# ------------------------------------------------------------------------------------------------ splits
def image_level_folds(data: SampleSet, n_folds: int = 5, seed: int = 0, val_share: float = 0.2) -> list[Fold]:
    """LEAKY: stratified k-fold over images, ignoring groups; validation is a stratified random share of the
    rest. Every image is tested exactly once."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    y = np.asarray(data.targets)
    if n_folds < 2 or len(y) < 2 * n_folds:
        raise MpoxscopeError(f"image-level split: {len(y)} images are too few for {n_folds} folds")
    outer = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (trainval, test) in enumerate(outer.split(np.zeros(len(y)), y), start=1):
        try:
            tr, va = train_test_split(trainval, test_size=val_share, stratify=y[trainval], random_state=seed + k)
        except ValueError:  # a class with a single image left: split without stratification
            tr, va = train_test_split(trainval, test_size=val_share, random_state=seed + k)
        folds.append(Fold(f"fold{k}", tuple(sorted(tr.tolist())), tuple(sorted(va.tolist())),
                          tuple(sorted(test.tolist()))))
    return folds


def ungrouped(data: SampleSet) -> SampleSet:
    """The same images with every image its own group: what a split that ignores patients sees."""
    return SampleSet([Sample(s.path, s.label, s.filename) for s in data.samples], list(data.classes), data.root)


# ---------------------------------------------------------------------------------------- augmentation
def augment_image(img, rng: np.random.Generator):
    """One random offline augmentation of a PIL RGB image: rotation (±30°), shear (±12°), scaling (0.85–1.15),
    translation (±10 %), horizontal/vertical flips, brightness/contrast/saturation jitter (±20 %) and Gaussian
    noise (σ ≤ 8/255), as in MSLD v2.0's augmented release."""
    from PIL import Image, ImageEnhance

    w, h = img.size
    angle, shear = math.radians(rng.uniform(-30, 30)), math.radians(rng.uniform(-12, 12))
    scale = rng.uniform(0.85, 1.15)
    tx, ty = rng.uniform(-0.1, 0.1) * w, rng.uniform(-0.1, 0.1) * h
    # Forward map: rotate, shear and scale about the centre, then translate; PIL wants the inverse map.
    a = np.array([[math.cos(angle), -math.sin(angle + shear)], [math.sin(angle), math.cos(angle + shear)]]) * scale
    inv = np.linalg.inv(a)
    centre = np.array([w / 2, h / 2])
    offset = centre - inv @ (centre + np.array([tx, ty]))
    out = img.transform((w, h), Image.Transform.AFFINE, (*inv[0], offset[0], *inv[1], offset[1]),
                        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(0.8, 1.2))
    sigma = rng.uniform(0, 8)
    arr = np.asarray(out, dtype=np.float32) + rng.normal(0, sigma, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def expand_dataset(data: SampleSet, out_dir: Path, copies: int, seed: int = 0, max_side: int = 512,
                   log: Callable[[str], None] = print, workers: int | None = None) -> tuple[SampleSet, np.ndarray]:
    """Write ``copies`` augmented JPEGs of every image to ``out_dir/<class>/<stem>__aug<j>.jpg`` (kept across
    reruns: each copy is seeded by its file name, so threads and reruns give the same pixels) and return them as
    a sample set (each copy its own group) with ``origin`` (M,): the index in ``data`` each copy came from."""
    from concurrent.futures import ThreadPoolExecutor

    if copies < 1:
        raise MpoxscopeError(f"--copies must be at least 1, got {copies}")
    check_unique_stems(data)
    paths = [[out_dir / s.label / copy_name(s.filename, j) for j in range(copies)] for s in data.samples]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL's resampling and JPEG coding release the GIL
        written = sum(pool.map(lambda a: _write_copies(*a, seed, max_side), zip(data.samples, paths)))
    samples = [Sample(p, s.label, p.name) for s, ps in zip(data.samples, paths) for p in ps]
    log(f"augment-then-split: {len(samples)} augmented copies under {out_dir} ({written} written now)")
    return SampleSet(samples, list(data.classes), out_dir), np.repeat(np.arange(len(data)), copies)


_COPY = "__aug"


def copy_name(filename: str, j: int) -> str:
    """File name of augmented copy ``j`` of image ``filename``: ``<stem>__aug<j>.jpg``."""
    return f"{_stem(filename)}{_COPY}{j}.jpg"


def origin_name(name: str) -> str:
    """The stem of the original image an augmented copy (:func:`copy_name`) was made from."""
    return name.rsplit(_COPY, 1)[0]


def _stem(filename: str) -> str:
    return Path(filename).stem


def check_unique_stems(data: SampleSet) -> None:
    """Copies are named and matched to their original by file stem, so two images with one stem (``a.jpg`` and
    ``a.png``, or one name in two classes) would share copies; refuse before anything is written."""
    seen: dict[str, Path] = {}
    for s in data.samples:
        stem = _stem(s.filename)
        if stem in seen:
            raise MpoxscopeError(f"augment-then-split names copies by file stem: {seen[stem]} and {s.path} "
                                 f"both have stem {stem!r}; rename one")
        seen[stem] = s.path


def _write_copies(sample: Sample, paths: list[Path], seed: int, max_side: int) -> int:
    """The augmented copies of one image that are not on disk yet; returns how many were written."""
    from mpoxscope.data.images import load_image
    from mpoxscope.fileio import atomic_path

    todo = [(j, p) for j, p in enumerate(paths) if not p.is_file()]
    if not todo:
        return 0
    img = load_image(sample.path, max_side=max_side)
    for j, p in todo:
        digest = hashlib.sha256(f"{seed}:{sample.filename}:{j}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:  # a copy cut short by a kill is never taken for a finished one
            augment_image(img, rng).save(tmp, format="JPEG", quality=92)
    return len(todo)


# --------------------------------------------------------------------------------------- model runners
@dataclass
class FoldResult:
    """Test predictions of one fold: file names, targets (N,), probabilities (N, K)."""

    name: str
    names: list[str]
    targets: np.ndarray
    probs: np.ndarray
    extra: dict = field(default_factory=dict)


#: ``runner(data, folds, work_dir, label) -> [FoldResult]``: trains on each fold's train part, selects on its
#: validation part and predicts its test part.
Runner = Callable[[SampleSet, list[Fold], Path, str], list[FoldResult]]


def quick_runner(backbone: str = "tf_efficientnet_lite0", image_size: int = 224, batch_size: int = 32,
                 log: Callable[[str], None] = print) -> Runner:
    """The ``--quick`` configuration: frozen ImageNet backbone, global-average-pooled features of the clean
    image, logistic regression with C chosen on each fold's validation macro-F1. Features are computed once
    per image set and cached in the work folder."""

    def run(data: SampleSet, folds: list[Fold], work: Path, label: str) -> list[FoldResult]:
        from threadpoolctl import threadpool_limits

        feats = _features(data, work, backbone, image_size, batch_size, log)
        # Single-threaded BLAS, as probe.fit_logistic: faster on these thin products, and the same fit whatever
        # the machine's thread count.
        with threadpool_limits(limits=1, user_api="blas"):
            return [_quick_fold(data, fold, feats) for fold in folds]

    return run


def _quick_fold(data: SampleSet, fold: Fold, feats: np.ndarray) -> FoldResult:
    """One fold of ``quick_runner``: logistic regression on the (N, C) features, C by validation macro-F1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(data.targets)
    tr, va, te = (np.asarray(fold.indices(s)) for s in ("train", "validation", "test"))
    scaler = StandardScaler().fit(feats[tr])
    best = None
    for c in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
        clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(scaler.transform(feats[tr]), y[tr])
        f1 = f1_score(y[va], clf.predict(scaler.transform(feats[va])), average="macro")
        if best is None or f1 > best[0]:
            best = (f1, c, clf)
    probs = np.zeros((len(te), len(data.classes)))
    probs[:, best[2].classes_] = best[2].predict_proba(scaler.transform(feats[te]))
    return FoldResult(fold.name, [data.samples[i].filename for i in te], y[te], probs,
                      {"C": best[1], "validation_f1_macro": float(best[0])})


def _features(data: SampleSet, work: Path, backbone: str, image_size: int, batch_size: int,
              log: Callable[[str], None]) -> np.ndarray:
    """(N, C) global-average-pooled features of the frozen backbone, cached per image set in ``work`` (the
    official and image-level protocols share the original images' features)."""
    import torch

    from mpoxscope.config import ModelConfig
    from mpoxscope.data.images import load_image
    from mpoxscope.data.transforms import eval_transform
    from mpoxscope.models.factory import create_model

    model = create_model(ModelConfig(backbone=backbone, image_size=image_size, head="linear"),
                         len(data.classes)).eval()
    # The backbone's own normalisation (TF EfficientNet-Lite ports expect mean = std = 0.5, not ImageNet's).
    tf = eval_transform(image_size, model.mean, model.std)
    names = [s.filename for s in data.samples]
    key = (f"{backbone}:{image_size}:{tuple(model.mean)}:{tuple(model.std)}:"
           + hashlib.sha256("\n".join(names).encode()).hexdigest())
    cache = work / f"features_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if str(z["key"]) == key:
            return z["features"]
    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(data), batch_size):
            batch = torch.stack([tf(load_image(x.path)) for x in data.samples[s:s + batch_size]])
            out.append(model.forward_features(batch).float().mean(dim=(2, 3)).numpy())
    feats = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=feats, key=np.array(key))
    log(f"features: {len(data)} images through frozen {backbone} in {time.perf_counter() - t0:.0f} s")
    return feats


def full_runner(model_cfg, train_cfg, log: Callable[[str], None] = print) -> Runner:
    """The given model configuration trained with ``mpoxscope train``'s code on each fold (selection on the
    fold's validation part), then used to predict the test part."""

    def run(data: SampleSet, folds: list[Fold], work: Path, label: str) -> list[FoldResult]:
        from mpoxscope.engine.cv import shared_inputs, train_model
        from mpoxscope.engine.evaluate import predict_split
        from mpoxscope.engine.predict import Predictor

        # As in cv: images decoded once and frozen trunks run once for all folds (augment-then-split has k times
        # the images; per-fold banks would augment and encode each copy once per fold).
        bank, images, banks = shared_inputs(data, folds, model_cfg, train_cfg, work / label, False)
        results = []
        for fold in folds:
            run_dir = work / label / fold.name
            info = {"dataset": f"{label} protocol", "root": str(data.root), "split_source": label,
                    "classes": data.classes, "n_train": len(fold.train), "n_validation": len(fold.validation),
                    "n_test": len(fold.test)}
            # cv's own per-fold training (an ensemble when the configuration has members), so the official
            # protocol here scores what `mpoxscope cv` scores.
            train_model(data, fold, model_cfg, train_cfg, run_dir, info, bank=bank, images=images, progress=False,
                        log=log, member_banks=banks)
            predictor = Predictor.from_run(run_dir, device=train_cfg.device)
            probs, targets, names, _ = predict_split(predictor, data, fold.test)
            results.append(FoldResult(fold.name, names, targets, probs))
        return results

    return run


def cv_runner(cv_dir: str | Path) -> Runner:
    """The official protocol read from a finished ``mpoxscope cv`` of the same configuration: each fold's saved
    test predictions (``CV/<fold>/evaluation/predictions.csv``) instead of training it again, so the table's
    official row is exactly cv's."""
    def run(data: SampleSet, folds: list[Fold], work: Path, label: str) -> list[FoldResult]:
        return official_predictions(cv_dir, data, folds)

    return run


def official_predictions(cv_dir: str | Path, data: SampleSet, folds: list[Fold]) -> list[FoldResult]:
    """Each fold's saved test predictions in the cv output ``cv_dir``, refused in one line when a fold's file is
    missing or holds other images than the fold's test part (also called before any protocol runs)."""
    from mpoxscope.engine import rundir
    from mpoxscope.engine.screening import read_predictions_csv

    results = []
    for fold in folds:
        path = Path(cv_dir) / fold.name / rundir.EVALUATION / rundir.PREDICTIONS
        pred, _ = read_predictions_csv(path, data.classes)
        expected = sorted(data.samples[i].filename for i in fold.test)
        if sorted(pred.names) != expected:
            raise MpoxscopeError(f"{path}: its {len(pred.names)} test images are not {fold.name}'s "
                                 f"{len(expected)}; was that cv run on these folds?")
        results.append(FoldResult(fold.name, pred.names, pred.targets, pred.probs, {"from": str(path)}))
    return results


#: Training settings that change where and how fast a model trains, not which model: ignored when runs are compared.
_RUNTIME_ONLY = frozenset({"device", "precision", "num_workers"})


def _same_config(previous: dict, config_name: str, settings: dict | None, former_names: tuple[str, ...]) -> bool:
    if previous.get("settings") is not None and settings is not None:
        from mpoxscope.engine.train import stored_settings_match  # a setting added later matches its default

        return stored_settings_match(previous["settings"], settings)
    return previous.get("config") in (config_name, *former_names)


def protocol_settings(model_cfg, train_cfg) -> dict:
    """What makes two protocol runs the same model: every setting but the device, precision and loader threads."""
    from mpoxscope.config import to_dict

    train = {k: v for k, v in to_dict(train_cfg).items() if k not in _RUNTIME_ONLY}
    return {"model": to_dict(model_cfg), "train": train}


def _former_words(model_cfg, train_cfg, preset: str) -> str:
    """How versions up to 0.x (session 15) named a configuration in a protocol's summary, to reuse their runs."""
    if train_cfg.ensemble:
        return (f"ensemble of {' + '.join(train_cfg.ensemble)} ({model_cfg.head.upper()} heads, "
                f"{model_cfg.image_size} px, preset {preset})")
    return (f"{model_cfg.backbone} + {model_cfg.head} head, {model_cfg.image_size} px, trainable stages "
            f"{train_cfg.trainable_stages}, {train_cfg.epochs} epochs (preset {preset})")


def check_cv_config(cv_dir: str | Path, model_cfg, train_cfg) -> None:
    """Refuse a cv output whose model or training configuration differs from this run's (device, precision
    and loader threads aside): its official row would describe another model."""
    from mpoxscope.fileio import read_json

    path = Path(cv_dir) / "cv_summary.json"
    try:
        summary = read_json(path)
    except (OSError, ValueError) as e:
        raise MpoxscopeError(f"--official-from: {path}: cannot read a finished cv summary ({e})") from None
    if not (isinstance(summary, dict) and isinstance(summary.get("model", {}), dict)
            and isinstance(summary.get("train", {}), dict)):
        raise MpoxscopeError(f"--official-from: {path}: not a cv summary (a JSON object with 'model' and 'train' "
                             "objects)")
    settings = protocol_settings(model_cfg, train_cfg)
    want = {**settings["model"], **settings["train"]}
    have = {**summary.get("model", {}),
            **{k: v for k, v in summary.get("train", {}).items() if k not in _RUNTIME_ONLY}}
    want["ensemble"] = list(want.get("ensemble") or [])
    differ = sorted(k for k in want if k in have and have[k] != want[k])
    if differ:
        raise MpoxscopeError(f"--official-from: {path} was run with other settings ({', '.join(differ)}); "
                             "pass the same preset and options")


# ------------------------------------------------------------------------------------------ the runs
def protocol_folds(protocol: str, data: SampleSet, official: list[Fold], out: Path, copies: int, n_folds: int,
                   seed: int, log: Callable[[str], None]) -> tuple[SampleSet, list[Fold]]:
    """The image set and folds a protocol evaluates on."""
    if protocol == "official":
        return data, official
    if protocol == "image-level":
        return ungrouped(data), image_level_folds(data, n_folds, seed)
    if protocol == "augment-then-split":
        expanded, _ = expand_dataset(data, out / "augmented", copies, seed, log=log)
        return expanded, image_level_folds(expanded, n_folds, seed)
    raise MpoxscopeError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def summarize_protocol(protocol: str, results: list[FoldResult], classes: list[str],
                       groups: dict[str, str] | None) -> dict[str, Any]:
    """Per-fold accuracy/macro-F1 and the pooled test predictions with 95 % bootstrap intervals (resampling
    patients for the official protocol, images for the leaky ones, which ignore patients by design)."""
    from mpoxscope.engine.calibration import expected_calibration_error
    from mpoxscope.engine.uncertainty import classification_cis

    per_fold = []
    for r in results:
        pred = r.probs.argmax(1)
        ci = classification_cis(r.targets, pred, classes, n=1000)
        per_fold.append({"fold": r.name, "n_test": len(r.targets), "accuracy": ci["accuracy"]["value"],
                         "f1_macro": ci["f1_macro"]["value"], **r.extra})
    y = np.concatenate([r.targets for r in results])
    probs = np.concatenate([r.probs for r in results])
    names = [n for r in results for n in r.names]
    g = [groups.get(n, n) for n in names] if groups is not None else None
    pooled = classification_cis(y, probs.argmax(1), classes, g)
    acc = np.array([f["accuracy"] for f in per_fold])
    f1 = np.array([f["f1_macro"] for f in per_fold])
    return {"protocol": protocol, "leaky": protocol in LEAKY, "description": _DESCRIPTION[protocol],
            "n_folds": len(results), "n_test_per_fold": [f["n_test"] for f in per_fold],
            "n_test_total": int(len(y)), "n_distinct_test_images": len(set(names)),
            "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "f1_macro_mean": float(f1.mean()), "f1_macro_std": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
            "pooled": {"accuracy": pooled["accuracy"], "f1_macro": pooled["f1_macro"], "method": pooled["method"],
                       "ece": expected_calibration_error(probs, y)},
            "per_fold": per_fold}


def run_protocols(data: SampleSet, official: list[Fold], official_source: str, out: str | Path, runner: Runner,
                  config_name: str, protocols: tuple[str, ...] = PROTOCOLS, copies: int = 5, n_folds: int = 5,
                  seed: int = 0, command: str = "", log: Callable[[str], None] = print,
                  runners: dict[str, Runner] | None = None, settings: dict | None = None,
                  former_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate ``runner`` under each protocol (``runners[protocol]`` instead where given, e.g. the official
    protocol read from a finished cv); write protocols.json/.md/.png to ``out``; return the results.

    A protocol already evaluated in ``out`` is reused when it was run with the same ``settings`` (the model and
    training configuration as plain values); one written before settings were stored, when its ``config`` is
    ``config_name`` or one of ``former_names`` (the words an older version used for this configuration)."""
    from mpoxscope.fileio import read_json, write_bytes, write_json, write_text

    runners = runners or {}
    out = Path(out)
    t_all = time.perf_counter()
    results: dict[str, Any] = {}
    groups = {s.filename: s.group for s in data.samples}
    # the data a summary was measured on: another folder, split or fold count is never reused (older summaries
    # without this block are compared on the configuration alone, as before)
    identity = {"root": str(data.root), "images": len(data), "official": str(official_source), "n_folds": n_folds,
                "seed": seed}
    for protocol in protocols:
        done = out / "work" / f"{protocol}.summary.json"
        previous = read_json(done) if done.is_file() else {}
        if _same_config(previous, config_name, settings, former_names) and previous.get("copies", copies) == copies \
                and previous.get("data", identity) == identity:
            log(f"[{protocol}] already evaluated ({done}), not run again")
            results[protocol] = summary = previous
        else:
            results[protocol] = summary = _run_protocol(protocol, data, official, official_source, out,
                                                        runners.get(protocol, runner), copies, n_folds, seed, groups,
                                                        log)
            write_json(done, {**summary, "config": config_name, "settings": settings, "data": identity})
        tag = f"*** {BANNER} *** " if protocol in LEAKY else ""
        log(f"{tag}[{protocol}: {summary['split']}] accuracy {100 * summary['accuracy_mean']:.2f} ± "
            f"{100 * summary['accuracy_std']:.2f} %, macro-F1 {100 * summary['f1_macro_mean']:.2f} ± "
            f"{100 * summary['f1_macro_std']:.2f} % (mean ± std over folds); pooled accuracy "
            f"{_ci(summary['pooled']['accuracy'])} %, test images per fold {_sizes(summary['n_test_per_fold'])}")
        # The table so far after every protocol: a run stopped during the next one still leaves a report.
        report = {"dataset_images": len(data), "config": config_name, "command": command, "protocols": results,
                  "arithmetic": accuracy_arithmetic(0.9981, len(data)),
                  "wall_time_s": round(time.perf_counter() - t_all, 1)}
        write_json(out / "protocols.json", report)
        write_bytes(out / "protocols.png", protocols_png(results, config_name))
        write_text(out / "protocols.md", protocols_markdown(report))
    return report


def _run_protocol(protocol: str, data: SampleSet, official: list[Fold], official_source: str, out: Path,
                  runner: Runner, copies: int, n_folds: int, seed: int, groups: dict[str, str],
                  log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if protocol in LEAKY:
        log(f"*** {BANNER} *** protocol {protocol}: {_DESCRIPTION[protocol]}")
    from mpoxscope.fileio import write_text

    pdata, folds = protocol_folds(protocol, data, official, out, copies, n_folds, seed, log)
    # A runner that trains resumes from its folder: the time measured here is then this command's part only.
    work = out / "work" / protocol
    resumed = work.is_dir() and any(work.iterdir())
    fold_results = runner(pdata, folds, out / "work", protocol)
    write_text(out / "work" / f"{protocol}.predictions.csv", predictions_csv(fold_results, data.classes))
    summary = summarize_protocol(protocol, fold_results, data.classes, groups if protocol == "official" else None)
    summary["split"] = official_source if protocol == "official" else \
        f"stratified random {n_folds}-fold over {len(pdata)} images (seed {seed})"
    if protocol == "augment-then-split":
        summary["copies"] = copies
        summary["siblings"] = sibling_breakdown(pdata, folds, fold_results)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    summary["resumed"] = resumed
    return summary


def sibling_breakdown(data: SampleSet, folds: list[Fold], results: list[FoldResult]) -> dict[str, Any]:
    """augment-then-split: test accuracy of the copies with an augmented sibling in their fold's training part
    and of those without one (siblings only in validation/test), with the share of each — how much of the
    protocol's score is the leak."""
    pred_ok: dict[tuple[str, str], bool] = {}
    for r in results:
        pred_ok.update({(r.name, n): bool(p == t) for n, t, p in zip(r.names, r.targets, r.probs.argmax(1))})
    groups: dict[str, list[bool]] = {"in_training": [], "not_in_training": []}
    for fold in folds:
        trained = {origin_name(data.samples[i].filename) for i in fold.train}
        for i in fold.test:
            name = data.samples[i].filename
            if (fold.name, name) in pred_ok:
                key = "in_training" if origin_name(name) in trained else "not_in_training"
                groups[key].append(pred_ok[(fold.name, name)])
    total = sum(len(v) for v in groups.values())
    return {k: {"n": len(v), "share": len(v) / max(1, total), "accuracy": float(np.mean(v)) if v else None}
            for k, v in groups.items()}


def predictions_csv(results: list[FoldResult], classes: list[str]) -> str:
    """Every fold's test predictions: fold, filename, true and predicted class, probabilities (6 decimals)."""
    import csv

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["fold", "filename", "true", "predicted", *classes])
    for r in results:
        for n, t, p in zip(r.names, r.targets, r.probs):
            w.writerow([r.name, n, classes[int(t)], classes[int(p.argmax())], *(f"{v:.6f}" for v in p)])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ arithmetic
def accuracy_arithmetic(reported: float, n_images: int, test_share: float = 0.2, decimals: int = 2,
                        n_folds: int = 5) -> dict[str, Any]:
    """What a reported accuracy (rounded to ``decimals`` in percent) says about the test set.

    Smallest test set that reaches it with 1 and 2 errors; the accuracies a test part of ``test_share`` of
    ``n_images`` can take near 100 %; and the fold means of ``n_folds`` such parts with 0..3 errors in total.
    """
    half = 0.5 * 10 ** -(decimals + 2)  # half a unit of the last reported digit, as a fraction
    lowest = reported - half
    min_n = {e: math.ceil(e / (1 - lowest)) for e in (1, 2)}
    part = round(n_images * test_share)
    part_acc = [(part - e) / part for e in range(3)]
    fold_means = {e: 1 - e / (part * n_folds) for e in range(4)}
    return {"reported": reported, "n_images": n_images, "test_part": part, "min_test_size": min_n,
            "part_accuracies": part_acc, "fold_means": fold_means, "lowest_rounding_up": lowest}


def arithmetic_markdown(a: dict) -> list[str]:
    r = 100 * a["reported"]
    accs = ", ".join(f"{100 * v:.2f} %" for v in a["part_accuracies"])
    means = ", ".join(f"{e} error{'s' if e != 1 else ''}: {100 * v:.2f} %" for e, v in a["fold_means"].items())
    return [
        f"A reported {r:.2f} % is at least {100 * a['lowest_rounding_up']:.3f} % before rounding. One error in a "
        f"test set needs at least **{a['min_test_size'][1]}** test images to stay at or above it, two errors "
        f"at least **{a['min_test_size'][2]}** — more than the {a['n_images']} original images of the whole "
        "dataset. A 20 % test part of it holds about "
        f"{a['test_part']} images, whose accuracy can only be {accs}, …; so {r:.2f} % cannot be one such test "
        f"set's accuracy. A mean over five such folds with 0–3 errors in total gives {means}: {r:.2f} % needs "
        "essentially error-free folds. A test set of augmented copies is large enough (k copies of "
        f"{a['test_part']} images are {a['test_part']}·k test images), and its copies have siblings in training.",
    ]


# -------------------------------------------------------------------------------------------- rendering
def _ci(iv: dict) -> str:
    from mpoxscope.engine.uncertainty import fmt_ci

    return fmt_ci(iv, digits=2)


def _sizes(sizes: list[int]) -> str:
    return f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}–{max(sizes)}"


def protocols_markdown(report: dict) -> str:
    res = report["protocols"]
    leaky = [p for p in res if res[p]["leaky"]]
    lines = ["# Evaluation protocols side by side", ""]
    if leaky:
        lines += [f"> **{BANNER}.** The rows marked LEAKY ({', '.join(leaky)}) let copies or patients of test "
                  "images into training. They are here to show how much such leakage inflates the score; never "
                  "report them as a model's performance.", ""]
    lines += [f"**Dataset:** {report['dataset_images']} original images  ",
              f"**Model configuration (the same under every protocol):** {report['config']}  ",
              f"**Command:** `{report['command']}`  " if report.get("command") else "",
              f"**Wall time:** {report['wall_time_s']:.0f} s for this command; each protocol as it ran: "
              + ", ".join(f"{p} {r['wall_time_s']:.0f} s" + (" (resumed: this command's part only)"
                                                             if r.get("resumed") else "")
                          for p, r in report["protocols"].items() if r.get("wall_time_s") is not None), "",
              "| protocol | leak | split | test images per fold | test predictions (distinct images) | "
              "accuracy, mean ± std over folds (%) | pooled accuracy [95% CI] (%) | macro-F1, mean ± std (%) | "
              "pooled macro-F1 [95% CI] (%) |", "|---|---|---|---|---|---|---|---|---|"]
    for p, r in res.items():
        leak = f"**LEAKY — {BANNER}**" if r["leaky"] else "none (patient-level)"
        lines.append(f"| {p} | {leak} | {r['split']} | {_sizes(r['n_test_per_fold'])} | {r['n_test_total']} "
                     f"({r['n_distinct_test_images']}) | {100 * r['accuracy_mean']:.2f} ± "
                     f"{100 * r['accuracy_std']:.2f} | {_ci(r['pooled']['accuracy'])} | "
                     f"{100 * r['f1_macro_mean']:.2f} ± "
                     f"{100 * r['f1_macro_std']:.2f} | {_ci(r['pooled']['f1_macro'])} |")
    lines += ["", "Confidence intervals: " + "; ".join(f"{p}: {r['pooled']['method']}" for p, r in res.items()) + ".",
              "", "![protocols side by side](protocols.png)", "", "## What each protocol does", ""]
    lines += [f"- **{p}**{' (LEAKY)' if r['leaky'] else ''}: {r['description']}." for p, r in res.items()]
    sib = res.get("augment-then-split", {}).get("siblings")
    if sib:
        lines += ["", "## Where augment-then-split's score comes from", "",
                  "| test copies | share | test accuracy (%) |", "|---|---|---|"]
        for key, label in (("in_training", "an augmented sibling in the fold's training part (the leak)"),
                           ("not_in_training", "no sibling in training (siblings only in validation or test)")):
            g = sib[key]
            acc = "–" if g["accuracy"] is None else f"{100 * g['accuracy']:.2f}"
            lines.append(f"| {label} | {g['n']} ({100 * g['share']:.1f} %) | {acc} |")
    lines += ["", "## The arithmetic of 99.81 %", ""] + arithmetic_markdown(report["arithmetic"])
    lines += ["", "## Per fold (test accuracy / macro-F1, %)", "", "| protocol | " +
              " | ".join(f["fold"] for f in next(iter(res.values()))["per_fold"]) + " |",
              "|---|" + "---|" * len(next(iter(res.values()))["per_fold"])]
    for p, r in res.items():
        lines.append(f"| {p}{' (LEAKY)' if r['leaky'] else ''} | " + " | ".join(
            f"{100 * f['accuracy']:.1f} / {100 * f['f1_macro']:.1f}" for f in r["per_fold"]) + " |")
    return "\n".join(line for line in lines if line is not None) + "\n"


def protocols_png(results: dict[str, dict], config: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.9 * len(names) + 2.5, 4.2))
    for k, (key, label) in enumerate((("accuracy", "accuracy"), ("f1_macro", "macro-F1"))):
        vals = np.array([results[p]["pooled"][key]["value"] for p in names])
        err = np.array([[results[p]["pooled"][key]["value"] - results[p]["pooled"][key]["low"],
                         results[p]["pooled"][key]["high"] - results[p]["pooled"][key]["value"]] for p in names]).T
        ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=3, label=f"{label} (pooled, 95% CI)",
               color=f"C{k}")
    for i, p in enumerate(names):
        r = results[p]
        text = f"test {r['n_test_total']}" + ("\nLEAKY:\nDEMONSTRATION" if r["leaky"] else "\nhonest")
        ax.text(i, 0.04, text, ha="center", va="bottom", fontsize=7, color="darkred" if r["leaky"] else "black",
                fontweight="bold" if r["leaky"] else "normal")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test score")
    ax.set_title(f"same model, three protocols ({config[:70]})", fontsize=8)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- CLI
def register(sub) -> None:
    from mpoxscope.engine.cli import add_data_options, add_model_options

    p = sub.add_parser("protocols", help="one model under the official and two LEAKY protocols, side by side",
                       description=(
                           "Run the same model configuration under 'official' (patient-level folds), 'image-level' "
                           "(random split of images ignoring patients; LEAKY) and 'augment-then-split' (k augmented "
                           "copies per image written under OUT/augmented, then split at random; LEAKY), and write "
                           "protocols.md/.json/.png. The leaky protocols are for demonstration only."))
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", required=True, help="output folder (augmented copies, features, runs, reports)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help=f"comma-separated subset of {', '.join(PROTOCOLS)} (default all)")
    p.add_argument("--copies", type=int, default=5, help="augmented copies per image for augment-then-split (1-100)")
    p.add_argument("--official-from", metavar="CV_DIR",
                   help="take the official protocol's test predictions from a finished 'mpoxscope cv' of the same "
                        "configuration instead of training it again")
    p.add_argument("--quick", action="store_true",
                   help="frozen backbone features + logistic regression (C on validation) instead of training the "
                        "model configuration: minutes on a CPU")
    add_data_options(p)
    add_model_options(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run_protocols_cli)


def run_protocols_cli(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from mpoxscope.config import DataConfig
    from mpoxscope.engine.cli import (
        check_backbone_name,
        check_device,
        check_image_size,
        check_train_options,
        configs_from_args,
    )
    from mpoxscope.engine.ensemble import describe_training
    from mpoxscope.engine.runner import prepare
    from mpoxscope.fileio import check_output_dir, mark_output_dir

    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise MpoxscopeError(f"--protocols: unknown {', '.join(unknown) or '(empty)'}; choose from "
                             f"{', '.join(PROTOCOLS)}")
    if not 1 <= args.copies <= MAX_COPIES:
        raise MpoxscopeError(f"--copies: must be from 1 to {MAX_COPIES}, got {args.copies}")
    _refuse_inside_repository(Path(args.out))
    model_cfg, train_cfg = configs_from_args(args)
    if args.quick:  # the quick runner reads only the backbone and its input size
        check_backbone_name(model_cfg.backbone)
        check_image_size(model_cfg.image_size)
        check_device(train_cfg.device)
    else:
        check_train_options(model_cfg, train_cfg)
    official_from = getattr(args, "official_from", None)
    if official_from and args.quick:
        raise MpoxscopeError("--official-from reads a cv of the model configuration; it cannot stand for --quick")
    if official_from:
        check_cv_config(official_from, model_cfg, train_cfg)
    check_output_dir(args.out, "protocols")
    prepared = prepare(DataConfig(root=args.data, split_file=args.split_file, folds=args.folds,
                                  groups_csv=args.groups_csv), train_cfg.seed)
    # fail now, not after the protocols that run before it
    if "augment-then-split" in protocols:
        check_unique_stems(prepared.data)
    if any(p != "official" for p in protocols) and (args.folds < 2 or len(prepared.data) < 2 * args.folds):
        raise MpoxscopeError(f"--folds: {len(prepared.data)} images are too few for {args.folds} image-level folds "
                             "(at least 2 folds of 2 images each)")
    if official_from and "official" in protocols:
        official_predictions(official_from, prepared.data, prepared.folds)
    mark_output_dir(args.out, "protocols")
    log = (lambda *_: None) if args.quiet else print
    if args.quick:
        runner = quick_runner(model_cfg.backbone, model_cfg.image_size, log=log)
        config = (f"--quick: frozen {model_cfg.backbone} ({model_cfg.image_size} px) global-average-pooled features "
                  "+ logistic regression, C chosen on each fold's validation macro-F1 (not the default AGFN "
                  "training)")
        settings, former = None, ()
    else:
        runner = full_runner(model_cfg, train_cfg, log=log)
        config = f"{describe_training(model_cfg, train_cfg)} (preset {args.preset})"
        settings, former = protocol_settings(model_cfg, train_cfg), (_former_words(model_cfg, train_cfg, args.preset),)
    runners = {"official": cv_runner(official_from)} if official_from else {}
    command = "mpoxscope protocols " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    report = run_protocols(prepared.data, prepared.folds, prepared.split_source, args.out, runner, config,
                           protocols, args.copies, args.folds, train_cfg.seed, command, log=print, runners=runners,
                           settings=settings, former_names=former)
    for p, r in report["protocols"].items():
        tag = f"*** {BANNER} *** " if r["leaky"] else ""
        print(f"{tag}[{p}] pooled accuracy {_ci(r['pooled']['accuracy'])} %, macro-F1 "
              f"{_ci(r['pooled']['f1_macro'])} % over {r['n_test_total']} test predictions")
    print(f"wrote {args.out}/protocols.md, protocols.json, protocols.png")
    return 0


def _refuse_inside_repository(out: Path) -> None:
    """Augmented copies of licensed images must not land in a source repository (they would be committed)."""
    here = out.resolve()
    for parent in (here, *here.parents):
        if (parent / ".git").exists():
            raise MpoxscopeError(f"{out}: inside the git repository {parent}; write generated images outside it "
                                 "(e.g. --out /tmp/protocols)")
