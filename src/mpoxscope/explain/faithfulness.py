"""How much to trust each explanation method on a given model and image set.

* ROAD (Rong et al., 2022, through ``pytorch_grad_cam.metrics.road``): remove the most (MoRF) or least (LeRF)
  relevant pixels by noisy linear imputation and measure the change of the explained class's probability,
  averaged over several removal percentiles. A faithful map makes MoRF drop the probability a lot and LeRF
  hardly at all; ``combined = (LeRF - MoRF) / 2``, higher is better.
* Model-randomisation sanity check (Adebayo et al., 2018): re-initialise the head (and optionally the top
  backbone stage) and compare maps by Spearman rank correlation. A method that explains the model must change,
  so a low correlation passes; a map that survives randomisation (e.g. EigenCAM, which ignores the classifier)
  explains the image, not the decision.
* A random-weights CAM (pytorch-grad-cam's RandomCAM) is scored as a reference row: methods should beat it.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
from scipy.stats import spearmanr
from torch import nn

from mpoxscope.errors import MpoxscopeError
from mpoxscope.explain.methods import (
    BASELINES,
    LogitsOnly,
    explain,
    frozen,
    get_method,
    model_device,
    predicted_classes,
)
from mpoxscope.fileio import write_json, write_text

RANDOMIZE = ("head", "head+stage")


@dataclass(frozen=True)
class FaithfulnessConfig:
    """``percentiles``: ROAD removal levels (each costs one sparse solve per image and method); ``randomize``:
    what the sanity check re-initialises; ``rho_threshold``: mean Spearman below which it passes."""

    methods: tuple[str, ...] = ("gradcam",)
    percentiles: tuple[int, ...] = (20, 40, 60, 80)
    randomize: str = "head"
    rho_threshold: float = 0.5
    baseline: bool = True
    batch_size: int = 8
    target_layer: str | None = None
    temperature: float = 1.0
    seed: int = 0


@dataclass
class MethodScore:
    """Means over the images. ROAD values are changes of the target probability (-1..1)."""

    method: str
    n_images: int
    seconds_per_image: float
    road_morf: float
    road_lerf: float
    road_combined: float
    sanity_rho: float | None = None
    sanity_pass: bool | None = None
    note: str = ""


@dataclass
class FaithfulnessReport:
    config: FaithfulnessConfig
    scores: list[MethodScore]
    n_images: int
    randomized_tensors: int
    threads: int = field(default_factory=torch.get_num_threads)
    device: str = "cpu"

    def ranked(self) -> list[MethodScore]:
        """Most faithful first (ROAD combined, descending)."""
        return sorted(self.scores, key=lambda s: -s.road_combined if math.isfinite(s.road_combined) else 1e9)

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "n_images": self.n_images,
                "randomized_tensors": self.randomized_tensors, "threads": self.threads, "device": self.device,
                "scores": [asdict(s) for s in self.ranked()]}

    def to_markdown(self) -> str:
        cfg = self.config
        lines = [
            f"Faithfulness on {self.n_images} images (ROAD percentiles {list(cfg.percentiles)}; "
            f"sanity check: {cfg.randomize} re-initialised, {self.randomized_tensors} tensors; pass if mean "
            f"Spearman rho < {cfg.rho_threshold}; timing on {self.device}, {self.threads} thread(s)).",
            "",
            "| method | ROAD combined (higher better) | MoRF (lower better) | LeRF (higher better) "
            "| sanity rho (lower better) | sanity | s / image |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        for s in self.ranked():
            rho = "-" if s.sanity_rho is None else f"{s.sanity_rho:.3f}"
            verdict = "-" if s.sanity_pass is None else ("pass" if s.sanity_pass else "FAIL")
            name = f"{s.method} ({s.note})" if s.note else s.method
            lines.append(f"| {name} | {s.road_combined:.4f} | {s.road_morf:.4f} | {s.road_lerf:.4f} "
                         f"| {rho} | {verdict} | {s.seconds_per_image:.3f} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(out_dir)
        return (write_text(out / "faithfulness.md", self.to_markdown()),
                write_json(out / "faithfulness.json", self.to_dict()))


class ProbabilityTarget:
    """Calibrated probability of class ``k``: softmax(logits / temperature)[k], for (K,) or (B, K) outputs."""

    def __init__(self, k: int, temperature: float = 1.0) -> None:
        self.k, self.temperature = k, temperature

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output / self.temperature, dim=-1)[..., self.k]


def _reinitialise(module: nn.Module) -> int:
    """Re-draw every parameter of ``module`` from its layer's own initialiser (a bare parameter such as a
    positional embedding or query: N(0, 0.02)). Returns the number of parameter tensors re-drawn."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if callable(reset):
            reset()
        else:
            for p in m.parameters(recurse=False):
                nn.init.trunc_normal_(p, std=0.02)
    return sum(1 for _ in module.parameters())


