"""``mpoxscope explain``: heat maps, panels, a gallery and (on request) a faithfulness table for a run."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from mpoxscope.registry import METHODS, ListedHelp

#: Defaults of the options only --faithfulness reads: any other value without it is refused, not ignored.
_FAITHFULNESS_DEFAULTS = {"faithfulness_images": 20, "road_percentiles": "20,40,60,80", "randomize": "head",
                          "rho_threshold": 0.5}

EPILOG = """examples:
  mpoxscope explain runs/fold1 photo.jpg --out explain/ --method gradcam,scorecam
  mpoxscope explain runs/fold1 test_images/ --out explain/ --method all --faithfulness --threads 1
  mpoxscope explain runs/fold1 a.jpg --out ex/ --target-class Measles --target-layer backbone.blocks.5

outputs (per image, in OUT/<name>/): panel.png (original | methods | attention, titled with the calibrated
prediction), <method>.png (overlay with colour bar), <method>.npy (map, S x S, [0, 1]),
attention_grid.npy (heads x H x W raw attention, each head sums to 1); OUT/index.html (gallery by class and
confidence) and OUT/summary.json; with --faithfulness, OUT/faithfulness.md and .json."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="heat maps (Grad-CAM family, AGFN attention), gallery, faithfulness table",
        description="Explain a trained run's predictions on images or folders of images.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (model.json + weights)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders (recursive)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default="gradcam",
                   help=ListedHelp("comma-separated: {names}, or 'all' (every method but the slow ones, e.g. "
                                   "scorecam; 'all,scorecam' adds it) (default: gradcam; an AGFN head's attention "
                                   "is always added to the panel unless --no-attention)", METHODS))
    p.add_argument("--target-class", default=None,
                   help="class to explain, by name (default: the predicted one)")
    p.add_argument("--target-layer", default=None,
                   help="module name for CAMs, e.g. backbone.blocks.5 or backbone.layer3 "
                        "(default: the last backbone stage)")
    p.add_argument("--per-head", dest="per_head", action="store_true",
                   help="also save one overlay per part of a method that has parts (attention: per head)")
    p.add_argument("--heads", dest="per_head", action=_OldPerHead, help=argparse.SUPPRESS)
    p.add_argument("--no-attention", action="store_true", help="do not add the attention map to the panel")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint (default best)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    f = p.add_argument_group("faithfulness")
    f.add_argument("--faithfulness", action="store_true",
                   help="score each chosen method (ROAD + randomisation sanity check, with timing)")
    f.add_argument("--faithfulness-images", type=int, default=_FAITHFULNESS_DEFAULTS["faithfulness_images"],
                   help="score on the first N explained images (0 = all; default 20)")
    f.add_argument("--road-percentiles", default=_FAITHFULNESS_DEFAULTS["road_percentiles"],
                   help="ROAD removal percentiles (default 20,40,60,80)")
    f.add_argument("--randomize", default=_FAITHFULNESS_DEFAULTS["randomize"], choices=("head", "head+stage"),
                   help="what the sanity check re-initialises (default head)")
    f.add_argument("--rho-threshold", type=float, default=_FAITHFULNESS_DEFAULTS["rho_threshold"],
                   help="sanity check passes when mean Spearman rho is below this (default 0.5)")
    p.set_defaults(handler=run)


