"""CLI commands of the engine: train, cv, evaluate, predict, screen, demo."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from mpoxscope.registry import HEADS, RUNTIMES, Choices


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``cv``: preset, model, optimisation, device."""
    g = p.add_argument_group("model and training (override the preset)")
    g.add_argument("--preset", default="default", help="default (Lite0 end to end averaged with a linear probe on a "
                   "frozen Lite2 at 260 px, both refit on training + validation) | pair (the previous default: Lite0 "
                   "end to end averaged with an AGFN head on a frozen Lite2, no refit) | accurate (pair + Lite2 "
                   "fine-tuned at 260 px) | lite0 (the Lite0 member alone) | probe (logistic regression on a frozen "
                   "trunk) | frozen | paper (ResNet50 AGFN, end to end) | tiny")
    g.add_argument("--backbone", help="timm model name, e.g. tf_efficientnet_lite0 (offline), resnet50")
    g.add_argument("--head", choices=Choices(HEADS), metavar="HEAD", help="classification head: %(choices)s")
    g.add_argument("--pretrained", help="auto | imagenet | none | PATH to .safetensors/.pth ImageNet weights")
    g.add_argument("--image-size", type=int)
    g.add_argument("--num-heads", dest="num_heads", type=int, help="attention heads of the AGFN head (default 8)")
    g.add_argument("--heads", dest="num_heads", type=int, action=_Deprecated, help=argparse.SUPPRESS)
    g.add_argument("--d-model", type=int)
    g.add_argument("--fusion", choices=["concat", "gate"])
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="head learning rate")
    g.add_argument("--backbone-lr", type=float, help="learning rate of fine-tuned backbone stages")
    g.add_argument("--patience", type=int, help="early-stopping patience in epochs (validation macro-F1)")
    g.add_argument("--freeze", action="store_const", const=0, dest="trainable_stages",
                   help="train the head on a frozen backbone (cached features; the CPU fast path)")
    g.add_argument("--finetune", type=int, dest="trainable_stages", metavar="K",
                   help="also fine-tune the last K backbone stages (-1: everything, end to end)")
    g.add_argument("--cache-views", type=int, help="augmented views cached per training image (0: no cache)")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto | cpu | cuda[:N]")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16 on CUDA and on CPUs with bf16 kernels, else fp32)")
    g.add_argument("--workers", dest="num_workers", type=int,
                   help="threads decoding images (default 2); next to a GPU also the processes augmenting a frozen "
                        "trunk's cached views")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--layer-decay", type=float,
                   help="backbone learning-rate factor per stage, from the last stage down (default 1: none)")
    g.add_argument("--ema-decay", type=float, metavar="D",
                   help="validate, select and keep an exponential moving average of the weights (timm ModelEmaV3 "
                        "with warm-up; e.g. 0.999; default 0: off)")
    g.add_argument("--drop-path", dest="drop_path", type=float, metavar="RATE",
                   help="stochastic depth of the backbone blocks being trained (timm drop_path_rate, e.g. 0.1; "
                        "default 0: off; stored in model.json; ensemble members with @PRESET keep that preset's)")
    g.add_argument("--freeze-bn-stats", dest="freeze_bn_stats", action="store_true", default=None,
                   help="keep the BatchNorm running statistics of the backbone stages being trained at their "
                        "pretrained values (those layers run in inference mode; their scale and shift still learn); "
                        "stored in model.json; ensemble members with @PRESET keep that preset's")
    g.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup with Beta(ALPHA, ALPHA) (default 0: off)")
    g.add_argument("--cutmix", type=float, metavar="ALPHA",
                   help="CutMix with Beta(ALPHA, ALPHA) (default 0: off); with --mixup, one of the two per batch")
    g.add_argument("--augment", nargs="+", metavar="NAME=VALUE",
                   help="training augmentation strengths, e.g. --augment scale_min=0.35 rotation=45 vflip=no; "
                        "NAME: scale_min (least area share a random crop keeps, default 0.6), rotation (degrees, 30), "
                        "vflip (yes), brightness, contrast, saturation (0.25), hue (0.03), skin_tone_p (0.5), "
                        "skin_tone_strength (0.3); stored in model.json; ensemble members with @PRESET keep that "
                        "preset's")
    g.add_argument("--solver", choices=["adamw", "logistic"],
                   help="adamw: epochs of gradient steps (default); logistic: a linear head on a frozen trunk fitted "
                        "by scikit-learn's logistic regression on pooled features of 8 views (the probe preset)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="after every choice made on validation (C, views, calibration, thresholds), refit linear "
                        "probes (--solver logistic, or an ensemble's @probe members) on training + validation "
                        "(validation scores stay those of the model before the refit; --preset probe refits, "
                        "--no-refit keeps the fit on the training part)")
    g.add_argument("--refit-trained", action="store_true", default=None,
                   help="implies --refit, and also retrains trained (AdamW) runs and members from the same start on "
                        "training + validation for the epoch count chosen on validation, keeping every choice "
                        "made on validation (about 1.3 x each such run's training time again)")
    g.add_argument("--tta", choices=["auto", "none", "flips", "d4"],
                   help="test-time views stored with the model: auto (default) picks none, flips (identity + "
                        "h + v) or d4 (the 8 symmetries of the square) on validation")
    g.add_argument("--ensemble", nargs="+", metavar="BACKBONE[:SEED][@PRESET][/PX][,epochs=N]",
                   help="train one member per entry (same recipe, this backbone and seed; @PRESET: that preset's "
                        "recipe, e.g. a frozen trunk; /PX: that member's own input size, the ensemble reads the "
                        "largest and resizes for the others; ,epochs=N: that member's own epoch count) and average "
                        "their calibrated probabilities; e.g. --ensemble tf_efficientnet_lite0 "
                        "tf_efficientnet_lite2@frozen tf_efficientnet_lite2/260,epochs=12; "
                        "--ensemble none trains one model")
    g.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="skip unreadable images (listed in the run) instead of stopping")