def randomized_copy(model: nn.Module, scope: str = "head", seed: int = 0) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` with its head (``scope="head"``) or head and last backbone stage
    (``"head+stage"``) re-initialised; ``model`` itself is untouched. Returns (copy, tensors re-drawn)."""
    if scope not in RANDOMIZE:
        raise MpoxscopeError(f"--randomize: choose one of {', '.join(RANDOMIZE)}, not {scope!r}")
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        count = _reinitialise(clone.head)
        if scope == "head+stage":
            count += _reinitialise(clone.stages[-1])
    return clone.eval(), count


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps; 0.0 when either is constant (nothing in common to rank)."""
    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def road_scores(model: nn.Module, batch: torch.Tensor, maps: np.ndarray, targets: Sequence[int],
                percentiles: Sequence[int], temperature: float = 1.0, batch_size: int = 8,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(MoRF, LeRF) per image (N,): mean change of the target probability after imputing away the most / least
    relevant ``percentiles`` of pixels of ``maps`` (N, S, S)."""
    morf_metric = ROADMostRelevantFirstAverage(list(percentiles))
    lerf_metric = ROADLeastRelevantFirstAverage(list(percentiles))
    wrapper = LogitsOnly(model)
    dev = model_device(model)
    morf, lerf = [], []
    with frozen(model), torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # pytorch-grad-cam's masking passes torch tensors through NumPy ufuncs: NumPy 2 warns, harmlessly
        warnings.filterwarnings("ignore", message="__array_wrap__", category=DeprecationWarning)
        torch.manual_seed(seed)  # the imputer adds noise
        for i in range(0, len(batch), batch_size):
            x = batch[i:i + batch_size].to(dev)
            cams = maps[i:i + batch_size]
            tg = [ProbabilityTarget(k, temperature) for k in targets[i:i + batch_size]]
            morf.append(np.asarray(morf_metric(x, cams, tg, wrapper), dtype=np.float64).reshape(-1))
            lerf.append(np.asarray(lerf_metric(x, cams, tg, wrapper), dtype=np.float64).reshape(-1))
    return np.concatenate(morf), np.concatenate(lerf)


def _timed_maps(model: nn.Module, batch: torch.Tensor, method: str, targets: list[int],
                cfg: FaithfulnessConfig) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    if method in BASELINES:  # RandomCAM draws from NumPy's global generator: seed it, then put it back
        state = np.random.get_state()
        np.random.seed(cfg.seed)
        try:
            maps = explain(model, batch, method, targets, target_layer=cfg.target_layer,
                           batch_size=cfg.batch_size)
        finally:
            np.random.set_state(state)
    else:
        maps = explain(model, batch, method, targets, target_layer=cfg.target_layer,
                       batch_size=cfg.batch_size)
    return maps, (time.perf_counter() - t0) / max(1, len(batch))


def evaluate_faithfulness(model: nn.Module, batch: torch.Tensor, cfg: FaithfulnessConfig,
                          target_classes: list[int] | None = None, progress=None,
                          precomputed: dict[str, tuple[np.ndarray, float]] | None = None) -> FaithfulnessReport:
    """Score ``cfg.methods`` (plus the random baseline) on a normalised batch (N, 3, S, S).

    Each CAM method explains ``target_classes`` (default: the predicted classes). ``precomputed[method]``:
    (maps (N, S, S), seconds per image) already made for these images and targets (the CLI's gallery pass), so
    slow methods are not run twice. ``progress(text)``, when given, is called once per method.
    """
    if len(batch) == 0:
        raise MpoxscopeError("faithfulness: no images to score")
    targets = list(target_classes) if target_classes is not None else predicted_classes(model, batch)
    methods = [get_method(m).name for m in cfg.methods]
    methods = list(dict.fromkeys(methods)) + (["random"] if cfg.baseline else [])
    randomized, count = randomized_copy(model, cfg.randomize, cfg.seed)
    scores = []
    for name in methods:
        if progress is not None:
            progress(name)
        if precomputed and name in precomputed:
            maps, seconds = precomputed[name]
        else:
            maps, seconds = _timed_maps(model, batch, name, targets, cfg)
        morf, lerf = road_scores(model, batch, maps, targets, cfg.percentiles, cfg.temperature,
                                 cfg.batch_size, cfg.seed)
        score = MethodScore(name, len(batch), seconds, float(morf.mean()), float(lerf.mean()),
                            float((lerf - morf).mean() / 2))
        if name in BASELINES:
            score.note = "reference"
        else:
            rand_maps, _ = _timed_maps(randomized, batch, name, targets, cfg)
            score.sanity_rho = float(np.mean([spearman(a, b) for a, b in zip(maps, rand_maps, strict=True)]))
            score.sanity_pass = bool(score.sanity_rho < cfg.rho_threshold)
        scores.append(score)
    return FaithfulnessReport(cfg, scores, len(batch), count, device=str(model_device(model)))
