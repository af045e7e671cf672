#!/usr/bin/env bash
# The core issue's acceptance run: the default model, 10 sites, Dirichlet label skew alpha 0.5,
# 5 rounds, the whole of BANKING77 (10,003 training, 3,080 test queries).
# Usage: bench/banking77_federation.sh [DATA_DIR] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/banking77}
OUT=${2:-runs/bench-banking77-dirichlet0.5}
/usr/bin/time -v .venv/bin/fedlora simulate --data "$DATA" --num-clients 10 --rounds 5 \
    --partition dirichlet --alpha 0.5 --out "$OUT" \
    --run-config "label-column=category" 2> "$OUT.time.txt" || {
    cat "$OUT.time.txt"; exit 1; }
.venv/bin/python bench/summarize_run.py "$OUT"
grep -E "Elapsed|Maximum resident" "$OUT.time.txt"