class _Deprecated(argparse.Action):
    """An old spelling kept for one release: stores as the new option does, with a note on stderr."""

    NEW = {"--heads": "--num-heads"}

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string} is deprecated; use {self.NEW.get(option_string or '', 'the new name')}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    """``--runtime``: the runtimes that read files and data sets (see mpoxscope.registry.RUNTIMES)."""
    p.add_argument("--runtime", default="torch", choices=Choices(RUNTIMES, lambda r: r.batch), metavar="RUNTIME",
                   help="%(choices)s (default torch)")


def _sensitivity(text: str) -> float:
    """argparse type: a sensitivity in (0, 1] (a clear usage error otherwise)."""
    from mpoxscope.engine.screening import check_sensitivity
    from mpoxscope.errors import MpoxscopeError

    try:
        return check_sensitivity(text, "sensitivity")
    except MpoxscopeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _confidence(text: str) -> float | None:
    """0 means 'no confidence margin' (the point estimate); else a confidence in [0.5, 1)."""
    from mpoxscope.engine.screening import check_confidence
    from mpoxscope.errors import MpoxscopeError

    try:
        return None if float(text) == 0 else check_confidence(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    except MpoxscopeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 0 for the point estimate)") from None


def add_screening_options(p: argparse.ArgumentParser) -> None:
    """Options of ``train`` and ``cv``: which class to catch first, at what sensitivity (chosen on validation)."""
    g = p.add_argument_group("screening (catch one class first; threshold chosen on validation)")
    g.add_argument("--screen-class", dest="screen_class", metavar="CLASS",
                   help="class to refer when P(class) reaches the screening threshold (default Mpox; aliases such "
                        "as Monkeypox accepted)")
    g.add_argument("--mpox-sensitivity", dest="screen_sensitivity", type=_sensitivity, metavar="S",
                   help="target sensitivity for the screening class on validation, in (0, 1] (default 0.90)")
    g.add_argument("--screen-confidence", dest="screen_confidence", type=_confidence, metavar="C",
                   help="confidence with which the target sensitivity must be met on validation (one-sided "
                        "patient-bootstrap lower bound; default 0.95); 0: the point estimate")


