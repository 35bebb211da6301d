"""``mpoxscope audit``: dataset and split audit (duplicates, near duplicates, patient and duplicate leaks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpoxscope.audit.config import DEFAULT_MIN_CORRELATION, DEFAULT_THRESHOLD

DESCRIPTION = """Audit an image dataset and its train/validation/test split. Writes DIR/audit.json, audit.md and
audit.html (thumbnails of suspicious pairs, embedded). Reports images and patients per class, image sizes and
modes, unreadable files, exact duplicates (same bytes or same decoded pixels), near duplicates (re-encoded,
resized, cropped, flipped or recoloured copies: pHash over flip/crop variants, confirmed by an aligned
fine-detail correlation), and for every fold of the split file each patient and each duplicate pair that crosses
train / validation / test. With --strict the exit code is 1 when any leak is found."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="audit a dataset and its split: duplicates and leaks",
                              description=DESCRIPTION)
    p.add_argument("data", metavar="DATA", help="dataset folder (one sub-folder per class, or images/<class>/)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for audit.json/.md/.html")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--split-file", metavar="F",
                       help="split file (CSV fold,split,filename or MSLD datalog.xlsx); default: the folds.csv / "
                            "datalog.xlsx found in DATA, else the MSLD FOLDS folders")
    split.add_argument("--no-split", action="store_true", help="skip the leak check")
    p.add_argument("--groups-csv", metavar="CSV",
                   help="filename,group CSV giving each image's patient (default: from MSLD-style file names)")
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, metavar="N",
                   help=f"near-duplicate candidates up to N bits of 64 pHash distance (default {DEFAULT_THRESHOLD};"
                        " higher finds harder edits and costs time)")
    p.add_argument("--min-correlation", type=float, default=DEFAULT_MIN_CORRELATION, metavar="C",
                   help=f"aligned fine-detail correlation a candidate needs (default {DEFAULT_MIN_CORRELATION})")
    p.add_argument("--html-pairs", type=int, default=200, metavar="N", help="most pairs drawn in audit.html")
    p.add_argument("--strict", action="store_true", help="exit with code 1 when a leak is found")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mpoxscope.audit.config import AuditConfig
    from mpoxscope.audit.render import write_audit
    from mpoxscope.audit.report import audit_dataset
    from mpoxscope.data.samples import load_samples
    from mpoxscope.data.splits import find_split_file, read_split_file
    from mpoxscope.fileio import check_output_dir, mark_output_dir

    check_output_dir(args.out, "audit")  # before minutes of hashing
    config = AuditConfig(threshold=args.threshold, min_correlation=args.min_correlation,
                         html_pairs=args.html_pairs)
    data = load_samples(args.data, args.groups_csv)
    table, source = None, None
    if args.split_file:
        table, source = read_split_file(args.split_file), str(args.split_file)
    elif not args.no_split:
        found = find_split_file(args.data)
        if found is not None:
            table, source = read_split_file(found), str(found)
        elif data.folder_splits is not None:
            table, source = data.folder_splits, f"FOLDS folders in {args.data}"
    report = audit_dataset(data, table, config, source)
    mark_output_dir(args.out, "audit")  # before its files: an interrupted write can be redone into the folder
    paths = write_audit(report, args.out)

    s = report.summary()
    print(f"audit: {args.data} ({s['images']} images, {s['patients']} patients, {s['classes']} classes, "
          f"{s['unreadable']} unreadable)")
    print(f"split file: {source} ({len(report.folds)} folds)" if source else "split file: none (no leak check)")
    print(f"duplicate pairs: {s['identical_file_pairs']} identical file, {s['identical_pixel_pairs']} identical "
          f"pixels, {s['near_duplicate_pairs']} near (pHash <= {config.threshold} bits, correlation >= "
          f"{config.min_correlation}); {s['pairs_across_patients']} pairs across patient IDs")
    for f in report.folds:
        print(f"  {f.fold} ({f.sizes['train']}/{f.sizes['validation']}/{f.sizes['test']}): "
              f"{len(f.patient_leaks)} patient leaks, {len(f.duplicate_leaks)} duplicate leaks "
              f"({len(f.cross_patient_duplicate_leaks)} across patients), {len(f.leaked_test)} leaked test images")
    out = Path(args.out)
    print(f"wrote {out / paths['json'].name}, {paths['markdown'].name}, {paths['html'].name} "
          f"(audit took {report.seconds:.1f} s)")
    if args.strict and report.has_leaks:
        print("mpoxscope audit: leaks found (--strict)", file=sys.stderr)
        return 1
    return 0
