"""``mpoxscope card``: write a run's model card."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "card", help="write a Markdown model card for a run",
        description="Write a model card (model details, data and split, test metrics with their protocol, "
                    "calibration, intended use, limitations, data licence) from RUN/model.json and "
                    "the run's test evaluation (RUN/evaluation/ or RUN/eval/metrics.json, else the newest "
                    "RUN/*/metrics.json of the test split). Fields that were not recorded say so.",
    )
    p.add_argument("run", metavar="RUN", help="run directory (model.json)")
    p.add_argument("--out", metavar="FILE", help="output file (default: RUN/MODEL_CARD.md)")
    p.add_argument("--metrics", metavar="FILE",
                   help="metrics JSON to report (default: the run's test evaluation, found as described above)")
    p.add_argument("--audit", metavar="FILE",
                   help="data-audit JSON whose findings are listed under Limitations")
    p.set_defaults(handler=run_card)


def run_card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpoxscope.card.card import CARD_FILE, write_card
    from mpoxscope.fileio import check_output_file, is_model_card

    # an earlier card may be replaced, any other Markdown file is refused — at RUN/MODEL_CARD.md too
    out = args.out or (Path(args.run) / CARD_FILE if Path(args.run).is_dir() else None)
    if out is not None:
        check_output_file(out, (".md", ".markdown"), ours=is_model_card)
    path = write_card(args.run, args.out, metrics_file=args.metrics, audit_file=args.audit)
    print(f"wrote {path}")
    return 0
