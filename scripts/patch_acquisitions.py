"""Re-simulate, with the simulator at this commit, the sources whose own noise changed when the
acquisition key became patient + SeriesInstanceUID (c909775 pooled one patient's different series
in tcga_lung_single_slices). Every other source's images, rows and labels are unchanged by that
fix (same groups, same seeds), so the result equals a full `qcnode simulate` run at this commit."""
import csv, json, sys
from pathlib import Path
import numpy as np, tifffile
from qcnode.simulation import simulate, sources
from qcnode.cli.simulate import DEFAULT_CLINICAL, DEFAULT_SHARED_CT, DEFAULT_SPLIT_FILE, TEST_SERIES

out = Path(sys.argv[1])
params = json.loads((out / "simulation.json").read_text())
every = sources.find_real_slices([DEFAULT_CLINICAL])
held = set(json.loads(DEFAULT_SPLIT_FILE.read_text())["validation_patients"])
train, val = sources.split_by_patient(sources.thin_series(every, 20), held)
real_train = [r.as_source() for r in train]; real_val = [r.as_source() for r in val]; real_test = []
for src in sources.default_real_sources(DEFAULT_SHARED_CT):
    (real_test if src[1] in TEST_SERIES else real_train).append(src)
keys = {sid: (series, path) for sid, series, _, path in [*real_train, *real_val, *real_test]}
keys.update({r.source_id: (r.acquisition, r.path) for r in every})
own = sources.series_noise_levels([(sid, k, p) for sid, (k, p) in keys.items()], params["size"])
splits = simulate.plan(doses=params["doses"], views=params["views"], train_phantoms=32, test_phantoms=0,
                       unlabeled_phantoms=0, seed=params["seed"], real_train=real_train, real_test=real_test,
                       real_val=real_val, own_noise=own)
changed = []
for split in ("train", "val", "test"):
    meta = {r["file"]: r for r in csv.DictReader((out / split / "meta.csv").open())}
    for spec in splits[split]:
        first = meta[f"{spec.first_index:04d}.tif"]
        assert first["source_id"] == spec.source_id, (split, spec.source_id, first["source_id"])
        if spec.kind == "real" and abs(float(first["own_noise_hu"]) - round(spec.own_noise_hu or 0, 3)) > 1e-3:
            changed.append(spec)
print(f"{len(changed)} sources to re-simulate", file=sys.stderr)
width = 4
rows_by_split = {}
for i in range(0, len(changed), 4):
    for spec, n, img, row in simulate.simulate_sources(changed[i:i + 4], params["size"],
                                                        params.get("geometry", "parallel")):
        name = f"{spec.first_index + n:0{width}d}.tif"
        tifffile.imwrite(out / spec.split / "image" / name, img)
        rows_by_split.setdefault(spec.split, {})[name] = {"file": name, **row}
for split, new_rows in rows_by_split.items():
    rows = list(csv.DictReader((out / split / "meta.csv").open()))
    rows = [new_rows.get(r["file"], r) for r in rows]
    simulate._write_split(out, split, rows)
print(json.dumps({k: len(v) for k, v in rows_by_split.items()}))
