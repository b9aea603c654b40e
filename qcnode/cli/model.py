"""``qcnode train``, ``qcnode evaluate``, ``qcnode score`` and ``qcnode derive``.

torch and the model code are imported only when a command runs (the CLI imports this module at
start-up).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

EXIT_OK, EXIT_MODEL, EXIT_ARGS = 0, 1, 2


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [_parse_value(t) for t in text.split(",") if t.strip()]
        return text


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``evaluate``, ``score`` and ``derive`` sub-commands."""
    p = subparsers.add_parser(
        "train", help="train an MD-IQA scorer on LDCTIQAC2023-layout data",
        description="Train the MD-IQA network (from scratch, CPU or GPU) on a folder with image/*.tif and a "
                    "{file: score} JSON. Writes the best-validation checkpoint to --out and a resumable "
                    "OUT.state.pt after every epoch. With --unlabeled, teacher checkpoints (given with "
                    "--teachers, or trained first) pseudo-label the unlabeled slices and a student trains on "
                    "labeled + confident pseudo-labeled data.")
    p.add_argument("--data", required=True, type=Path, help="labeled folder (image/*.tif + labels JSON)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (e.g. models/mdiqa-default.pt)")
    p.add_argument("--preset", default="default",
                   help="network preset: default (CPU), wide (default + wide-window input), challenge (wide "
                        "channels over the LDCTIQAC2023 window [-1000, 400] HU; the shipped model) "
                        "or paper (ViT-S + ConvNeXt-T)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a network config field, e.g. --set branches=vit --set head=single "
                        "--set sigmas=0.1,0.25,0.5 --set input_size=160 (repeatable)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1, help="anatomy groups held out for validation")
    p.add_argument("--val-data", type=Path, default=None,
                   help="separate labeled folder for validation (best epoch, interval calibration); all of "
                        "--data then trains and --val-fraction is ignored. Must share no anatomy group with --data")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--max-images", type=int, default=0, help="train on a seeded subset (0 = all)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state.pt if present")
    p.add_argument("--no-calibrate", action="store_true", help="skip the interval temperature fit")
    p.add_argument("--unlabeled", type=Path, help="folder of unlabeled DICOM or tif slices (semi-supervised)")
    p.add_argument("--teachers", type=Path, nargs="+", default=[], help="teacher checkpoints for pseudo-labels")
    p.add_argument("--n-teachers", type=int, default=2,
                   help="with --unlabeled and no --teachers: train this many teachers first (OUT.teacherN.pt)")
    p.add_argument("--pseudo-max-std", type=float, default=0.3, help="max teacher disagreement (score SD)")
    p.add_argument("--pseudo-keep", type=float, default=0.8, help="keep this fraction with the narrowest intervals")
    p.add_argument("--pseudo-weight", type=float, default=1.0, help="loss weight of pseudo-labeled images")
    p.add_argument("--rank-weight", type=float, default=0.0,
                   help="weight of the dose-order ranking loss (needs meta.csv with source_id, dose_fraction, "
                        "views, as `qcnode simulate` writes; 0 = off)")
    p.add_argument("--rank-margin", type=float, default=0.1,
                   help="score points the higher-dose image of a pair must lead by (default 0.1)")
    p.add_argument("--real-weight", type=int, default=1,
                   help="draw images of real (non-phantom) source slices this many times as often as "
                        "phantom images (needs meta.csv source_kind; default 1 = uniform)")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint on labeled data (metrics, baseline, scatter plot)",
        description="PLCC/SROCC/KROCC (raw and their sum), PLCC after the 4-parameter logistic fit, interval "
                    "coverage, per-subgroup numbers, dose monotonicity, and the same for the global-noise-level "
                    "physics baseline. Prints metrics JSON; writes metrics.json, predictions.csv, scatter.png "
                    "into --out. --data is an LDCTIQAC2023-layout folder (image/*.tif + labels JSON), or, with "
                    "--labels, a folder of DICOM scored by a site's own readers.")
    p.add_argument("--data", required=True, type=Path,
                   help="labeled folder (image/*.tif + labels JSON), or DICOM folder with --labels")
    p.add_argument("--labels", type=Path, default=None,
                   help="labels of a DICOM --data folder: CSV (columns file or sop_instance_uid, and score) or "
                        "JSON {file or SOP Instance UID: score}")
    p.add_argument("--convention", default=None,
                   help="how tif values map to HU: auto (default: [0, 1] tifs are the LDCTIQAC2023 window "
                        "[-1000, 400] HU, others HU), ldctiqac, hu, or window:LO,HI; default: the folder's "
                        "convention.json, else auto")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default models/mdiqa-default.pt)")
    p.add_argument("--out", type=Path, default=None, help="folder for metrics.json, predictions.csv, scatter.png")
    p.add_argument("--no-baseline", action="store_true", help="skip the physics baseline")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run_evaluate)

    p = subparsers.add_parser(
        "score", help="score CT DICOM files or folders slice by slice",
        description="Score every axial CT slice (0-4 with a 5-95 % interval), grouped by series. Localizers, "
                    "non-axial images, non-CT objects and files without pixel data are skipped with a reason; "
                    "unreadable files are reported, never fatal. Exit 0 when the run completed, 2 for bad "
                    "arguments, a bad config or an unwritable --out, 1 when the model cannot be loaded or "
                    "the output cannot be written.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders (recursive)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint (default: [model] checkpoint of the config, i.e. models/mdiqa-default.pt)")
    p.add_argument("--config", type=Path, default=None,
                   help="config.toml for the default model, batch size and threads (default: the project's "
                        "config.toml; QCNODE__SECTION__KEY variables apply)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results to this file instead of stdout (checked before scoring)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run_score)

    p = subparsers.add_parser(
        "derive", help="copy a checkpoint with an inference setting changed (no training)",
        description="Write a copy of --model with inference-only settings changed: test_time_views (1, 2, 4 "
                    "or 8 mirrored views of each slice, distributions averaged; 2 = as is + left-right mirror, "
                    "twice the scoring time) or interval_temperature. The weights are untouched; the copy is a "
                    "new model version whose metadata names its source (the training record stays the "
                    "source's). The version hashes the file, and torch stores the file name inside it: "
                    "derive to the final name, or copy the file and use the copy's version.")
    p.add_argument("--model", type=Path, default=None, help="source checkpoint (default models/mdiqa-default.pt)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", required=True,
                   help="e.g. --set test_time_views=2 (repeatable)")
    p.set_defaults(func=run_derive)


def _missing(command: str, *checks: tuple[str, Path | None, Callable[[Path], bool]]) -> str | None:
    """The first "qcnode COMMAND: WHAT not found: PATH" among (what, path or None, test) checks."""
    for what, path, exists in checks:
        if path is not None and not exists(path):
            return f"qcnode {command}: {what} not found: {path}"
    return None


# ----------------------------------------------------------------------------------------- train
def run_train(args: argparse.Namespace) -> int:
    from qcnode.model.network import preset_config
    from qcnode.training.semi import train_semi_supervised
    from qcnode.training.train import TrainOptions, train

    missing = _missing("train", ("data folder", args.data, Path.is_dir),
                       ("validation folder", args.val_data, Path.is_dir),
                       ("unlabeled folder", args.unlabeled, Path.exists))
    if missing:
        _err(missing)
        return EXIT_ARGS
    if args.rank_weight < 0 or args.rank_margin < 0:
        _err(f"qcnode train: --rank-weight and --rank-margin must be >= 0 "
             f"(got {args.rank_weight} and {args.rank_margin})")
        return EXIT_ARGS
    if not 1 <= args.real_weight <= 20:
        _err(f"qcnode train: --real-weight must be 1-20 (got {args.real_weight})")
        return EXIT_ARGS
    missing = [str(t) for t in args.teachers if not t.is_file()]
    if missing:
        _err(f"qcnode train: teacher checkpoint(s) not found: {', '.join(missing)}")
        return EXIT_ARGS
    try:
        cfg = preset_config(args.preset, **_overrides(args.overrides))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        _err(f"qcnode train: bad network configuration: {exc}")
        return EXIT_ARGS
    if cfg.test_time_views != 1:
        _err("qcnode train: test_time_views is an inference setting (validation and the interval fit use one "
             "view); train with 1 and set it afterwards: qcnode derive --set test_time_views=N")
        return EXIT_ARGS
    command = "qcnode " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["train"] else ""
    base = TrainOptions(
        data=str(args.data), out=str(args.out), config=cfg.to_dict(), epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        val_fraction=args.val_fraction, val_data=str(args.val_data) if args.val_data else None,
        threads=args.threads, max_images=args.max_images, resume=args.resume,
        calibrate=not args.no_calibrate, unlabeled=str(args.unlabeled) if args.unlabeled else None,
        teachers=[str(t) for t in args.teachers], pseudo_max_std=args.pseudo_max_std,
        pseudo_keep=args.pseudo_keep, pseudo_weight=args.pseudo_weight, rank_weight=args.rank_weight,
        rank_margin=args.rank_margin, real_weight=args.real_weight, command=command)
    try:
        if args.unlabeled is None:
            train(base)
        else:
            train_semi_supervised(base, args.n_teachers)
    except (FileNotFoundError, ValueError) as exc:
        _err(f"qcnode train: {exc}")
        return EXIT_ARGS
    return EXIT_OK


# -------------------------------------------------------------------------------------- evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    from qcnode.training.evaluate import evaluate
    from qcnode.model.scorer import CheckpointError

    missing = _missing("evaluate", ("data folder", args.data, Path.is_dir),
                       ("labels file", args.labels, Path.is_file))
    if missing:
        _err(missing)
        return EXIT_ARGS
    try:
        result = evaluate(args.model, args.data, args.out, batch_size=args.batch_size,
                          baseline=not args.no_baseline, threads=args.threads, labels_file=args.labels,
                          convention=args.convention)
    except CheckpointError as exc:
        _err(f"qcnode evaluate: {exc}")
        return EXIT_MODEL
    except (FileNotFoundError, ValueError) as exc:
        _err(f"qcnode evaluate: {exc}")
        return EXIT_ARGS
    print(json.dumps(result, indent=2, default=float))
    return EXIT_OK


# ----------------------------------------------------------------------------------------- score
def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written (None when it can): creates its folder, probes the file."""
    if path.is_dir():
        return f"{path} is a folder"
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    if not existed:
        path.unlink()
    return None


def run_score(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        _err(f"qcnode score: path(s) not found: {', '.join(missing)}")
        return EXIT_ARGS
    problem = _unwritable(args.out) if args.out else None
    if problem:
        _err(f"qcnode score: --out {problem}")
        return EXIT_ARGS
    model_path, batch_size, threads = args.model, args.batch_size, args.threads
    if model_path is None or batch_size is None or threads is None:
        from qcnode.config import load_config
        cfg = load_config(args.config)  # a ConfigError ends the command with exit 2 (qcnode.cli.main)
        if model_path is None:
            model_path = cfg.path(cfg.model.checkpoint)
        batch_size = batch_size or cfg.model.batch_size
        threads = cfg.model.threads if threads is None else threads
    from qcnode.model.scorer import CheckpointError, Scorer
    from qcnode.scoring.files import score_paths, to_csv

    try:
        scorer = Scorer.load(model_path, threads=threads or 0)
    except CheckpointError as exc:
        _err(f"qcnode score: {exc}")
        return EXIT_MODEL
    doc = score_paths(scorer, list(args.paths), batch_size=batch_size or 16, progress=_err)
    text = json.dumps(doc, indent=2) + "\n" if args.format == "json" else to_csv(doc)
    if args.format == "csv":
        for e in doc["series"]:
            for s in e["skipped"]:
                _err(f"skipped: {s['path']}: {s['reason']}")
    if not args.out:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        args.out.write_text(text)
    except OSError as exc:
        _err(f"qcnode score: cannot write {args.out}: {exc.strerror or exc}")
        return 1
    return EXIT_OK


# ---------------------------------------------------------------------------------------- derive
def run_derive(args: argparse.Namespace) -> int:
    from qcnode.model.scorer import DEFAULT_CHECKPOINT, CheckpointError, checkpoint_version, derive_checkpoint, file_hash

    source = args.model or DEFAULT_CHECKPOINT
    if args.out.resolve() == Path(source).resolve():
        _err(f"qcnode derive: --out must differ from the source checkpoint ({source})")
        return EXIT_ARGS
    problem = _unwritable(args.out)
    if problem:
        _err(f"qcnode derive: --out {problem}")
        return EXIT_ARGS
    try:
        changes = _overrides(args.overrides)
        derive_checkpoint(source, args.out, changes)
    except CheckpointError as exc:
        _err(f"qcnode derive: {exc}")
        return EXIT_MODEL
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        _err(f"qcnode derive: {exc}")
        return EXIT_ARGS
    except OSError as exc:
        _err(f"qcnode derive: cannot write {args.out}: {exc.strerror or exc}")
        return EXIT_ARGS
    version = checkpoint_version(args.out, file_hash(args.out))
    print(json.dumps({"out": str(args.out), "version": version, "set": changes}))
    return EXIT_OK