def configs_from_args(args: argparse.Namespace):
    from mpoxscope.config import ModelConfig, TrainConfig, preset

    model_cfg, train_cfg = preset(args.preset)
    model_over = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)
                  if getattr(args, f.name, None) is not None}
    train_over = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                  if getattr(args, f.name, None) is not None}
    if "augment" in train_over:  # NAME=VALUE items over the preset's strengths
        from mpoxscope.data.transforms import parse_augment

        train_over["augment"] = parse_augment(train_over["augment"], train_cfg.augment)
    if "ensemble" in train_over:
        train_over["ensemble"] = tuple(e for e in train_over["ensemble"] if e.lower() != "none")
    elif "backbone" in model_over:  # --backbone X asks for one model of X, not the preset's ensemble members
        train_over["ensemble"] = ()
    if train_over.get("refit_trained"):  # an extension of --refit; --no-refit beside it is refused later
        train_over.setdefault("refit", True)
    elif train_over.get("refit") is False:  # --no-refit turns off every refit a preset asks for
        train_over["refit_trained"] = False
    return dataclasses.replace(model_cfg, **model_over), dataclasses.replace(train_cfg, **train_over)


def add_data_options(p: argparse.ArgumentParser, recorded: bool = False) -> None:
    """``--split-file``/``--folds``/``--groups-csv``; ``recorded``: for commands that read trained runs, whose
    default is the split the runs recorded rather than ``auto``."""
    default = "the split file the runs recorded" if recorded else "'auto'"
    p.add_argument("--split-file", default=None if recorded else "auto",
                   help=f"split file (.xlsx like MSLD's datalog.xlsx, or CSV fold,split,filename); 'auto' finds one "
                        f"beside the data; 'none' uses patient-grouped stratified k-fold; default: {default}")
    p.add_argument("--folds", type=int, default=None if recorded else 5,
                   help="k for the grouped k-fold when there is no split file; default: "
                        + ("the runs' k" if recorded else "5"))
    p.add_argument("--groups-csv", help="CSV filename,group giving the patient of each image (non-MSLD data)")


def check_train_options(model_cfg, train_cfg) -> None:
    """Refuse option values that could only fail later (after minutes of caching), in one line each."""
    from mpoxscope.errors import MpoxscopeError

    for name in ("epochs", "batch_size"):
        if getattr(train_cfg, name) < 1:
            raise MpoxscopeError(f"--{name.replace('_', '-')}: must be at least 1")
    if train_cfg.cache_views < 0:
        raise MpoxscopeError("--cache-views: must be 0 (no cache) or more")
    from mpoxscope.engine.probe import check_probe

    check_probe(model_cfg, train_cfg)
    if not 0 <= train_cfg.ema_decay < 1:
        raise MpoxscopeError(f"--ema-decay: must be in [0, 1) (0: off), got {train_cfg.ema_decay}")
    for name in ("mixup", "cutmix"):
        if getattr(train_cfg, name) < 0:
            raise MpoxscopeError(f"--{name}: must be 0 (off) or a positive Beta alpha, got {getattr(train_cfg, name)}")
    train_cfg.augment.check()
    if not 0 <= model_cfg.drop_path < 1:
        raise MpoxscopeError(f"--drop-path: must be in [0, 1) (0: off), got {model_cfg.drop_path}")
    if model_cfg.drop_path and not train_cfg.ensemble and train_cfg.trainable_stages == 0:
        raise MpoxscopeError("--drop-path: the backbone is frozen (--freeze or the preset), so it would do nothing")
    if train_cfg.freeze_bn_stats and not train_cfg.ensemble and train_cfg.trainable_stages == 0:
        raise MpoxscopeError("--freeze-bn-stats: the backbone is frozen (--freeze or the preset), so it would do "
                             "nothing")
    check_image_size(model_cfg.image_size)
    _check_ranges(model_cfg, train_cfg)
    if model_cfg.d_model % model_cfg.num_heads:
        raise MpoxscopeError(f"--num-heads: must divide --d-model ({model_cfg.d_model}), got {model_cfg.num_heads}")
    models = [model_cfg]
    if train_cfg.ensemble:
        from mpoxscope.engine.ensemble import member_configs

        # a bad member spec fails now, not after caching
        models = [mc for _, mc, _ in member_configs(train_cfg.ensemble, model_cfg, train_cfg)]
    for mc in models:
        check_backbone_name(mc.backbone)
    check_device(train_cfg.device)
    for mc in models:
        check_pretrained_file(mc)


