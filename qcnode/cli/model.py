"""``qcnode train``, ``qcnode evaluate`` and ``qcnode score``.

torch and the model code are imported only when a command runs (the CLI imports this module at
start-up).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

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
    """Add the ``train``, ``evaluate`` and ``score`` sub-commands."""
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


# ----------------------------------------------------------------------------------------- train
def run_train(args: argparse.Namespace) -> int:
    from qcnode.model.network import preset_config
    from qcnode.training.train import TrainOptions, train

    if not args.data.is_dir():
        _err(f"qcnode train: data folder not found: {args.data}")
        return EXIT_ARGS
    if args.val_data is not None and not args.val_data.is_dir():
        _err(f"qcnode train: validation folder not found: {args.val_data}")
        return EXIT_ARGS
    if args.unlabeled is not None and not args.unlabeled.exists():
        _err(f"qcnode train: unlabeled folder not found: {args.unlabeled}")
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
            _train_semi(base, args.n_teachers)
    except (FileNotFoundError, ValueError) as exc:
        _err(f"qcnode train: {exc}")
        return EXIT_ARGS
    return EXIT_OK


def _train_semi(opts, n_teachers: int) -> None:
    from dataclasses import replace

    from qcnode.model.network import MDIQAConfig
    from qcnode.training.semi import pseudo_label, pseudo_training_set
    from qcnode.training.train import train

    out = Path(opts.out)
    teachers = list(opts.teachers)
    if not teachers:
        for i in range(1, max(1, n_teachers) + 1):
            t_out = out.with_name(f"{out.name[:-3] if out.name.endswith('.pt') else out.name}.teacher{i}.pt")
            if opts.resume and t_out.is_file() and not t_out.with_name(t_out.name + ".state.pt").is_file():
                _err(f"train: teacher {i} already trained: {t_out}")
            else:
                _err(f"train: training teacher {i}/{n_teachers} -> {t_out}")
                train(replace(opts, out=str(t_out), seed=opts.seed + 1000 * i, unlabeled=None, teachers=[]))
                _cleanup_state(t_out)
            teachers.append(str(t_out))
    pl = pseudo_label(teachers, opts.unlabeled, opts.pseudo_max_std, opts.pseudo_keep)
    cfg = MDIQAConfig.from_dict(opts.config)
    x, y = pseudo_training_set(pl, cfg.input_size, cfg.window_hu)
    info = {"unlabeled": str(opts.unlabeled), "teachers": teachers, **pl.summary(),
            "max_std": opts.pseudo_max_std, "keep": opts.pseudo_keep, "weight": opts.pseudo_weight}
    _err(f"train: training the student on labeled + {len(y)} pseudo-labeled slices -> {out}")
    train(replace(opts, teachers=teachers), extra_x=x, extra_y=y, extra_info=info)


def _cleanup_state(ckpt: Path) -> None:
    state = ckpt.with_name(ckpt.name + ".state.pt")
    if state.is_file():
        state.unlink()


# -------------------------------------------------------------------------------------- evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    from qcnode.training.evaluate import evaluate
    from qcnode.model.scorer import CheckpointError

    if not args.data.is_dir():
        _err(f"qcnode evaluate: data folder not found: {args.data}")
        return EXIT_ARGS
    if args.labels is not None and not args.labels.is_file():
        _err(f"qcnode evaluate: labels file not found: {args.labels}")
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
def _iter_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            files.append(p)
    return files


def _series_summary(scores: list[float], n_skipped: int) -> dict[str, Any]:
    import numpy as np

    s = np.asarray(scores, dtype=float)
    out: dict[str, Any] = {"n_slices": int(s.size), "n_skipped": int(n_skipped)}
    if s.size:
        out.update({"mean": round(float(s.mean()), 4), "std": round(float(s.std()), 4),
                    "min": round(float(s.min()), 4), "p10": round(float(np.percentile(s, 10)), 4),
                    "median": round(float(np.median(s)), 4), "max": round(float(s.max()), 4)})
    return out


def score_paths(scorer, paths: list[Path], batch_size: int = 16, progress=_err) -> dict[str, Any]:
    """Score DICOM files/folders; returns the ``qcnode score`` JSON document."""
    from qcnode.dicom.pixels import SkipSlice, UnreadableFile, iter_slices, read_dataset

    files = _iter_files(paths)
    series: dict[str | None, dict[str, Any]] = {}
    pending: list[tuple[dict[str, Any], Any]] = []  # (slice record, hu)

    def entry(uid: str | None) -> dict[str, Any]:
        if uid not in series:
            series[uid] = {"series_instance_uid": uid, "slices": [], "skipped": []}
        return series[uid]

    def flush() -> None:
        if not pending:
            return
        results = scorer.score_hu([hu for _, hu in pending], batch_size=batch_size)
        for (rec, _), q in zip(pending, results):
            rec.update(score=round(q.score, 4), score_low=round(q.score_low, 4), score_high=round(q.score_high, 4))
        pending.clear()

    t0 = time.time()
    n_slices = 0
    for i, f in enumerate(files):
        uid = None
        try:
            ds = read_dataset(f)
            uid = str(ds.get("SeriesInstanceUID", "")) or None
            for s in iter_slices(ds, str(f)):
                rec = {"path": str(f), "sop_instance_uid": s.sop_instance_uid, "instance_number": s.instance_number}
                if s.frame is not None:
                    rec["frame"] = s.frame
                entry(s.series_instance_uid)["slices"].append(rec)
                pending.append((rec, s.hu))
                n_slices += 1
                if len(pending) >= batch_size:
                    flush()
        except SkipSlice as exc:
            entry(uid)["skipped"].append({"path": str(f), "reason": exc.reason})
        except UnreadableFile as exc:
            entry(uid)["skipped"].append({"path": str(f), "reason": f"unreadable: {exc}"})
        except Exception as exc:  # noqa: BLE001 - one bad file never ends the run
            entry(uid)["skipped"].append({"path": str(f), "reason": f"error: {type(exc).__name__}: {exc}"})
        if (i + 1) % 100 == 0:
            progress(f"score: {i + 1}/{len(files)} files, {n_slices} slices, {time.time() - t0:.1f} s")
    flush()
    out_series = []
    for uid, e in series.items():
        e["slices"] = [r for r in e["slices"] if "score" in r]
        e["slices"].sort(key=lambda r: (r["instance_number"] is None, r["instance_number"] or 0, r.get("frame") or 0,
                                        r["path"]))
        e["summary"] = _series_summary([r["score"] for r in e["slices"]], len(e["skipped"]))
        out_series.append(e)
    out_series.sort(key=lambda e: (e["series_instance_uid"] is None, e["series_instance_uid"] or ""))
    return {"model": scorer.info, "series": out_series,
            "totals": {"files": len(files), "slices": sum(len(e["slices"]) for e in out_series),
                       "skipped": sum(len(e["skipped"]) for e in out_series),
                       "seconds": round(time.time() - t0, 2)}}


def _to_csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["series_instance_uid", "path", "sop_instance_uid", "instance_number", "frame",
                "score", "score_low", "score_high", "model_version"])
    version = doc["model"].get("version", "")
    for e in doc["series"]:
        for r in e["slices"]:
            w.writerow([e["series_instance_uid"], r["path"], r["sop_instance_uid"],
                        "" if r["instance_number"] is None else r["instance_number"], r.get("frame", ""),
                        r["score"], r["score_low"], r["score_high"], version])
    return buf.getvalue()


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

    try:
        scorer = Scorer.load(model_path, threads=threads or 0)
    except CheckpointError as exc:
        _err(f"qcnode score: {exc}")
        return EXIT_MODEL
    doc = score_paths(scorer, list(args.paths), batch_size=batch_size or 16)
    text = json.dumps(doc, indent=2) + "\n" if args.format == "json" else _to_csv(doc)
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
