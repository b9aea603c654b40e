#!/usr/bin/env bash
# Evaluate one checkpoint: validation patients (a)-(d), training patients' series (a, b), Philips test split.
set -euo pipefail
M=$1; N=$2; D=${D:-/work/data/rc3}; R=${R:-/work/runs/rc3}  # rc5 round: D=/work/data/rc5 R=/work/runs/rc5
Q=/work/main/.venv/bin/qcnode
$Q validate --model $M --sim $D/val --out $R/validate-$N.json > /dev/null
$Q validate --model $M --patients training --out $R/validate-train-$N.json > /dev/null
$Q evaluate --model $M --data $D/test --no-baseline --out $R/eval-test-$N > /dev/null
python3 - "$R" "$N" <<'PY'
import json, sys
R, N = sys.argv[1:3]
v = json.load(open(f"{R}/validate-{N}.json")); t = json.load(open(f"{R}/validate-train-{N}.json"))
e = json.load(open(f"{R}/eval-test-{N}/metrics.json"))
d = v["d_simulated"]
print(N, v["model"])
print(" (a) val", v["a_routine_smooth_series"], " train", t["a_routine_smooth_series"])
print(" (b)", [(p["smooth"], p["smooth_mean"], p["sharp_mean"], p["slice_pairs_in_order"]) for p in v["b_kernel_pairs"] + t["b_kernel_pairs"]])
print(" (c)", v["c_dose_order"])
print(" (d) sum %.3f plcc %.3f cov %.3f mae %.3f | GNL %.3f | ceiling %.3f" % (d["model_metrics"]["overall"], d["model_metrics"]["plcc"], d["interval_coverage"], d["mean_absolute_error"], d["baseline"]["metrics"]["overall"], d["label_ceiling"]["metrics"]["overall"]))
print(" Philips test sum %.3f cov %.3f" % (e["model_metrics"]["overall"], e["interval_coverage"]))
for s in v["series"] + t["series"]:
    if s["n_slices"] > 3: print("   ", s["patient_group"], s["series"], s["kernel"], s["mean_score"], s["fraction_below"], s["verdict"])
PY
