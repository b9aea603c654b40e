"""``qcnode validate``: the scorer against real patients' CT (``qcnode.training.realval``).

torch is imported only when the command runs (the CLI imports this module at start-up).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qcnode.cli.simulate import DEFAULT_CLINICAL, DEFAULT_SPLIT_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` sub-command."""
    p = subparsers.add_parser(
        "validate", help="check a scorer on real patients' CT (routine series PASS, kernel and dose order)",
        description="Scores every slice of the held-out (validation) patients' real series and reports: (a) "
                    "whether every routine smooth/standard-kernel series PASSes under the config's verdict "
                    "rules, (b) smooth above sharp for each kernel pair, and with --sim (a folder made by "
                    "qcnode simulate from those patients) (c) dose order slice by slice and (d) the usual sums "
                    "with the physics baseline. Prints JSON; exit 0 when it ran (the checks are reported, not "
                    "enforced), 2 for bad arguments.")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default models/mdiqa-default.pt)")
    p.add_argument("--clinical", type=Path, nargs="+", default=[DEFAULT_CLINICAL],
                   help="folders of real clinical CT (default ../shared/data/clinical_ct)")
    p.add_argument("--split", type=Path, default=DEFAULT_SPLIT_FILE,
                   help="split file: validation patients, non-routine series, kernel pairs "
                        "(default models/clinical_split.json)")
    p.add_argument("--patients", choices=("validation", "training", "all"), default="validation",
                   help="whose series to score (default validation)")
    p.add_argument("--sim", type=Path, default=None,
                   help="simulated folder of the validation patients (e.g. OUT/val of qcnode simulate)")
    p.add_argument("--config", type=Path, default=None, help="config.toml for the verdict rules (default: the "
                                                             "project's)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.set_defaults(func=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    missing = [str(p) for p in [*args.clinical, args.split, *([args.sim] if args.sim else [])] if not p.exists()]
    if missing:
        print(f"qcnode validate: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    from qcnode.config import load_config
    from qcnode.training.realval import validate
    from qcnode.model.scorer import CheckpointError

    cfg = load_config(args.config)  # a ConfigError ends the command with exit 2 (qcnode.cli.main)
    try:
        result = validate(args.model, args.clinical, args.split, args.sim, cfg.verdict, args.patients)
    except CheckpointError as exc:
        print(f"qcnode validate: {exc}", file=sys.stderr)
        return 1
    except (ValueError, KeyError) as exc:
        print(f"qcnode validate: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0