def check_pretrained_file(model_cfg) -> None:
    """A ``--pretrained FILE`` is read and fitted to its backbone now, before ``--overwrite`` deletes an earlier
    run or ``--out`` is made (a text file, an empty file or weights of another backbone used to fail only then)."""
    from mpoxscope.errors import MpoxscopeError

    source = model_cfg.pretrained
    if source in ("auto", "imagenet", "none"):
        return
    if not Path(source).is_file():
        raise MpoxscopeError(f"--pretrained: {source}: " + ("a folder, not a weights file" if Path(source).is_dir()
                                                            else "file not found"))
    from mpoxscope.models.backbones import create_backbone
    from mpoxscope.models.pretrained import load_pretrained

    load_pretrained(create_backbone(model_cfg.backbone, model_cfg.image_size), model_cfg.backbone, source)


def check_image_size(size: int) -> None:
    """model.json accepts 16-4096 px; below 32 the feature grids vanish."""
    from mpoxscope.errors import MpoxscopeError

    if not 32 <= size <= 4096:
        raise MpoxscopeError(f"--image-size: must be from 32 to 4096, got {size}")


def check_backbone_name(name: str) -> None:
    """Refuse a backbone timm does not know, in one line, before images are decoded (hub names pass: they are
    resolved only when the model is built)."""
    import timm

    from mpoxscope.errors import MpoxscopeError

    if ":" not in name and not timm.is_model(name):
        raise MpoxscopeError(f"--backbone: unknown backbone {name!r} (timm.list_models() names the known ones)")


def check_device(name: str) -> None:
    """Refuse a device that does not exist here before any output folder or file is made."""
    from mpoxscope.engine.device import resolve_device

    resolve_device(name)


#: (option, config, field, lowest, highest, lowest allowed itself?): numbers that would otherwise fail only after
#: minutes of caching (a traceback) or train silently wrong (a negative learning rate ascends the loss).
_RANGES = (("--lr", "train", "lr", 0.0, 10.0, False), ("--backbone-lr", "train", "backbone_lr", 0.0, 10.0, True),
           ("--weight-decay", "train", "weight_decay", 0.0, 10.0, True),
           ("--label-smoothing", "train", "label_smoothing", 0.0, 0.999, True),
           ("--layer-decay", "train", "layer_decay", 0.0, 10.0, False),
           ("--warmup-epochs", "train", "warmup_epochs", 0, 10_000, True),
           ("--patience", "train", "patience", 1, 10**6, True),
           ("--num-heads", "model", "num_heads", 1, 1024, True), ("--d-model", "model", "d_model", 1, 65536, True))


def _check_ranges(model_cfg, train_cfg) -> None:
    import math

    from mpoxscope.errors import MpoxscopeError

    for option, where, name, low, high, closed in _RANGES:
        value = getattr(model_cfg if where == "model" else train_cfg, name)
        ok = math.isfinite(value) and (value >= low if closed else value > low) and value <= high
        if not ok:
            side = "at least" if closed else "above"
            raise MpoxscopeError(f"{option}: must be {side} {low} and at most {high}, got {value}")


def _prepare_output(out: str, kind: str, overwrite: bool = False) -> Path:
    """After every input is validated: empty a run folder for ``--overwrite`` (only what mpoxscope wrote), then
    mark the folder as mpoxscope's."""
    from mpoxscope.fileio import clear_output_dir, mark_output_dir

    if overwrite:
        kept = clear_output_dir(out, kind)
        if kept:
            print(f"--overwrite: kept {len(kept)} file(s) mpoxscope did not write: {', '.join(kept[:5])}",
                  file=sys.stderr)
    return mark_output_dir(out, kind)


