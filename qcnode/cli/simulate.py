"""``qcnode simulate``: low-dose CT training data with synthetic reader labels (LDCTIQAC2023 layout).

torch is imported only when the command runs (the CLI imports this module at start-up).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SHARED_CT = PROJECT_ROOT.parent / "shared" / "data" / "ct"
DEFAULT_CLINICAL = PROJECT_ROOT.parent / "shared" / "data" / "clinical_ct"
DEFAULT_SPLIT_FILE = PROJECT_ROOT / "models" / "clinical_split.json"
TEST_SERIES = ("philips_head_phantom",)  # whole series held out for the test split


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    p = subparsers.add_parser(
        "simulate", help="simulate low-dose CT training data with synthetic reader labels",
        description="Insert projection-domain Poisson noise (dose fractions) and reduce views (streaks) in "
                    "normal-dose slices and procedural phantoms, reconstruct by FBP, label with a synthetic "
                    "5-reader model; writes OUT/{train,test,unlabeled}/image/*.tif + labels JSON + meta.csv.")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--size", type=int, default=256, help="output matrix (default 256; 512 sources are 2x2 averaged)")
    p.add_argument("--doses", type=_floats, default=[1.0, 0.75, 0.5, 0.25],
                   help="dose fractions, comma-separated (default 1,0.75,0.5,0.25: the LDCTIQAC2023 recipe)")
    p.add_argument("--views", type=_ints, default=[720, 256, 128, 64],
                   help="view counts per rotation, at most 720 (default 720,256,128,64: full views and the "
                        "LDCTIQAC2023 recipe's sparse views)")
    p.add_argument("--geometry", choices=("fan", "parallel"), default="fan",
                   help="projector: fan-beam over 360 degrees with a SOMATOM-like geometry (default), or "
                        "parallel-beam over 180 degrees (the data sets made before)")
    p.add_argument("--clinical", type=Path, nargs="*", default=None,
                   help="folders of routine-dose clinical CT (any transfer syntax, e.g. JPEG-LS), split by patient "
                        "into train and val (default: ../shared/data/clinical_ct when present; none: --clinical "
                        "without a folder)")
    p.add_argument("--validation-patients", type=Path, default=DEFAULT_SPLIT_FILE,
                   help="JSON with the PatientIDs held out for validation ({\"validation_patients\": [...]}) and the "
                        "series that are not routine CT ({\"not_routine_series\": [...]}, optional; "
                        "default models/clinical_split.json)")
    p.add_argument("--max-per-series", type=int, default=0,
                   help="at most this many slices per real series, evenly spaced (default 0: all)")
    p.add_argument("--train-phantoms", type=int, default=32, help="procedural phantoms in train (default 32)")
    p.add_argument("--test-phantoms", type=int, default=0, help="procedural phantoms in test (default 0)")
    p.add_argument("--unlabeled-phantoms", type=int, default=0,
                   help="procedural phantoms in unlabeled, 3 random dose/view variants each (default 0)")
    p.add_argument("--sources", type=Path, nargs="*", default=None,
                   help="folders/files of normal-dose CT for the train split (default: ../shared/data/ct "
                        "GE head + pydicom's CT slices (CT_small, two JPEG 2000 heads); the Philips head phantom "
                        "series goes to test)")
    p.add_argument("--test-sources", type=Path, nargs="*", default=None,
                   help="folders/files of normal-dose CT for the test split (with --sources)")
    p.add_argument("--no-real", action="store_true", help="phantoms only")
    p.add_argument("--seed", type=int, default=0, help="seed for phantoms, noise and reader jitter (default 0)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output folder")
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    """Plan and run the simulation; prints progress on stderr and a summary on stdout."""
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"qcnode simulate: {out} is not empty (use --overwrite)", file=sys.stderr)
        return 2
    if args.size < 32:
        print("qcnode simulate: --size must be at least 32", file=sys.stderr)
        return 2
    if min(args.train_phantoms, args.test_phantoms, args.unlabeled_phantoms) < 0:
        print("qcnode simulate: phantom counts must be >= 0", file=sys.stderr)
        return 2
    from qcnode.simulation import simulate, sources  # imports torch

    real_train: list = []
    real_test: list = []
    real_val: list = []
    acquisitions: dict[str, tuple[str, str]] = {}
    routine_smooth: set[str] = set()
    if not args.no_real:
        clinical = _clinical_sources(args)
        if clinical is None:
            return 2
        train_slices, val_slices, every_slice, routine_smooth = clinical
        real_train = [r.as_source() for r in train_slices]
        real_val = [r.as_source() for r in val_slices]
        # the noise of an acquisition is measured on all its slices, also those thinned out
        acquisitions = {r.source_id: (r.acquisition, r.path) for r in every_slice}
        if args.sources is not None:
            missing = [str(s) for s in [*args.sources, *(args.test_sources or [])] if not s.exists()]
            if missing:
                print(f"qcnode simulate: source not found: {', '.join(missing)}", file=sys.stderr)
                return 2
            extra_train = sources.find_real_slices(args.sources)
            extra_test = sources.find_real_slices(args.test_sources or [])
            problem = _split_leak(extra_train, extra_test, val_slices, every_slice)
            if problem:
                print(f"qcnode simulate: {problem}", file=sys.stderr)
                return 2
            real_train += [r.as_source() for r in extra_train]
            real_test = [r.as_source() for r in extra_test]
        else:
            if not DEFAULT_SHARED_CT.is_dir():
                print(f"qcnode simulate: {DEFAULT_SHARED_CT} not found; using pydicom's bundled CT slices only",
                      file=sys.stderr)
            for src in sources.default_real_sources(DEFAULT_SHARED_CT):
                (real_test if src[1] in TEST_SERIES else real_train).append(src)
    keys = {sid: (series, path) for sid, series, _, path in [*real_train, *real_val, *real_test]}
    keys.update(acquisitions)  # clinical slices: one acquisition is one patient's series
    if keys:
        print(f"simulate: measuring the own noise of {len(keys)} real slices", file=sys.stderr)
    own_noise = sources.series_noise_levels([(sid, key, path) for sid, (key, path) in keys.items()], args.size)
    try:
        splits = simulate.plan(doses=args.doses, views=args.views, train_phantoms=args.train_phantoms,
                               test_phantoms=args.test_phantoms, unlabeled_phantoms=args.unlabeled_phantoms,
                               seed=args.seed, real_train=real_train, real_test=real_test, real_val=real_val,
                               own_noise=own_noise, routine_smooth=routine_smooth)
    except ValueError as exc:
        print(f"qcnode simulate: {exc}", file=sys.stderr)
        return 2
    for split, specs in splits.items():
        n_img = sum(len(s.variants) for s in specs)
        n_real = sum(s.kind == "real" for s in specs)
        print(f"simulate: {split}: {len(specs)} sources ({n_real} real slices), {n_img} images", file=sys.stderr)
    start = time.monotonic()
    params = {"seed": args.seed, "doses": args.doses, "views": args.views,
              "command": "qcnode " + " ".join(sys.argv[1:]) if sys.argv else "qcnode simulate"}
    counts = simulate.run(out, splits, size=args.size, workers=args.workers, params=params,
                          geometry=args.geometry)
    print(f"simulated {sum(counts.values())} images into {out} in {time.monotonic() - start:.0f} s: "
          + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def _split_leak(extra_train: list, extra_test: list, clinical_val: list, clinical_all: list) -> str | None:
    """Why --sources / --test-sources would put one patient or slice in two splits (None if not)."""
    val_patients = {r.patient for r in clinical_val}
    clinical_paths = {Path(r.path).resolve() for r in clinical_all}
    for name, side in (("--sources", extra_train), ("--test-sources", extra_test)):
        if any(Path(r.path).resolve() in clinical_paths for r in side):
            return f"{name} repeats slices of --clinical (they are split by patient already)"
    if any(r.patient in val_patients for r in extra_train):
        return "--sources holds slices of a validation patient (see --validation-patients)"
    if {r.patient for r in extra_train} & {r.patient for r in extra_test}:
        return "--sources and --test-sources share a patient"
    return None


def _clinical_sources(args: argparse.Namespace) -> tuple[list, list, list, set[str]] | None:
    """(train, val, all) RealSlices of the clinical folders (train and val split by patient and
    thinned) and the ids of those read as routine smooth-kernel CT; None after an error message."""
    from qcnode.simulation import sources
    dirs = args.clinical if args.clinical is not None else ([DEFAULT_CLINICAL] if DEFAULT_CLINICAL.is_dir() else [])
    if not dirs:
        return [], [], [], set()
    missing = [str(d) for d in dirs if not d.exists()]
    if missing:
        print(f"qcnode simulate: clinical folder not found: {', '.join(missing)}", file=sys.stderr)
        return None
    from qcnode.training.realval import SplitFile
    try:
        split = SplitFile.read(args.validation_patients)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"qcnode simulate: cannot read --validation-patients {args.validation_patients}: {exc}",
              file=sys.stderr)
        return None
    every_slice = sources.find_real_slices(dirs)
    train, val = sources.split_by_patient(sources.thin_series(every_slice, args.max_per_series),
                                          split.validation_patients)
    n_patients = [len({r.patient for r in side}) for side in (train, val)]
    print(f"simulate: clinical: {len(train)} slices of {n_patients[0]} patients train, "
          f"{len(val)} slices of {n_patients[1]} patients val", file=sys.stderr)
    routine_smooth = sources.routine_smooth_ids(every_slice, split.not_routine)
    print(f"simulate: clinical: {len(routine_smooth)} of {len(every_slice)} slices are routine diagnostic CT "
          "with a smooth kernel (the readers read them as routine)", file=sys.stderr)
    return train, val, every_slice, routine_smooth
