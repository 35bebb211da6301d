"""Ensembles as a first-class run: ``RUN/members/<name>/`` are ordinary runs (one per backbone and seed, the
same recipe otherwise, or a named preset's recipe with ``BACKBONE@PRESET``); ``RUN/model.json``
(``kind: ensemble``) lists them, and its validation metrics, calibration and screening threshold are those of
the averaged model, fitted on the validation part only.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from mpoxscope.config import PRESETS, ModelConfig, TrainConfig, preset, to_dict
from mpoxscope.data.batch_augment import normalise
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.engine import distributed, rundir
from mpoxscope.engine.checkpoint import load_inference_model, read_meta, write_meta
from mpoxscope.engine.device import resolve_device
from mpoxscope.engine.features import FeatureBank
from mpoxscope.engine.finish import brief, logits_of, protocol, save_validation_probs, scored, screening_block
from mpoxscope.engine.imagecache import ImageCache, build_image_cache
from mpoxscope.engine.predict import calibrated_softmax
from mpoxscope.engine.train import TrainResult, stored_settings_match, train
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import read_json, safe_name, write_json

#: Fields a member always takes from the ensemble's own configuration, whatever its recipe: where and how it
#: runs, and what the averaged model is asked to do.
_SHARED_TRAIN_FIELDS = ("device", "precision", "num_workers", "screen_class", "screen_sensitivity",
                        "screen_confidence")


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One ``--ensemble`` entry, ``BACKBONE[:SEED][@PRESET][/PX][,epochs=N][,refit=yes|no]``, parsed by
    :func:`parse_member`.

    ``recipe``: a preset whose recipe the member follows instead of the shared one; ``image_size``: the member's
    own input side; ``epochs``: its own epoch budget (e.g. a slower backbone trained for fewer epochs so that the
    ensemble fits a time budget); ``refit``: whether the ensemble's ``--refit`` refits this member (by default
    probes always, trained members with ``--refit-trained``; ``refit=no`` keeps a slow member out of a refit's
    retraining). ``None`` means "the ensemble's"."""

    backbone: str
    seed: int
    recipe: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    refit: bool | None = None

    @property
    def name(self) -> str:
        """The member's folder under ``RUN/members/``: every field that makes it a different model (a member
        kept out of a refit ends with other weights than one refit, so ``refit`` is part of the name)."""
        return (f"{self.backbone}-seed{self.seed}" + (f"-{self.recipe}" if self.recipe else "")
                + (f"-{self.image_size}px" if self.image_size else "") + (f"-{self.epochs}ep" if self.epochs else "")
                + ({True: "-refit", False: "-norefit"}.get(self.refit, "")))


def _epochs(value: str) -> int:
    if not (value.isdigit() and 1 <= int(value) <= 10_000):
        raise ValueError("an integer from 1 to 10000")
    return int(value)


def _yes_no(value: str) -> bool:
    if value not in ("yes", "no"):
        raise ValueError("yes or no")
    return value == "yes"


#: ``,KEY=VALUE`` options a member spec may carry: value text -> value (ValueError names what is allowed).
_MEMBER_OPTIONS = {"epochs": _epochs, "refit": _yes_no}


