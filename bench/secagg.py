"""What SecAgg+ costs per round (issue: privacy): the same fedavg federation on BANKING77 with
and without secure aggregation, at 5 and 10 sites, through the Ray simulation.

Per round: the training exchange's seconds (sampling to aggregate: with SecAgg+ its four stages,
key agreement, secret sharing, masking and unmasking), the whole round's seconds, and the bytes
of the serialised messages down to and up from the sites (training and evaluation). Resumable.
Writes secagg.json and secagg.md under --out.

    .venv/bin/python bench/secagg.py --data ../shared/data/banking77
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from strategies import federation_parser  # noqa: E402  (bench/strategies.py)


def main() -> None:
    parser = federation_parser("bench-secagg", ["fedavg"])
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10])
    parser.set_defaults(rounds=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "secagg.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for strategy in args.strategies:
        for sites in args.sites:
            for secure in (False, True):
                key = f"{strategy} sites={sites} secagg={secure}"
                if key in results:
                    continue  # resumable
                run_dir = out / key.replace(" ", "-").replace("=", "")
                subprocess.run([str(ROOT / ".venv/bin/fedlora"), "simulate", "--data", args.data,
                                "--num-clients", str(sites), "--rounds", str(args.rounds),
                                "--strategy", strategy, "--out", str(run_dir), "--run-config",
                                f"{args.run_config} secure-aggregation={str(secure).lower()}"],
                               check=True, cwd=ROOT)
                rounds = [json.loads(x)
                          for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
                results[key] = {
                    "strategy": strategy, "sites": sites, "secagg": secure,
                    "train-exchange-seconds": statistics.mean(
                        r["train-exchange-seconds"] for r in rounds),
                    "round-seconds": statistics.mean(r["seconds"] for r in rounds),
                    "bytes-down": statistics.mean(r["bytes-down"] for r in rounds),
                    "bytes-up": statistics.mean(r["bytes-up"] for r in rounds),
                    "accuracy": rounds[-1]["server"]["accuracy"]}
                results_file.write_text(json.dumps(results, indent=1))
    (out / "secagg.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| strategy | sites | SecAgg+ | train exchange s/round | round s | MB down/round | "
             "MB up/round | final acc. |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results.values(), key=lambda r: (r["strategy"], r["sites"], r["secagg"])):
        lines.append(f"| {r['strategy']} | {r['sites']} | {'yes' if r['secagg'] else 'no'} | "
                     f"{r['train-exchange-seconds']:.1f} | {r['round-seconds']:.1f} | "
                     f"{r['bytes-down'] / 1e6:.2f} | {r['bytes-up'] / 1e6:.2f} | "
                     f"{r['accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