def run_train(args: argparse.Namespace) -> int:
    from mpoxscope.config import DataConfig
    from mpoxscope.data.splits import select_fold
    from mpoxscope.engine.runner import prepare, train_fold
    from mpoxscope.fileio import check_output_dir

    # Everything is checked before anything is written or deleted: options, --out, data, split file and fold.
    model_cfg, train_cfg = configs_from_args(args)
    check_train_options(model_cfg, train_cfg)
    check_output_dir(args.out, "train")
    data_cfg = DataConfig(root=args.data, split_file=args.split_file, fold=args.fold, folds=args.folds,
                          groups_csv=args.groups_csv)
    prepared = prepare(data_cfg, train_cfg.seed)
    select_fold(prepared.folds, data_cfg.fold)
    _prepare_output(args.out, "train", overwrite=args.overwrite)
    result = train_fold(data_cfg, model_cfg, train_cfg, args.out, resume=not args.no_resume,
                        progress=not args.quiet, prepared=prepared)
    v = result.validation
    from mpoxscope.engine.distributed import is_main

    if not is_main():  # under torchrun, rank 0 reports
        return 0
    refit = " (before the refit on training + validation)" if train_cfg.refit else ""
    print(f"best epoch {result.best_epoch} of {result.epochs_run}; [{v.get('protocol')}]{refit} accuracy "
          f"{v.get('accuracy', float('nan')):.4f}, macro-F1 {v.get('f1_macro', float('nan')):.4f}; "
          f"{result.wall_time_s:.0f} s; run saved to {result.run_dir}")
    return 0


def run_ensemble(args: argparse.Namespace) -> int:
    from mpoxscope.engine.ensemble import plan_assembly, write_assembly
    from mpoxscope.errors import MpoxscopeError
    from mpoxscope.fileio import check_output_dir

    # Device, runs, data and fold are checked before --out is touched (--overwrite deletes only after that).
    check_device(args.device)
    plan = plan_assembly(args.runs, args.data, args.split_file, args.folds, args.groups_csv)
    out = check_output_dir(args.out, "train")
    if (out / "model.json").exists() and not args.overwrite:
        raise MpoxscopeError(f"{out}: already holds a run; choose a new --out or pass --overwrite")
    if (out / "model.json").exists() and _run_kind(out) != "ensemble":
        raise MpoxscopeError(f"{out}: holds a single-model run; --overwrite replaces only an ensemble run "
                             "(choose a new --out)")
    if any(out.resolve() == Path(r).resolve() or out.resolve() in Path(r).resolve().parents for r in args.runs):
        raise MpoxscopeError(f"{out}: --out must not be one of the runs or hold them")
    _prepare_output(args.out, "train", overwrite=args.overwrite)
    meta = write_assembly(plan, args.out, device=args.device, progress=not args.quiet)
    v = meta["validation"]
    print(f"ensemble of {len(meta['members'])}: [{v.get('protocol')}] accuracy {v.get('accuracy', float('nan')):.4f}, "
          f"macro-F1 {v.get('f1_macro', float('nan')):.4f}; run saved to {args.out}")
    return 0


def _run_kind(run_dir: Path) -> str | None:
    """``model.json`` → ``kind`` of the run in ``run_dir`` (None when unreadable or absent)."""
    from mpoxscope.errors import MpoxscopeError
    from mpoxscope.fileio import read_json

    try:
        meta = read_json(run_dir / "model.json")
    except (ValueError, OSError, MpoxscopeError):
        return None
    return meta.get("kind") if isinstance(meta, dict) else None


def run_evaluate(args: argparse.Namespace) -> int:
    from mpoxscope.engine.metrics import summary_line
    from mpoxscope.engine.runner import evaluate_run
    from mpoxscope.fileio import check_output_dir, mark_output_dir

    check_output_dir(args.out, "evaluate")
    _check_evaluate_inputs(args)
    mark_output_dir(args.out, "evaluate")  # before any file, so that an interrupted evaluate can be rerun there
    m = evaluate_run(args.run, args.data, args.out, split=args.split, split_file=args.split_file,
                     fold=args.fold, device=args.device, runtime=args.runtime, onnx_file=args.onnx)
    print(summary_line(m, m["protocol"]))
    for f in m.get("failed_files", []):
        print(f"unreadable, excluded: {f}", file=sys.stderr)
    print(f"wrote {args.out}/metrics.json, report.md, confusion_matrix.png, predictions.csv")
    return 0


def _check_evaluate_inputs(args: argparse.Namespace) -> None:
    """What can be refused before ``--out`` is made: the device, the run's model.json, and the paths named."""
    from mpoxscope.engine.checkpoint import read_meta
    from mpoxscope.errors import MpoxscopeError

    check_device(args.device)
    read_meta(args.run)  # a missing or malformed run fails here, in one line
    for option, path in (("DATA", args.data), ("--onnx", args.onnx), ("--split-file", args.split_file)):
        if path and path not in ("auto", "none") and not Path(path).exists():
            raise MpoxscopeError(f"{path}: {option} not found")