def parse_member(spec: str, default_seed: int) -> MemberSpec:
    """``"tf_efficientnet_lite1:3"`` -> backbone and seed 3; ``"tf_efficientnet_lite2@frozen"``: that member
    follows the ``frozen`` preset's recipe instead of the shared one; ``"tf_efficientnet_lite2/260"``: it reads
    260-px images instead of the ensemble's ``--image-size`` (e.g. each backbone at its native resolution);
    ``"tf_efficientnet_lite2/256,epochs=12"``: and trains for 12 epochs instead of the recipe's;
    ``",refit=no"``: the ensemble's refit leaves this member as validation chose it.

    >>> parse_member("tf_efficientnet_lite2:1@frozen/260,epochs=12", 0)
    MemberSpec(backbone='tf_efficientnet_lite2', seed=1, recipe='frozen', image_size=260, epochs=12, refit=None)
    >>> parse_member("tf_efficientnet_lite2/260,epochs=10,refit=no", 0).name
    'tf_efficientnet_lite2-seed0-260px-10ep-norefit'
    """
    head, *options = spec.split(",")
    rest, slash, px = head.partition("/")
    body, _, recipe = rest.partition("@")
    backbone, _, seed = body.partition(":")
    if not backbone:
        raise MpoxscopeError(f"--ensemble: empty backbone in {spec!r}")
    if "@" in rest and recipe not in PRESETS:
        raise MpoxscopeError(f"--ensemble: unknown recipe {recipe!r} in {spec!r}; choose one of {', '.join(PRESETS)}")
    try:
        seed_value = int(seed) if seed else default_seed
    except ValueError:
        raise MpoxscopeError(f"--ensemble: seed of {spec!r} is not an integer") from None
    if slash and not (px.isdigit() and 32 <= int(px) <= 1024):
        raise MpoxscopeError(f"--ensemble: image size of {spec!r} must be an integer from 32 to 1024")
    values = {}
    for option in options:
        key, eq, value = option.partition("=")
        if key not in _MEMBER_OPTIONS or not eq:
            raise MpoxscopeError(f"--ensemble: unknown option {option!r} in {spec!r}; "
                                 f"use ,KEY=VALUE with KEY one of {', '.join(_MEMBER_OPTIONS)}")
        if key in values:
            raise MpoxscopeError(f"--ensemble: {key} given twice in {spec!r}")
        try:
            values[key] = _MEMBER_OPTIONS[key](value)
        except ValueError as e:
            raise MpoxscopeError(f"--ensemble: {key} of {spec!r} must be {e}") from None
    return MemberSpec(backbone, seed_value, recipe or None, int(px) if slash else None, **values)


def member_configs(specs: tuple[str, ...], model_cfg: ModelConfig, train_cfg: TrainConfig,
                   ) -> list[tuple[str, ModelConfig, TrainConfig]]:
    """(member folder name, model config, train config) per spec: the shared recipe with its backbone/seed, or
    the named preset's recipe (``@PRESET``), at the ensemble's precision and device, at the ensemble's image
    size unless the spec names its own (``/PX``) and for the recipe's epochs unless it names its own."""
    out, seen = [], set()
    for text in specs:
        spec = parse_member(text, train_cfg.seed)
        if spec.name in seen:
            raise MpoxscopeError(f"--ensemble: member {text!r} given twice")
        seen.add(spec.name)
        mc, tc = preset(spec.recipe) if spec.recipe else (model_cfg, train_cfg)
        shared = {f: getattr(train_cfg, f) for f in _SHARED_TRAIN_FIELDS}
        out.append((spec.name, dataclasses.replace(mc, backbone=spec.backbone,
                                                   image_size=spec.image_size or model_cfg.image_size),
                    # a member is never refit on its own: the ensemble refits it after its own calibration
                    dataclasses.replace(tc, seed=spec.seed, ensemble=(), epochs=spec.epochs or tc.epochs,
                                        refit=False, refit_trained=False, **shared)))
    return out


def refit_members(specs: tuple[str, ...], model_cfg: ModelConfig, train_cfg: TrainConfig,
                  ) -> list[tuple[str, ModelConfig, TrainConfig]]:
    """The members an ensemble's ``--refit`` refits after its calibration, as :func:`member_configs` gives them:
    a member's own ``refit=yes|no`` if it names one, else probes always and trained members with
    ``--refit-trained``. Empty without ``--refit``.

    >>> from mpoxscope.config import preset
    >>> m, t = preset("default")
    >>> [n for n, _, _ in refit_members(t.ensemble, m, t)]
    ['tf_efficientnet_lite0-seed0', 'tf_efficientnet_lite2-seed0-probe-260px']
    >>> specs = (*t.ensemble, "tf_efficientnet_lite2/260,epochs=10,refit=no")
    >>> [n for n, _, _ in refit_members(specs, m, t)][-1]
    'tf_efficientnet_lite2-seed0-probe-260px'
    """
    if not train_cfg.refit:
        return []
    members = member_configs(specs, model_cfg, train_cfg)
    wanted = [parse_member(text, train_cfg.seed).refit for text in specs]
    return [(name, mc, tc) for (name, mc, tc), own in zip(members, wanted, strict=True)
            if ((tc.solver == "logistic" or train_cfg.refit_trained) if own is None else own)]


