"""``mpoxscope export``: write a run as an ONNX file, checked against PyTorch."""

from __future__ import annotations

import argparse

#: Defaults of the options only --quantize reads: any other value without --quantize is refused, not ignored.
_QUANTIZE_DEFAULTS = {"min_agreement": 0.99, "fallback_margin": "auto", "float_first": 3,
                      "calibration_method": "minmax", "calibration_count": 96, "no_bias_correction": False}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained run to ONNX (checked against PyTorch)",
        description="Export RUN's model to ONNX: input 'image' (N,3,S,S) normalised float32, output "
                    "'logits' (N,K); temperature is applied at run time from model.json. The graph is "
                    "validated with onnx.checker and ONNX Runtime is compared with PyTorch on real images "
                    "(8 images of the run's training data, or of MSLD v2.0, else synthetic ones); nothing is "
                    "written if they differ.",
    )
    p.add_argument("run", metavar="RUN", help="run directory (model.json + best.safetensors)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", metavar="FILE", help="output file (default: RUN/model.onnx)")
    p.add_argument("--parity-images", nargs="+", metavar="IMG_OR_DIR",
                   help="images or folders to compare PyTorch and ONNX Runtime on (default: 8 images of the "
                        "data recorded in model.json, else of MSLD v2.0, else synthetic ones)")
    p.add_argument("--which", choices=["best", "last"], default="best",
                   help="weights to export (default: best)")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (default: 17; the dynamo exporter uses >= 18)")
    p.add_argument("--exporter", choices=["auto", "classic", "dynamo"], default="auto",
                   help="torch exporter: classic (TorchScript), dynamo, or auto = classic, then dynamo if "
                        "that fails (default)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to 1 instead of dynamic")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed probability difference between PyTorch and ONNX (default: 1e-4)")
    p.add_argument("--quantize", choices=["int8"],
                   help="also write an int8 model (ONNX Runtime static quantisation, QDQ, per-channel weights) "
                        "to --out (default RUN/model.int8.onnx), calibrated on the run's training images "
                        "(generated ones when its data is absent) and checked for top-1 agreement with fp32 "
                        "PyTorch on its validation images; the fp32 RUN/model.onnx is written as well")
    p.add_argument("--calibration-images", nargs="+", metavar="IMG_OR_DIR",
                   help="with --quantize: images or folders to calibrate on instead of the run's training images")
    p.add_argument("--calibration-count", type=int, default=_QUANTIZE_DEFAULTS["calibration_count"], metavar="N",
                   help="with --quantize: training images used for calibration (default 96)")
    p.add_argument("--check-images", nargs="+", metavar="IMG_OR_DIR",
                   help="with --quantize: images to measure agreement on instead of the run's validation split")
    p.add_argument("--calibration-method", choices=["minmax", "percentile"], default="minmax",
                   help="with --quantize: activation ranges from min/max (default) or the 99.999th percentile")
    p.add_argument("--pixel-input", action="store_true",
                   help="the file takes raw RGB pixels, input 'pixels' (N,S,S,3) uint8, and normalises inside "
                        "the graph: the client only decodes and resizes (fastest end to end; predict/serve/"
                        "evaluate --onnx and LiteOnnxPredictor read it). Alone: fp32, --out default "
                        "RUN/model.pixels.onnx; with --quantize: the int8 file")
    p.add_argument("--float-first", type=int, default=_QUANTIZE_DEFAULTS["float_first"], metavar="N",
                   help="with --quantize: keep the first N convolutions float (default 3: the stem and first "
                        "block, where int8 rounding cost the most agreement)")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="with --quantize: do not fold the mean int8 weight-rounding error into the biases")
    p.add_argument("--fallback-margin", default=_QUANTIZE_DEFAULTS["fallback_margin"], metavar="auto|off|GAP",
                   help="with --quantize: photos whose int8 top-2 logit gap is below this margin are recomputed "
                        "by the fp32 graph, written beside the int8 file as <out>.fallback.onnx (default auto: "
                        "1.25 x the largest int8 logit error on training images calibration did not use; off: "
                        "plain int8)")
    p.add_argument("--min-agreement", type=float, default=_QUANTIZE_DEFAULTS["min_agreement"], metavar="F",
                   help="with --quantize: least top-1 agreement with fp32 PyTorch to write the file (default 0.99)")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from mpoxscope.errors import MpoxscopeError
    from mpoxscope.export.onnx import export_onnx, is_mpoxscope_onnx
    from mpoxscope.fileio import check_output_file

    # an earlier export may be replaced, any other file is refused — at the default paths in RUN too
    for target in _targets(args):
        check_output_file(target, (".onnx",), ours=is_mpoxscope_onnx)
    if args.quantize is None and (args.calibration_images or args.check_images):
        raise MpoxscopeError("--calibration-images/--check-images: need --quantize int8")
    changed = [k for k, v in _QUANTIZE_DEFAULTS.items() if getattr(args, k) != v]
    if args.quantize is None and changed:  # never silently ignored
        raise MpoxscopeError(f"--{changed[0].replace('_', '-')}: needs --quantize int8")
    _check_export_numbers(args)
    if args.quantize:  # before the fp32 export and its parity check, not after them
        from mpoxscope.export.quantize import check_quantize_options

        check_quantize_options(_targets(args)[-1], args.min_agreement, args.fallback_margin)
    if args.float_first < 0:
        raise MpoxscopeError(f"--float-first: must be at least 0, got {args.float_first}")
    if args.calibration_count < 1:
        raise MpoxscopeError(f"--calibration-count: must be at least 1, got {args.calibration_count}")
    # With --quantize or --pixel-input, --out names that file; RUN/model.onnx is the checked fp32 export.
    fp32_out = None if args.quantize or args.pixel_input else args.out
    report = export_onnx(args.run, fp32_out, opset=args.opset, dynamic_batch=not args.static_batch,
                         parity_images=args.parity_images, which=args.which, exporter=args.exporter,
                         tolerance=args.tolerance)
    print(report.summary())
    if args.pixel_input and args.quantize is None:
        from pathlib import Path

        from mpoxscope.export.lite import write_pixel_copy

        target = Path(args.out) if args.out else Path(args.run) / "model.pixels.onnx"
        print(f"fp32 with uint8 pixel input written to {write_pixel_copy(report.onnx_file, target)} "
              "(same probabilities within 1e-4)")
    if args.quantize == "int8":
        from mpoxscope.export.quantize import quantize_int8

        quant = quantize_int8(args.run, report.onnx_file, args.out, calibration=args.calibration_images,
                              calibration_count=args.calibration_count, check=args.check_images,
                              min_agreement=args.min_agreement, which=args.which,
                              method=args.calibration_method, float_first=args.float_first,
                              bias_correction=not args.no_bias_correction, pixel_input=args.pixel_input,
                              fallback=args.fallback_margin)
        print(quant.summary())
    return 0


