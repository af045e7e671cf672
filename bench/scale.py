"""Scale (issue: performance, item 4): 1,000 simulated sites of which 10 train and evaluate
each round, against a 10-site federation of the same site size, on this machine.

Both federations give every site ~10 BANKING77 queries (1,000 sites share 10,000, 10 sites
share 100), so a sampled site does the same work in both; what differs is the bookkeeping of
1,000 nodes. While `fedlora simulate` runs, the memory of its whole process tree (server,
Ray's processes, the client actors) is sampled every second: the resident set summed over the
processes (counts shared pages once per process) and the proportional set (shares them out).
Per round: seconds, and the memory when the round was written. Writes scale.json under --out.

    .venv/bin/python bench/scale.py --data ../shared/data/banking77
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30

from results import save_results  # noqa: E402  (bench/results.py)


def tree_memory(root: psutil.Process) -> tuple[float, float]:
    rss = pss = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return rss / GIB, pss / GIB


def run(args: argparse.Namespace, sites: int, examples: int, fraction: float) -> dict:
    run_dir = Path(args.out) / f"sites{sites}"
    command = [str(ROOT / ".venv/bin/fedlora"), "simulate", "--data", args.data,
               "--num-clients", str(sites), "--rounds", str(args.rounds), "--out", str(run_dir),
               "--run-config", f"label-column=category local-steps=6 max-eval-examples=500 "
               f"max-train-examples={examples} fraction-train={fraction} "
               f"fraction-evaluate={fraction} min-train-clients=10 min-evaluate-clients=10"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0.0
    per_round: dict[int, tuple[float, float]] = {}
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        rss, pss = tree_memory(root)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        written = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if written and written - 1 not in per_round:
            per_round[written - 1] = (rss, pss)
        time.sleep(1.0)
    if proc.returncode != 0:
        raise SystemExit(f"fedlora simulate failed for {sites} sites")
    rounds = [json.loads(x) for x in metrics.read_text().splitlines()]
    return {"sites": sites, "sampled": [r["clients"].get("train-clients-sampled") for r in
                                        rounds[1:]],
            "round-seconds": [r["seconds"] for r in rounds[1:]],
            "median-round-seconds": statistics.median(r["seconds"] for r in rounds[1:]),
            "peak-rss-gib": peak_rss, "peak-pss-gib": peak_pss,
            "rss-gib-by-round": {k: v[0] for k, v in sorted(per_round.items())},
            "pss-gib-by-round": {k: v[1] for k, v in sorted(per_round.items())},
            "accuracy": rounds[-1]["server"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/banking77"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-scale"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = {"10 sites": run(args, 10, 100, 1.0),
               "1000 sites": run(args, 1000, 10_000, 0.01)}
    results["round time ratio"] = (results["1000 sites"]["median-round-seconds"]
                                   / results["10 sites"]["median-round-seconds"])
    save_results(Path(args.out), "scale.json", results)


if __name__ == "__main__":
    main()
