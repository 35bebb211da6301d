"""``mpoxscope export``: write a run as an ONNX file, checked against PyTorch."""

from __future__ import annotations

import argparse


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
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from mpoxscope.export.onnx import export_onnx
    from mpoxscope.fileio import check_output_file

    if args.out:
        check_output_file(args.out, (".onnx",))
    report = export_onnx(args.run, args.out, opset=args.opset, dynamic_batch=not args.static_batch,
                         parity_images=args.parity_images, which=args.which, exporter=args.exporter,
                         tolerance=args.tolerance)
    print(report.summary())
    return 0
