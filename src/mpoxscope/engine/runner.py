"""High-level entry points (what the CLI calls, and what a notebook would): train or evaluate one fold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpoxscope.config import DataConfig, ModelConfig, TrainConfig
from mpoxscope.data.protocol import dataset_name, resolve_folds, split_request
from mpoxscope.data.samples import SampleSet, load_samples
from mpoxscope.data.splits import Fold, select_fold
from mpoxscope.engine.checkpoint import read_meta
from mpoxscope.engine.evaluate import evaluate
from mpoxscope.engine.train import TrainResult, train


@dataclass
class PreparedData:
    data: SampleSet
    folds: list[Fold]
    split_source: str
    split_file: str = "auto"  # what reproduces these folds: the split file read, "none" (grouped k-fold) or "auto"
    n_folds: int = 5

    def info(self, fold: Fold) -> dict:
        """What a run records about its data (the protocol of every number it reports, and how to rebuild it)."""
        return {"dataset": dataset_name(self.data), "root": str(self.data.root), "split_source": self.split_source,
                "split_file": self.split_file, "n_folds": self.n_folds,
                "fold": fold.name, "classes": self.data.classes,
                "n_train": len(fold.train), "n_validation": len(fold.validation), "n_test": len(fold.test)}


def prepare(cfg: DataConfig, seed: int = 0) -> PreparedData:
    data = load_samples(cfg.root, cfg.groups_csv)
    folds, source = resolve_folds(data, cfg.split_file, cfg.folds, seed)
    return PreparedData(data, folds, source, split_request(data, cfg.split_file), cfg.folds)


def recorded_split(recorded: dict) -> tuple[str, int]:
    """(split file, k) a run was trained with, from its ``model.json`` ``data``: the recorded file while it
    exists, otherwise (older runs, or a moved dataset) ``auto``."""
    split_file = recorded.get("split_file", "auto")
    if split_file not in ("auto", "none") and not Path(split_file).is_file():
        split_file = "auto"
    return split_file, int(recorded.get("n_folds", 5))


def train_fold(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: str | Path,
               resume: bool = True, progress: bool = True, log=print,
               prepared: PreparedData | None = None) -> TrainResult:
    """Train on one fold of a dataset folder (official split file when there is one); with
    ``train_cfg.ensemble`` member specs (``BACKBONE[:SEED]``), one run per member under ``run_dir/members`` and
    the averaged model.
    ``prepared``: the data already loaded by :func:`prepare` (the CLI checks it before touching ``run_dir``)."""
    prepared = prepared or prepare(data_cfg, train_cfg.seed)
    fold = select_fold(prepared.folds, data_cfg.fold)
    info = prepared.info(fold)
    log(f"data: {info['dataset']} ({len(prepared.data)} images, {len(prepared.data.classes)} classes), "
        f"{prepared.split_source}, {fold.name}: train {info['n_train']} / validation {info['n_validation']} / "
        f"test {info['n_test']} (test not used for training or selection)")
    if train_cfg.ensemble:
        from mpoxscope.engine.ensemble import train_ensemble

        return train_ensemble(prepared.data, fold, model_cfg, train_cfg, train_cfg.ensemble, run_dir, info,
                              progress=progress, log=log)
    return train(prepared.data, fold, model_cfg, train_cfg, run_dir, info, resume=resume, progress=progress, log=log)


def evaluate_run(run_dir: str | Path, data_root: str | Path | None, out_dir: str | Path, split: str = "test",
                 split_file: str | None = None, fold: str | None = None,
                 device: str = "auto", runtime: str = "torch", onnx_file: str | Path | None = None) -> dict:
    """Evaluate a run on ``split`` of the fold it was trained on, rebuilt with the split file it recorded (or
    another fold / split file on request)."""
    meta = read_meta(run_dir)
    recorded = meta.get("data", {})
    root = data_root or recorded.get("root")
    recorded_file, n_folds = recorded_split(recorded)
    cfg = DataConfig(root=str(root), split_file=split_file or recorded_file, fold=fold or recorded.get("fold", "fold1"),
                     folds=n_folds)
    prepared = prepare(cfg, int(meta.get("train", {}).get("seed", 0)))
    f = select_fold(prepared.folds, cfg.fold)
    predictor = load_predictor(run_dir, device, runtime, onnx_file=onnx_file)
    protocol = f"{dataset_name(prepared.data)}, {prepared.split_source}, {f.name}, {split}"
    if split != "test" and meta.get("refit"):  # the refit trained on the validation part too
        protocol += " (IN-SAMPLE: the model was refit on training + validation)"
    if split == "test":
        protocol += _seen_note(meta, cfg, prepared, f)
    return evaluate(predictor, prepared.data, f.indices(split), out_dir, protocol)


def _seen_note(meta: dict, asked: DataConfig, prepared: PreparedData, fold: Fold) -> str:
    """Words for the protocol when the test images asked for are not the run's own test part: another fold or
    split file can hold images the run trained or validated on (its "test" score would be in-sample)."""
    from mpoxscope.errors import MpoxscopeError

    recorded = meta.get("data", {})
    own_file, own_k = recorded_split(recorded)
    own_fold = recorded.get("fold", "fold1")
    if (asked.split_file, asked.folds, fold.name) == (own_file, own_k, own_fold):
        return ""  # the run's own fold, rebuilt as it recorded it
    try:
        own = prepare(DataConfig(root=asked.root, split_file=own_file, fold=own_fold, folds=own_k),
                      int(meta.get("train", {}).get("seed", 0)))
        mine = select_fold(own.folds, own_fold)
    except MpoxscopeError:
        return " (NOT CHECKED: the run's own fold could not be rebuilt to compare with its training images)"
    seen = {str(own.data.samples[i].path) for i in (*mine.train, *mine.validation)}
    n = sum(str(prepared.data.samples[i].path) in seen for i in fold.test)
    if not n:
        return ""
    return (f" (IN-SAMPLE: {n} of these {len(fold.test)} images were in the run's training or validation part, "
            f"{own_fold} of its own split)")


def load_predictor(run_dir: str | Path, device: str = "auto", runtime: str = "torch",
                   onnx_file: str | Path | None = None):
    """A predictor of ``runtime`` (see :data:`mpoxscope.registry.RUNTIMES`): PyTorch, ONNX Runtime, ... all
    with the :class:`Predictor` interface (``onnx_file``: the file ``export --out`` wrote instead of the
    runtime's default; it implies ``onnx`` when the runtime is torch)."""
    from mpoxscope.engine.runtimes import load_predictor as load

    if onnx_file is not None and runtime == "torch":
        runtime = "onnx"
    return load(run_dir, runtime, device, onnx_file)
