#!/usr/bin/env bash
# Issue #16 shipped-model training (CPU, 2 threads): two teachers, semi-supervised student.
set -euo pipefail
R=${R:-/work/runs/rc3}; D=${D:-/work/data/rc3}; U=/work/data/unlabeled_train  # rc5 round: D=/work/data/rc5 R=/work/runs/rc5
Q=/work/main/.venv/bin/qcnode
RANK="--rank-weight 3.0 --rank-margin 0.1"
$Q train --data $D/train --val-data $D/val --out $R/teacher1.pt --preset challenge --epochs 6 --seed 1 --threads 2 $RANK
$Q train --data $D/train --val-data $D/val --out $R/teacher2.pt --preset challenge --epochs 6 --seed 2 --threads 2 $RANK
$Q train --data $D/train --val-data $D/val --unlabeled $U --teachers $R/teacher1.pt $R/teacher2.pt \
   --out $R/student.pt --preset challenge --set input_size=256 --epochs 10 --seed 0 --threads 2 $RANK