def run_predict(args: argparse.Namespace) -> int:
    import csv
    import json

    from mpoxscope.engine.predict import expand_inputs
    from mpoxscope.engine.runner import load_predictor
    from mpoxscope.fileio import csv_cell, printable

    paths = expand_inputs(args.inputs, keep_empty=True)  # an empty folder is one error row, not the end
    predictor = load_predictor(args.run, args.device, args.runtime, onnx_file=args.onnx)
    results = [_refuse_non_finite(r) for r in predictor.predict_paths(paths)]
    if args.format == "json":
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        w = csv.writer(sys.stdout)
        w.writerow(["source", "label", "confidence", *predictor.classes, "decision", "decision_text", "error"])
        for r in results:
            probs = [f"{r.probabilities[c]:.4f}" if r.probabilities else "" for c in predictor.classes]
            d = r.decision
            w.writerow([csv_cell(printable(r.source)), r.label or "",
                        f"{r.confidence:.4f}" if r.confidence is not None else "",
                        *probs, d.kind if d else "", d.text if d else "", csv_cell(printable(r.error or ""))])
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"mpoxscope predict: error: {printable(f'{r.source}: {r.error}')}", file=sys.stderr)
    return 1 if failed else 0


def _refuse_non_finite(r):
    """A prediction whose probabilities are not all finite numbers names no class: it becomes an error."""
    import math

    if r.error is None and not all(math.isfinite(p) for p in r.probabilities.values()):
        return dataclasses.replace(r, label=None, confidence=None, probabilities={},  # decision: uncertain
                                   error="the model gave non-finite probabilities (NaN/inf); no class reported")
    return r


def run_cv(args: argparse.Namespace) -> int:
    from mpoxscope.config import DataConfig
    from mpoxscope.engine.cv import CVConfig, audit_leak_filter, cross_validate
    from mpoxscope.fileio import check_output_dir

    model_cfg, train_cfg = configs_from_args(args)
    check_train_options(model_cfg, train_cfg)
    _check_near_dup_threshold(args.near_dup_threshold, args.exclude_leaks)
    check_output_dir(args.out, "cv")
    data_cfg = DataConfig(root=args.data, split_file=args.split_file, folds=args.folds, groups_csv=args.groups_csv)
    cv = CVConfig(out=args.out, exclude_leaks=args.exclude_leaks,
                  folds=tuple(f"fold{f}" if f.isdigit() else f for f in args.only_folds) if args.only_folds else None)
    leak_filter = audit_leak_filter(args.near_dup_threshold) if args.exclude_leaks else None
    summary = cross_validate(data_cfg, model_cfg, train_cfg, cv, leak_filter=leak_filter, progress=not args.quiet)
    _prepare_output(args.out, "cv")
    s = summary["summary"]
    print(f"[{summary['protocol']}] accuracy {100 * s['accuracy']['mean']:.2f} ± {100 * s['accuracy']['std']:.2f} %, "
          f"macro-F1 {100 * s['f1_macro']['mean']:.2f} ± {100 * s['f1_macro']['std']:.2f} % (mean ± std over folds)")
    pooled = (summary.get("uncertainty") or {}).get("pooled")
    if pooled:
        from mpoxscope.engine.uncertainty import ece_words, fmt_ci

        print(f"[pooled over {pooled['n']} test predictions, 95% CI by patient] accuracy "
              f"{fmt_ci(pooled['ci']['accuracy'])} %, macro-F1 {fmt_ci(pooled['ci']['f1_macro'])} %, "
              f"test ECE {ece_words(pooled['ece'], pooled.get('ece_check'))}, AURC {pooled['aurc']:.3f}")
    if "leak_free" in summary:
        lf = summary["leak_free"]["summary"]
        print(f"[leak-free variant] accuracy {100 * lf['accuracy']['mean']:.2f} ± {100 * lf['accuracy']['std']:.2f} %, "
              f"macro-F1 {100 * lf['f1_macro']['mean']:.2f} ± {100 * lf['f1_macro']['std']:.2f} %")
    sc = summary.get("screening") or {}
    if "sensitivity" in sc:
        from mpoxscope.engine.screening import pct, with_ci

        print(f"[{summary['protocol']}; screening threshold per fold from pooled out-of-fold validation"
              + (f", target met with {sc['confidence']:.0%} confidence" if sc.get("confidence") else "") + "] "
              f"{sc['target_class']} sensitivity {with_ci(sc['sensitivity'])} (target "
              f"{pct(sc['target_sensitivity'])}), specificity {with_ci(sc['specificity'])}, referral rate "
              f"{pct(sc['referral_rate'])}")
    print(f"wrote {args.out}/cv_report.md, cv_summary.json, per_fold.png, confusion_matrix_pooled.png"
          + (", screening.md, screening.json, screening_roc_pr.png" if "sensitivity" in sc else ""))
    return 0


