"""Print a run directory's rounds as a Markdown table (for docs/benchmarks.md)."""

import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
print("| round | server accuracy | server macro-F1 | server loss | client train loss "
      "| client val accuracy | MB down | MB up | seconds |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rounds:
    s, t, e = r["server"], r.get("train", {}), r.get("evaluate", {})
    print(f"| {r['round']} | {s['accuracy']:.4f} | {s['macro-f1']:.4f} | {s['loss']:.4f} "
          f"| {t.get('train-loss', float('nan')):.4f} | {e.get('eval-accuracy', float('nan')):.4f} "
          f"| {r['bytes-down'] / 1e6:.2f} | {r['bytes-up'] / 1e6:.2f} | {r['seconds']:.1f} |")
summary = json.loads((run / "summary.json").read_text())
print(f"\nstatus {summary['status']}, total {summary.get('seconds', 0):.0f} s")
