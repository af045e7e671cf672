"""Overhead against the ideal time (issue: performance, item 2): the default model on BANKING77,
4 and 10 clients, 3 rounds, through `fedlora simulate`.

Ideal time: the clients' pure training and evaluation seconds (measured inside the clients:
train-seconds, eval-seconds), divided by how many clients run at once (cores / client-num-cpus),
plus the server's evaluation seconds (every round, round 0 included). Since the server scores a
round while the sites evaluate it (RoundRecorder.score_ahead), both stretch each other's wall
seconds and that sum counts the shared time twice (a steady round then takes less than its
"ideal"); so the ideal is also taken from CPU seconds: every client's and the server's CPU
seconds of that work (train-cpu-seconds, eval-cpu-seconds) over the machine's cores, i.e. the
work perfectly packed onto the cores, however they were shared. The ratios use that one.
Measured:
(a) end to end, from the command's start to the final adapter written;
(b) a steady-state round (rounds 2 and 3): the round's seconds against its ideal;
(c) from the command's start to the first training step of any client.
(c) varies from run to run on a small machine (start-up is CPU-bound and file reads may miss
the page cache), so it is also taken from --first-step-repeats further one-round runs
(local-steps 3, same data), reported as median and range.
Resumable. Writes overhead.json and overhead.md under --out.

    .venv/bin/python bench/overhead.py --data ../shared/data/banking77
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import load_results, markdown_table, store_results  # noqa: E402  (bench/results.py)
from strategies import federation_parser  # noqa: E402  (bench/strategies.py)

from server.outputs import RunDirectory  # noqa: E402


def round_work(record: dict, kind: str) -> tuple[float, float]:
    """A round's work in seconds of `kind` ("seconds": wall, "cpu-seconds": CPU): the sites'
    training and evaluation together, and the server's scoring."""
    sites = sum(c.get(f"train-{kind}", 0) for c in record.get("train-per-client", [])) + \
        sum(c.get(f"eval-{kind}", 0) for c in record.get("evaluate-per-client", []))
    return sites, record["server"][f"eval-{kind}"]


# Round 0 is scored while round 1 trains, so its seconds are stretched by the sites' work (its
# CPU seconds less so, but the process does round 1's exchange meanwhile): its pure cost is
# taken as that of the cheapest scoring of the same test set. (A head round's statistics pass
# is not in either ideal: the sites do not report its seconds; measure with head-mode=train.)

def wall_ideal(rounds: list[dict], concurrency: int) -> list[float]:
    """Each round's sites' wall seconds over the sites that run at once, plus the server's."""
    ideal = [sites / concurrency + server
             for sites, server in (round_work(r, "seconds") for r in rounds)]
    ideal[0] = min(r["server"]["eval-seconds"] for r in rounds[1:])
    return ideal


def cpu_ideal(rounds: list[dict], cores: int) -> list[float]:
    """Each round's CPU seconds of work, sites' and server's, packed onto the cores."""
    ideal = [sum(round_work(r, "cpu-seconds")) / cores for r in rounds]
    ideal[0] = min(r["server"]["eval-cpu-seconds"] for r in rounds) / cores
    return ideal


def measure(run_dir: Path, started: float, concurrency: int) -> dict:
    rounds = RunDirectory(run_dir).read_rounds()
    adapter = run_dir / "final_adapter" / "adapter_model.safetensors"
    end_to_end = adapter.stat().st_mtime - started
    wall = wall_ideal(rounds, concurrency)
    ideal = cpu_ideal(rounds, os.cpu_count())
    steady = [r["seconds"] / i for r, i in zip(rounds[2:], ideal[2:])]
    return {"end-to-end-seconds": end_to_end, "ideal-seconds": sum(ideal),
            "end-to-end-ratio": end_to_end / sum(ideal),
            "wall-ideal-seconds": sum(wall),
            "wall-ideal-ratio": end_to_end / sum(wall),
            "round-seconds": [r["seconds"] for r in rounds[1:]],
            "round-ideal-seconds": ideal[1:], "steady-round-ratio": max(steady),
            "first-training-step-seconds": first_step(run_dir, started),
            "server-eval-seconds": [r["server"]["eval-seconds"] for r in rounds],
            "server-eval-cpu-seconds": [r["server"]["eval-cpu-seconds"] for r in rounds],
            "accuracy": rounds[-1]["server"]["accuracy"]}


def simulate(args, sites: int, rounds: int, run_config: str, run_dir: Path) -> float:
    """Run `fedlora simulate`; return when it started (wall clock)."""
    started = time.time()
    subprocess.run([str(ROOT / ".venv/bin/fedlora"), "simulate", "--data", args.data,
                    "--num-clients", str(sites), "--rounds", str(rounds),
                    "--out", str(run_dir), "--run-config", run_config], check=True, cwd=ROOT)
    return started


def first_step(run_dir: Path, started: float) -> float:
    rounds = RunDirectory(run_dir).read_rounds()
    return min(c["train-started-at"] for c in rounds[1]["train-per-client"]) - started


def main() -> None:
    parser = federation_parser("bench-overhead", ["fedavg"])
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--first-step-repeats", type=int, default=5)
    parser.set_defaults(rounds=3, run_config="label-column=category local-epochs=1 "
                        "max-train-examples=4000 max-eval-examples=1000")
    args = parser.parse_args()
    out = Path(args.out)
    _, results = load_results(out, "overhead.json")
    cpus_per_client = 1.0  # fedlora simulate's default client-num-cpus
    for sites in args.sites:
        key = f"sites={sites}"
        if key not in results:  # resumable
            run_dir = out / f"sites{sites}"
            started = simulate(args, sites, args.rounds, args.run_config, run_dir)
            concurrency = min(sites, int(os.cpu_count() // cpus_per_client))
            results[key] = {"sites": sites, "concurrency": concurrency,
                            **measure(run_dir, started, concurrency)}
            store_results(out, "overhead.json", results)
        repeats = results[key].setdefault("first-step-repeats", [])
        short = f"{args.run_config} local-steps=3"  # local-steps overrides local-epochs
        while len(repeats) < args.first_step_repeats:
            run_dir = out / f"sites{sites}-start{len(repeats)}"
            repeats.append(first_step(run_dir, simulate(args, sites, 1, short, run_dir)))
            store_results(out, "overhead.json", results)
    (out / "overhead.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    def repeats(r: dict) -> str:
        times = r.get("first-step-repeats") or []
        return (f"{statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f})"
                if times else "")

    return markdown_table(
        ["sites", "at once", "end to end s", "ideal s (CPU)", "(a) ratio",
         "ideal s (wall; ratio)", "(b) steady round ratio", "(c) first step s",
         "(c) median of repeats (range)", "final acc."],
        [[str(r["sites"]), str(r["concurrency"]), f"{r['end-to-end-seconds']:.0f}",
          f"{r['ideal-seconds']:.0f}", f"{r['end-to-end-ratio']:.2f}",
          f"{r['wall-ideal-seconds']:.0f} ({r['wall-ideal-ratio']:.2f})",
          f"{r['steady-round-ratio']:.2f}", f"{r['first-training-step-seconds']:.1f}",
          repeats(r), f"{r['accuracy']:.4f}"] for r in results.values()])


if __name__ == "__main__":
    main()