def _check_near_dup_threshold(bits: int | None, exclude_leaks: bool) -> None:
    from mpoxscope.errors import MpoxscopeError

    if bits is None:
        return
    if not exclude_leaks:
        raise MpoxscopeError("--near-dup-threshold sets the leak filter of --exclude-leaks; pass that too")
    if not 0 <= bits <= 64:
        raise MpoxscopeError(f"--near-dup-threshold: must be between 0 and 64 bits (got {bits})")


def run_screen(args: argparse.Namespace) -> int:
    from mpoxscope.engine.screening import pct, screen_cv_output, with_ci
    from mpoxscope.fileio import check_output_dir

    if args.out is not None:  # before the work; the folder must be new, empty or mpoxscope's (marked before writing)
        check_output_dir(args.out, "screen")
    r = screen_cv_output(args.cv_out, target_class=args.screen_class, sensitivity=args.sensitivity, out=args.out,
                         confidence=args.confidence)
    p, target = r["pooled"], r["target_class"]
    print(f"[{r['protocol']}] target {pct(r['target_sensitivity'])} {target} sensitivity: pooled test "
          f"sensitivity {with_ci(p['sensitivity'])}, specificity {with_ci(p['specificity'])}, referral rate "
          f"{pct(p['referral_rate'])} (with uncertain {pct(p['total_referral_rate'])})")
    written = "screening.json, screening.md, screening_roc_pr.png"
    if args.out is None:
        from mpoxscope.engine.screening import refresh_cv_outputs

        if refresh_cv_outputs(args.cv_out, r):
            written += " (and updated cv_summary.json, cv_report.md)"
    print(f"wrote {args.out or args.cv_out}/{written}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from mpoxscope.engine.demo import run_demo as demo
    from mpoxscope.fileio import check_output_dir, mark_output_dir

    check_output_dir(args.out, "demo")
    mark_output_dir(args.out, "demo")
    demo(args.out, images_per_class=args.images_per_class, seed=args.seed)
    return 0


def register(sub) -> None:
    """The engine's commands: each one's parser is built by its own ``_register_<command>``."""
    for add in (_register_train, _register_cv, _register_ensemble, _register_evaluate, _register_predict,
                _register_screen, _register_demo):
        add(sub)


def _register_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on one fold", description=(
        "Train AGFN (or a linear head) on one fold of DATA. Model selection and early stopping use the fold's "
        "validation part only; its test part is never touched. Reruns resume an interrupted run."))
    p.add_argument("data", help="dataset folder (one sub-folder per class, or the MSLD v2.0 layout)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--fold", default="fold1", help="fold name or number (default fold1)")
    add_data_options(p)
    add_model_options(p)
    add_screening_options(p)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds an unfinished run")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: after every input is checked, delete the files mpoxscope wrote in --out "
                        "(nothing else; a folder mpoxscope did not write is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(handler=run_train)


def _register_cv(sub) -> None:
    p = sub.add_parser("cv", help="cross-validate: train and test every fold, report mean ± std", description=(
        "For every fold: train (checkpoint selection on that fold's validation part only), evaluate once on its "
        "test part. Writes cv_report.md, cv_summary.json and plots. Rerunning skips finished folds."))
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per fold)")
    add_data_options(p)
    p.add_argument("--only-folds", nargs="+", metavar="FOLD", help="run only these folds")
    p.add_argument("--exclude-leaks", action="store_true",
                   help="also report the score without test images linked to training images by patient or "
                        "near-duplicate (from the audit)")
    p.add_argument("--near-dup-threshold", type=int, help="perceptual-hash distance for --exclude-leaks")
    add_model_options(p)
    add_screening_options(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run_cv)