class _OldPerHead(argparse._StoreTrueAction):
    """``--heads``, the old name of ``--per-head`` (kept for one release): ``--heads`` now means only the
    number of attention heads, in train and cv (``--num-heads``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print("note: explain --heads is deprecated; use --per-head", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def _percentiles(text: str) -> tuple[int, ...]:
    from mpoxscope.errors import MpoxscopeError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MpoxscopeError(f"--road-percentiles: expected integers like 20,40,60,80: {text!r}") from None
    if not values or not all(0 < v < 100 for v in values):
        raise MpoxscopeError(f"--road-percentiles: values must be between 1 and 99, got {text!r}")
    return values


def _slug(method: str) -> str:
    return method.replace("+", "p")


def _safe_stem(path: Path, limit: int = 80) -> str:
    """``path``'s stem as a plain folder name: no separators, no leading dots (``..`` cannot climb out of
    ``--out``), no characters a file system or a URL would choke on, not too long."""
    from mpoxscope.fileio import safe_name

    return safe_name(path.stem, "image", limit)


def _unique_key(path: Path, used: set[str]) -> str:
    """A folder name under ``--out`` for ``path``, distinct from every earlier one even on a case-insensitive
    file system (``a/x.jpg`` and ``b/X.jpg`` -> ``x`` and ``X-2``)."""
    base = _safe_stem(path)
    key, n = base, 2
    while key.casefold() in used:
        key, n = f"{base}-{n}", n + 1
    used.add(key.casefold())
    return key


@dataclass
class _Done:
    """An explained image, for the faithfulness pass: its maps are re-read from ``OUT/<key>/<method>.npy``."""

    path: Path
    key: str
    target: int
    seconds: dict[str, float]


def run(args: argparse.Namespace) -> int:
    from mpoxscope.engine.predict import Predictor, expand_inputs
    from mpoxscope.explain.methods import parse_methods
    from mpoxscope.explain.pipeline import panel_methods, resolve_class
    from mpoxscope.fileio import check_output_dir, mark_output_dir

    _check_numbers(args)
    percentiles = _percentiles(args.road_percentiles) if args.faithfulness else ()
    out = check_output_dir(args.out, "explain")
    chosen = parse_methods(args.method)
    paths = expand_inputs(args.inputs, keep_empty=True)  # an empty folder is one failed entry, not the end
    predictor = Predictor.from_run(args.run, args.device, which=args.which)
    methods = panel_methods(chosen, predictor.explain_model, with_attention=not args.no_attention)
    if args.target_class is not None:
        resolve_class(args.target_class, predictor.classes)  # fail before any work
    if args.target_layer:
        from mpoxscope.explain.methods import resolve_target_layer

        resolve_target_layer(predictor.explain_model, args.target_layer)  # before --out is made
    _note_slow_left_out(args.method, chosen)
    mark_output_dir(out, "explain")
    entries, done, failed = _explain_all(args, predictor, paths, methods, out)
    _write_index(args, predictor, entries, methods, out, len(done), failed)
    if args.faithfulness and done:
        _faithfulness(args, predictor, done, methods, percentiles, out)
    return 1 if failed else 0


def _check_numbers(args: argparse.Namespace) -> None:
    from mpoxscope.errors import MpoxscopeError

    if args.batch_size < 1:
        raise MpoxscopeError("--batch-size: must be at least 1")
    changed = [k for k, v in _FAITHFULNESS_DEFAULTS.items() if getattr(args, k) != v]
    if changed and not args.faithfulness:  # never silently ignored
        raise MpoxscopeError(f"--{changed[0].replace('_', '-')}: needs --faithfulness")
    if args.faithfulness_images < 0:
        raise MpoxscopeError(f"--faithfulness-images: must be 0 (all) or more, got {args.faithfulness_images}")
    if not math.isfinite(args.rho_threshold) or not -1 <= args.rho_threshold <= 1:
        raise MpoxscopeError(f"--rho-threshold: a Spearman correlation, from -1 to 1; got {args.rho_threshold}")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise MpoxscopeError("--threads: must be at least 1")
        torch.set_num_threads(args.threads)


def _note_slow_left_out(method_text: str, chosen: list[str]) -> None:
    from mpoxscope.explain.methods import slow_methods

    left_out = [m for m in slow_methods() if m not in chosen]
    if "all" in [m.strip().lower() for m in method_text.split(",")] and left_out:
        print(f"note: --method all leaves out {', '.join(left_out)} (minutes per image on a CPU); "
              f"name it to include it: --method all,{','.join(left_out)}", file=sys.stderr)


def _explain_all(args: argparse.Namespace, predictor, paths: list[Path], methods: list[str], out: Path):
    """Explain every readable image, a batch at a time, writing its outputs; (gallery entries, done, failed)."""
    from mpoxscope.engine.predict import load_input
    from mpoxscope.errors import ImageError
    from mpoxscope.explain.gallery import GalleryEntry
    from mpoxscope.explain.pipeline import explain_images
    from mpoxscope.fileio import printable

    entries: list[GalleryEntry] = []
    done: list[_Done] = []
    from mpoxscope.fileio import OUTPUT_PATTERNS

    # The gallery's own files are taken: an image called index.html.jpg must not become a folder index.html/.
    used: set[str] = {name.casefold() for name in OUTPUT_PATTERNS["explain"]}
    pending: list[tuple[Path, object]] = []

    def flush() -> None:
        results = explain_images(predictor, [img for _, img in pending], methods, args.target_class,
                                 target_layer=args.target_layer, batch_size=args.batch_size)
        for (path, _), ex in zip(pending, results, strict=True):
            key = _unique_key(path, used)
            entries.append(_write_outputs(ex, path, key, out, predictor, args.per_head))
            done.append(_Done(path, key, predictor.classes.index(ex.target), ex.seconds))
            print(f"{printable(path)}: {ex.label} {ex.confidence:.3f} -> {out / key / 'panel.png'}")
        pending.clear()

    failed = 0
    for path in paths:
        try:
            pending.append((path, load_input(path)))
        except ImageError as e:
            failed += 1
            entries.append(GalleryEntry(printable(path), error=printable(e.reason)))
            print(f"mpoxscope explain: error: {printable(f'{path}: {e.reason}')}", file=sys.stderr)
        if len(pending) >= args.batch_size:
            flush()
    if pending:
        flush()
    return entries, done, failed


def _write_index(args: argparse.Namespace, predictor, entries, methods: list[str], out: Path, n_done: int,
                 failed: int) -> None:
    from mpoxscope.explain.gallery import write_gallery

    note = (f"run {args.run} ({predictor.meta.get('note', '') or 'trained run'}); "
            f"methods: {', '.join(methods)}; probabilities calibrated with temperature "
            f"{predictor.temperature:g}; maps are min-max scaled per image")
    gallery = write_gallery(out, entries, f"mpoxscope explanations: {Path(args.run).name}", predictor.classes,
                            note, extra={"run": str(args.run), "methods": methods,
                                         "temperature": predictor.temperature, "classes": predictor.classes})
    print(f"gallery: {gallery} ({n_done} explained, {failed} failed)")


def _write_outputs(ex, path: Path, key: str, out: Path, predictor, heads: bool):
    """Overlays, .npy maps and the panel of one :class:`Explanation` into ``out/key``; its gallery entry."""
    import numpy as np
    import torch

    from mpoxscope.explain.attention import upsample_grid
    from mpoxscope.explain.gallery import GalleryEntry
    from mpoxscope.explain.render import save_overlay_png, save_panel_png
    from mpoxscope.fileio import printable

    folder = out / key
    shown = printable(path.name)  # titles and the gallery: a name that is not UTF-8 must not crash either
    folder.mkdir(parents=True, exist_ok=True)
    entry = GalleryEntry(printable(path), ex.label, ex.confidence, ex.target,
                         dict(zip(predictor.classes, map(float, ex.probabilities), strict=True)),
                         panel=f"{key}/panel.png")
    folder_names = {c.lower(): c for c in predictor.classes}
    entry.folder_label = folder_names.get(path.parent.name.lower())
    for name, cam in ex.maps.items():
        title = f"{shown}: {METHODS.get(name).title or f'{name} for {ex.target}'}"
        save_overlay_png(ex.image, cam, folder / f"{_slug(name)}.png", title)
        np.save(folder / f"{_slug(name)}.npy", cam.astype(np.float32))
        entry.files[name] = f"{key}/{_slug(name)}.png"
        entry.files[f"{name}.npy"] = f"{key}/{_slug(name)}.npy"
    for name, grid in ex.parts.items():  # e.g. attention_grid.npy: heads x H x W, each head sums to 1
        slug = _slug(name)
        np.save(folder / f"{slug}_grid.npy", grid.astype(np.float32))
        entry.files[f"{slug}_grid.npy"] = f"{key}/{slug}_grid.npy"
        if heads:
            size = (predictor.image_size, predictor.image_size)
            for h, cam in enumerate(upsample_grid(torch.from_numpy(grid), size)):
                save_overlay_png(ex.image, cam, folder / f"{slug}_head{h}.png", f"{shown}: head {h}")
                entry.files[f"{slug}_head{h}"] = f"{key}/{slug}_head{h}.png"
    title = f"{shown}: predicted {ex.label} ({ex.confidence:.1%})"
    if ex.target != ex.label:
        title += f"; maps explain {ex.target}"
    save_panel_png(ex.image, ex.maps, folder / "panel.png", title)
    return entry


def _faithfulness(args, predictor, done: list[_Done], methods: list[str], percentiles: tuple[int, ...],
                  out: Path) -> None:
    import numpy as np
    import torch

    from mpoxscope.data.images import load_image
    from mpoxscope.explain.faithfulness import FaithfulnessConfig, evaluate_faithfulness

    chosen = done if args.faithfulness_images <= 0 else done[:args.faithfulness_images]
    batch = predictor.preprocess([load_image(d.path) for d in chosen])
    # the gallery pass already made (and timed) these maps: score them instead of recomputing
    precomputed = {m: (np.stack([np.load(out / d.key / f"{_slug(m)}.npy") for d in chosen]),
                       float(np.mean([d.seconds[m] for d in chosen]))) for m in methods}
    cfg = FaithfulnessConfig(methods=tuple(methods), percentiles=percentiles, randomize=args.randomize,
                             rho_threshold=args.rho_threshold, batch_size=args.batch_size,
                             target_layer=args.target_layer, temperature=predictor.temperature)
    print(f"faithfulness: {len(chosen)} images, methods {', '.join(methods)} (+ random baseline), "
          f"{torch.get_num_threads()} thread(s)")
    report = evaluate_faithfulness(predictor.explain_model, batch, cfg, [d.target for d in chosen],
                                   progress=lambda m: print(f"  scoring {m} ...", flush=True),
                                   precomputed=precomputed)
    md, js = report.write(out)
    print(report.to_markdown())
    print(f"faithfulness: {md}, {js}")