def _targets(args: argparse.Namespace) -> list:
    """Every file this export will write: the fp32 RUN/model.onnx (or --out), and with --pixel-input or
    --quantize the file they name (default RUN/model.pixels.onnx / RUN/model.int8.onnx)."""
    from pathlib import Path

    from mpoxscope.engine import rundir

    run = Path(args.run)
    if not (args.quantize or args.pixel_input):
        return [Path(args.out) if args.out else run / rundir.ONNX]
    targets = [run / rundir.ONNX]
    if args.quantize:  # its fallback companion is checked by check_quantize_options
        return [*targets, Path(args.out) if args.out else run / rundir.INT8]
    return [*targets, Path(args.out) if args.out else run / "model.pixels.onnx"]


def _check_export_numbers(args: argparse.Namespace) -> None:
    """--opset, --tolerance: refused before the export (they failed, or were ignored, only after it)."""
    import math

    import onnx

    from mpoxscope.errors import MpoxscopeError

    highest = onnx.defs.onnx_opset_version()
    if not 7 <= args.opset <= highest:
        raise MpoxscopeError(f"--opset: must be from 7 to {highest} (this onnx's newest), got {args.opset}")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise MpoxscopeError(f"--tolerance: must be a finite number of at least 0, got {args.tolerance}")