def refit_specs(model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[str] | None:
    """The ``--ensemble`` entries a refit retrains, where a member's own ``refit=`` makes the flags' words
    ("probes", "every member") wrong; None where they say it."""
    specs = train_cfg.ensemble
    if not (train_cfg.refit and any(parse_member(t, train_cfg.seed).refit is not None for t in specs)):
        return None
    chosen = {n for n, _, _ in refit_members(specs, model_cfg, train_cfg)}
    names = [n for n, _, _ in member_configs(specs, model_cfg, train_cfg)]
    return [spec for spec, n in zip(specs, names, strict=True) if n in chosen]


def _recipe_words(m: ModelConfig, t: TrainConfig) -> str:
    """How a model is trained, without its backbone's name."""
    if t.solver == "logistic":
        return (f"frozen, linear probe fitted by logistic regression on pooled features of 8 views with C chosen on "
                f"validation, {m.image_size} px")
    head = "AGFN head" if m.head == "agfn" else f"{m.head} head"
    trunk = {0: "frozen", -1: "fine-tuned end to end"}.get(t.trainable_stages,
                                                            f"last {t.trainable_stages} stages fine-tuned")
    return f"{trunk}, {head}, {m.image_size} px, {t.epochs} epoch{'s' if t.epochs != 1 else ''}"


def describe_model(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    """One model's configuration in words, as reports state it.

    >>> from mpoxscope.config import preset
    >>> describe_model(*preset("probe"))  # doctest: +NORMALIZE_WHITESPACE
    'tf_efficientnet_lite2 frozen, linear probe fitted by logistic regression on pooled features of 8 views with C
    chosen on validation, 260 px'
    """
    return f"{model_cfg.backbone} {_recipe_words(model_cfg, train_cfg)}"


def describe_training(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    """A run's or ensemble's configuration in words: every member by its own recipe, the test-time views and
    the refit (an ensemble's shared ``model_cfg`` says nothing of a member that follows another preset).

    >>> from mpoxscope.config import preset
    >>> describe_training(*preset("pair"))  # doctest: +NORMALIZE_WHITESPACE
    'ensemble of tf_efficientnet_lite0 (fine-tuned end to end, AGFN head, 224 px, 20 epochs) +
    tf_efficientnet_lite2@frozen (frozen, AGFN head, 224 px, 30 epochs); test-time views chosen on validation'
    """
    refit = ("; every member refit on training + validation after every validation choice" if train_cfg.refit_trained
             else "; probes refit on training + validation after every validation choice" if train_cfg.refit else "")
    if train_cfg.ensemble:
        members = member_configs(train_cfg.ensemble, model_cfg, train_cfg)
        what = "ensemble of " + " + ".join(f"{spec} ({_recipe_words(mc, tc)})"
                                           for spec, (_, mc, tc) in zip(train_cfg.ensemble, members, strict=True))
        named = refit_specs(model_cfg, train_cfg)
        if named is not None:
            refit = (f"; {' + '.join(named)} refit on training + validation after every validation choice" if named
                     else "; no member refit")
    else:
        what = describe_model(model_cfg, train_cfg)
    views = "chosen on validation" if train_cfg.tta == "auto" else train_cfg.tta
    return f"{what}; test-time views {views}{refit}"


def input_size(specs: tuple[str, ...], model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    """The ensemble's input side: its largest member's (smaller members resize inside ``EnsembleNet``, so every
    consumer keeps one preprocessed input)."""
    return max(mc.image_size for _, mc, _ in member_configs(specs, model_cfg, train_cfg))


def train_ensemble(data: SampleSet, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   specs: tuple[str, ...], run_dir: str | Path, data_info: dict | None = None,
                   images: ImageCache | None = None, progress: bool = True, log=print,
                   banks: dict[str, FeatureBank] | None = None) -> TrainResult:
    """Train every member (each resumable on its own), then fit the ensemble's calibration and screening
    threshold on the validation part and write ``RUN/model.json``. ``banks``: trunk outputs of frozen-trunk
    members by member name, shared across the folds of a cross-validation."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    members = member_configs(specs, model_cfg, train_cfg)
    data_info = {**(data_info or {}), "fold": fold.name}
    caches = {images.clean.shape[-1]: images} if images is not None else {}

    def images_at(size: int) -> ImageCache:  # decoded once per size (members may read different sizes)
        if size not in caches:
            caches[size] = build_image_cache(data, sorted(set(fold.train) | set(fold.validation)), size,
                                             workers=train_cfg.num_workers, progress_bar=progress)
        return caches[size]

    results = []
    for name, mc, tc in members:
        log(f"{fold.name}: ensemble member {name}")
        results.append(train(data, fold, mc, tc, run_dir / rundir.MEMBERS / name, data_info,
                             images=images_at(mc.image_size),
                             bank=(banks or {}).get(name), progress=progress, log=log))
    if distributed.is_main():  # under torchrun, rank 0 alone writes
        size = max(mc.image_size for _, mc, _ in members)
        names = [n for n, _, _ in members]
        status = _status(run_dir, train_cfg)
        if status is None:  # a refit ensemble's calibration is never fitted again: its probes saw validation
            combine(run_dir, names, data, fold, images_at(size), train_cfg, data_info, specs)
        if train_cfg.refit and status != "finished":
            _refit_members(run_dir, members, specs, model_cfg, data, fold, images_at, train_cfg, log, banks or {},
                           progress)
    distributed.barrier()
    meta = read_meta(run_dir)
    return TrainResult(run_dir, 0, max(r.epochs_run for r in results), meta["validation"],
                       time.perf_counter() - t0, results[0].skipped_files, all(r.resumed for r in results))


def _refuse_refit(run: Path, meta: dict) -> None:
    """An ensemble's calibration is fitted on validation: a member refit on it would score it in-sample."""
    if meta.get("refit"):
        raise MpoxscopeError(f"{run}: was refit on training + validation, so an ensemble cannot be calibrated on its "
                             f"validation part; use the run as it was before the refit (train it with --no-refit) "
                             f"or a new --out")


def _status(run_dir: Path, train_cfg: TrainConfig) -> str | None:
    """``calibrated`` or ``finished`` for a refit ensemble of this configuration already calibrated (or also
    refit) in ``run_dir``, else None (calibrate)."""
    if not train_cfg.refit or not (run_dir / rundir.STATE).is_file():
        return None
    status = read_json(run_dir / rundir.STATE).get("status")
    same = stored_settings_match(read_meta(run_dir), {"train": to_dict(train_cfg)}, ("train",))
    return status if same and status in ("calibrated", "finished") else None


def _refit_members(run_dir: Path, members: list, specs: tuple[str, ...], model_cfg: ModelConfig, data: SampleSet,
                   fold: Fold, images_at, train_cfg: TrainConfig, log, banks: dict[str, FeatureBank],
                   progress: bool = False) -> None:
    """Refit the members :func:`refit_members` names on training + validation, after
    the ensemble's calibration and threshold were fitted on validation (``engine.probe.refit_probe``,
    ``engine.refit.refit_trained``). Each member's refit is resumable and done once."""
    from mpoxscope.engine.probe import refit_probe
    from mpoxscope.engine.refit import refit_trained

    device = resolve_device(train_cfg.device)
    refit = refit_members(specs, model_cfg, train_cfg)  # the same tuples as ``members``
    for name, mc, tc in refit:
        member = run_dir / rundir.MEMBERS / name
        if tc.solver == "logistic":
            refit_probe(member, data, fold, images_at(mc.image_size), device, workers=train_cfg.num_workers, log=log)
        else:
            refit_trained(member, data, fold, mc, tc, images_at(mc.image_size), banks.get(name), progress, log)
    meta = read_meta(run_dir)
    meta["refit"] = {"members": [name for name, _, _ in refit], "parts": ["train", "validation"],
                     "note": "these members were refit on the training and validation parts after the ensemble's "
                             "calibration and threshold were fitted; validation scores are from before the refit"}
    write_meta(run_dir, meta)
    write_json(run_dir / rundir.STATE, {"status": "finished", "members": [n for n, _, _ in members]})


def combine(run_dir: Path, names: list[str], data: SampleSet, fold: Fold, images: ImageCache,
            train_cfg: TrainConfig, data_info: dict, specs: tuple[str, ...]) -> dict:
    """Write the ensemble's ``model.json`` from trained members (no test data involved)."""
    from mpoxscope.engine.calibration import ENSEMBLE_METHODS, calibrate

    for n in names:
        _refuse_refit(run_dir / rundir.MEMBERS / n, read_meta(run_dir / rundir.MEMBERS / n))
    first = read_meta(run_dir / rundir.MEMBERS / names[0])
    meta = {k: first[k] for k in ("format_version", "mpoxscope_version", "classes", "normalization")}
    meta["image_size"] = int(images.clean.shape[-1])  # the largest member's; the others resize inside the model
    meta.update(kind="ensemble", model={**first["model"], "backbone": "+".join(names)},
                members=[{"dir": f"{rundir.MEMBERS}/{n}"} for n in names], data=data_info,
                train={**to_dict(train_cfg), "ensemble": list(specs)}, pretrained_source=first.get("pretrained_source"))
    write_meta(run_dir, meta)  # members are readable from here on; calibration follows
    device = resolve_device(train_cfg.device)
    model, _ = load_inference_model(run_dir, device=device)
    norm = meta["normalization"]
    x = normalise(images.clean.index_select(0, images.index(fold.validation)), norm["mean"], norm["std"])
    targets = np.array([data.targets[i] for i in fold.validation])
    logits = logits_of(model, x, device)
    val = scored(logits, targets, data.classes)
    member_val = {n: read_meta(run_dir / rundir.MEMBERS / n).get("validation", {}) for n in names}
    meta["validation"] = {**brief(val), "protocol": protocol(data_info, "validation"),
                          "members": {n: brief(v) for n, v in member_val.items()}}
    # Always the ensemble's temperature: chosen on validation (benchmarks/results/calibration.md)
    meta["calibration"] = calibrate(logits, targets, methods=ENSEMBLE_METHODS)
    probs = calibrated_softmax(torch.as_tensor(logits), meta["calibration"])
    meta["screening"] = screening_block(probs, targets, data.classes, train_cfg, protocol(data_info, "validation"),
                                        [data.groups[i] for i in fold.validation])
    save_validation_probs(run_dir, [data.samples[i].filename for i in fold.validation], probs, meta)
    write_meta(run_dir, meta)
    # a refit follows (train_ensemble): until it is done, a rerun must not calibrate again
    write_json(run_dir / rundir.STATE, {"status": "calibrated" if train_cfg.refit else "finished", "members": names})
    return meta


#: What ``assemble`` copies of each member run: enough to predict and to describe it (no optimiser state or
#: feature caches).
_MEMBER_FILES = (rundir.META, rundir.BEST, rundir.STATE, rundir.METRICS)


def check_assemble_inputs(runs: list[str | Path]) -> list[tuple[str, Path, dict]]:
    """(member folder name, run, model.json) per run, after refusing what cannot form one ensemble: fewer than
    two runs, an unfinished run or an ensemble, or runs of different classes, normalisation, data or fold."""
    from mpoxscope.fileio import read_json

    if len(runs) < 2:
        raise MpoxscopeError("ensemble: give at least two finished runs")
    resolved = [Path(r).resolve() for r in runs]
    twice = next((r for i, r in enumerate(runs) if resolved[i] in resolved[:i]), None)
    if twice is not None:  # the same weights twice would only weigh that run double
        raise MpoxscopeError(f"{twice}: given twice; each member must be another run")
    out, names, first = [], set(), None
    for run in map(Path, runs):
        meta = read_meta(run)
        if meta.get("kind") == "ensemble":
            raise MpoxscopeError(f"{run}: is an ensemble; pass its member runs ({run}/{rundir.MEMBERS}/*) instead")
        state = read_json(run / rundir.STATE) if (run / rundir.STATE).is_file() else {}
        if state.get("status") != "finished" or not (run / rundir.BEST).is_file():
            raise MpoxscopeError(f"{run}: training has not finished (no finished {rundir.STATE} and {rundir.BEST})")
        _refuse_refit(run, meta)
        first = first or (run, meta)
        for key in ("classes", "normalization"):
            if meta.get(key) != first[1].get(key):
                raise MpoxscopeError(f"{run}: {key} differ from {first[0]}'s")
        for key in ("dataset", "split_source", "fold", "n_train", "n_validation", "n_test"):
            if (meta.get("data") or {}).get(key) != (first[1].get("data") or {}).get(key):
                raise MpoxscopeError(f"{run}: data field {key!r} differs from {first[0]}'s: members must be "
                                     f"trained on the same fold of the same data")
        m, t = meta.get("model", {}), meta.get("train", {})
        # a folder name under OUT/members: only name characters (a hand-made model.json's "../x" stays inside)
        base = name = safe_name(f"{m.get('backbone') or 'model'}-seed{t.get('seed', 0)}-{meta['image_size']}px",
                                "member")
        k = 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        out.append((name, run, meta))
    return out


@dataclasses.dataclass
class Assembly:
    """An ensemble to assemble, every input checked: the member runs (folder name, run, model.json) and the fold
    they were trained on (``data``, ``fold``, ``info`` as ``train`` records it)."""

    members: list[tuple[str, Path, dict]]
    data: SampleSet
    fold: Fold
    info: dict


def plan_assembly(runs: list[str | Path], data_root: str | Path | None = None, split_file: str | None = None,
                  folds: int | None = None, groups_csv: str | None = None) -> Assembly:
    """Check the runs (``check_assemble_inputs``) and find their fold in the data, writing nothing.

    ``data_root``: the dataset folder (default: the one the runs record); ``split_file``, ``folds`` and
    ``groups_csv`` as in ``train`` (default: the split file and k the runs record): they must give the fold the
    runs were trained on (its recorded sizes are checked).
    """
    from mpoxscope.config import DataConfig
    from mpoxscope.data.splits import select_fold
    from mpoxscope.engine.runner import prepare, recorded_split

    members = check_assemble_inputs(runs)
    first = members[0][2]
    recorded = first.get("data", {})
    if not (data_root or recorded.get("root")):
        raise MpoxscopeError(f"{members[0][1]}: the run records no dataset folder; pass it (--data)")
    recorded_file, recorded_k = recorded_split(recorded)
    prepared = prepare(DataConfig(root=str(data_root or recorded.get("root")), split_file=split_file or recorded_file,
                                  folds=folds or recorded_k, groups_csv=groups_csv),
                       int(first.get("train", {}).get("seed", 0)))
    fold = select_fold(prepared.folds, recorded.get("fold", "fold1"))
    info = prepared.info(fold)
    if any(k in recorded and info.get(k) != recorded[k] for k in ("n_train", "n_validation", "n_test")):
        raise MpoxscopeError(f"{data_root or recorded.get('root')}: {fold.name} is not the fold the runs were "
                             f"trained on (its train/validation/test sizes differ)")
    return Assembly(members, prepared.data, fold, info)


def write_assembly(plan: Assembly, out: str | Path, device: str = "auto", progress: bool = True) -> dict:
    """Copy each member's model files to ``OUT/members/<name>/`` and fit the ensemble's temperature and screening
    threshold on the fold's validation part exactly as ``train_ensemble`` fits them (the test part is not read).
    Returns the ensemble's ``model.json``."""
    import shutil

    from mpoxscope.config import from_dict

    out = Path(out)
    for name, run, _ in plan.members:
        dest = out / rundir.MEMBERS / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in _MEMBER_FILES:
            if (run / f).is_file():
                shutil.copy2(run / f, dest / f)
    size = max(int(meta["image_size"]) for _, _, meta in plan.members)
    images = build_image_cache(plan.data, sorted(plan.fold.validation), size, progress_bar=progress)
    train_cfg = dataclasses.replace(from_dict(TrainConfig, plan.members[0][2].get("train", {})), device=device)
    names = [n for n, _, _ in plan.members]
    meta = combine(out, names, plan.data, plan.fold, images, train_cfg, plan.info, tuple(names))
    meta["assembled_from"] = [str(run.resolve()) for _, run, _ in plan.members]
    write_meta(out, meta)
    return meta


def assemble(runs: list[str | Path], out: str | Path, data_root: str | Path | None = None, device: str = "auto",
             progress: bool = True, split_file: str | None = None, folds: int | None = None,
             groups_csv: str | None = None) -> dict:
    """An ensemble run from finished runs of the same fold, without retraining (``plan_assembly`` then
    ``write_assembly``). Members may have different input sizes (the ensemble reads the largest). Returns the
    ensemble's ``model.json``."""
    return write_assembly(plan_assembly(runs, data_root, split_file, folds, groups_csv), out, device, progress)