def _register_ensemble(sub) -> None:
    p = sub.add_parser("ensemble", help="combine finished runs of one fold into an ensemble run (no retraining)",
                       description=(
        "Copy the model files of finished runs trained on the same fold into OUT/members/ and fit the ensemble's "
        "temperature and screening threshold on that fold's validation part, as 'train --ensemble' does. Members "
        "may read different image sizes (the ensemble reads the largest and resizes for the others). The result "
        "is an ordinary run: evaluate, predict, serve, export, explain and card accept it."))
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished single-model runs (e.g. cv's foldK/run or an "
                                                          "ensemble's members/*)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--data", help="dataset folder (default: the one the runs were trained on)")
    add_data_options(p, recorded=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an ensemble run in --out (only files mpoxscope wrote are deleted)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run_ensemble)


def _register_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained run on a split", description=(
        "Evaluate RUN on a split (default: test) of the fold it was trained on; writes metrics.json, report.md, "
        "confusion_matrix.png and predictions.csv to --out."))
    p.add_argument("run", help="run directory written by 'mpoxscope train'")
    p.add_argument("data", nargs="?", help="dataset folder (default: the one the run was trained on)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--split-file", help="split file (default: the same protocol as training)")
    p.add_argument("--fold", help="fold (default: the run's fold)")
    p.add_argument("--device", default="auto")
    add_runtime_option(p)
    p.add_argument("--onnx", metavar="FILE", help="ONNX file written by 'mpoxscope export --out FILE' (implies "
                                                  "--runtime onnx; default RUN/model.onnx)")
    p.set_defaults(handler=run_evaluate)


def _register_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify images", description=(
        "Print the decision (possible Mpox - refer / uncertain - refer to a clinician / the class), the top "
        "class and every class probability for each image (files or folders). A file that cannot be read gets "
        "an error line; the others still get results; the exit code is 1 if any failed."))
    p.add_argument("run", help="run directory")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--format", choices=["json", "csv"], default="json")
    p.add_argument("--device", default="auto")
    add_runtime_option(p)
    p.add_argument("--onnx", metavar="FILE", help="ONNX file written by 'mpoxscope export --out FILE' (implies "
                                                  "--runtime onnx; default RUN/model.onnx)")
    p.set_defaults(handler=run_predict)


def _register_screen(sub) -> None:
    p = sub.add_parser("screen", help="screening results of a finished cv for a new target (no retraining)",
                       description=(
        "Recompute screening.json, screening.md and screening_roc_pr.png of a cross-validation output from its "
        "prediction files alone (each fold's validation/predictions.csv and evaluation/predictions.csv; no model "
        "is loaded). Each fold's threshold is chosen on the pooled validation predictions of all folds without "
        "that fold's test images, as the largest threshold whose validation sensitivity reaches the target with "
        "the given confidence. Takes a few seconds."))
    p.add_argument("cv_out", metavar="CV_OUT", help="output folder of 'mpoxscope cv'")
    p.add_argument("--sensitivity", type=_sensitivity, default=0.90,
                   help="target sensitivity for the screening class, in (0, 1] (default 0.90)")
    p.add_argument("--screen-class", dest="screen_class", default="Mpox", metavar="CLASS",
                   help="class to catch first (default Mpox)")
    p.add_argument("--confidence", type=_confidence, default=0.95, metavar="C",
                   help="confidence with which the target must be met on validation (one-sided patient-bootstrap "
                        "lower bound; default 0.95); 0: the point estimate")
    p.add_argument("--out", help="where to write (default CV_OUT)")
    p.set_defaults(handler=run_screen)


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on generated SYNTHETIC images (no data, no network)",
                       description=("Generate a small SYNTHETIC six-class image set, train AGFN on it with the "
                                    "offline pretrained backbone, evaluate on held-out synthetic patients and "
                                    "write the report. Takes about a minute or two on a 2-core CPU."))
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--images-per-class", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_demo)
