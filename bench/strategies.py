"""Compare every aggregation strategy on BANKING77 (issue: LoRA-aware aggregation).

For each Dirichlet alpha: one `fedlora simulate` run per strategy (same data, seeds, local
steps and rounds), plus the centralized and local-only baselines. Writes, under --out:
results.json, results.md (the table for docs/benchmarks.md) and accuracy_alpha<A>.png.

    .venv/bin/python bench/strategies.py --data ../shared/data/banking77 --alphas 0.1 1.0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import load_results, store_results  # noqa: E402  (bench/results.py)

from common.config import STRATEGIES, FedLoraConfig  # noqa: E402
from simulations.baselines import centralized, local_only  # noqa: E402


def federation_parser(out: str, strategies: list[str]) -> argparse.ArgumentParser:
    """The options every BANKING77 benchmark shares: data, output, strategies, size."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/banking77"))
    parser.add_argument("--out", default=str(ROOT / "runs" / out))
    parser.add_argument("--strategies", nargs="+", default=strategies)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-config", default="label-column=category local-steps=6 "
                        "max-train-examples=2000 max-eval-examples=1000")
    return parser


def main() -> None:
    parser = federation_parser("bench-strategies", list(STRATEGIES))
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    args = parser.parse_args()
    out = Path(args.out)
    _, results = load_results(out, "results.json")
    for alpha in args.alphas:
        key = f"alpha={alpha}"
        entry = results.setdefault(key, {})
        for strategy in args.strategies:
            if strategy in entry:
                continue  # resumable: a finished run is not repeated
            run_dir = out / f"{strategy}-alpha{alpha}"
            if not _completed(run_dir):  # a finished run directory is reused
                subprocess.run([str(ROOT / ".venv/bin/fedlora"), "simulate", "--data",
                                args.data, "--num-clients", str(args.clients), "--rounds",
                                str(args.rounds), "--partition", "dirichlet", "--alpha",
                                str(alpha), "--strategy", strategy, "--out", str(run_dir),
                                "--run-config", args.run_config], check=True, cwd=ROOT)
            rounds = [json.loads(x) for x in
                      (run_dir / "metrics.jsonl").read_text().splitlines()]
            entry[strategy] = {
                "accuracy": [r["server"]["accuracy"] for r in rounds],
                "agg-rel-error": [r.get("agg-rel-error") for r in rounds[1:]],
                "bytes-up-per-client": rounds[-1]["bytes-up-per-client"],
                "bytes-down-per-client": rounds[-1]["bytes-down-per-client"],
                "seconds": json.loads((run_dir / "summary.json").read_text())["seconds"]}
            store_results(out, "results.json", results)
        cfg = FedLoraConfig.from_run_config({
            **_overrides(args.run_config), "data": args.data, "num-clients": args.clients,
            "num-rounds": args.rounds, "partition": "dirichlet", "alpha": alpha})
        for name, baseline in (("centralized", centralized), ("local-only", local_only)):
            if name not in entry:
                entry[name] = baseline(cfg)
                store_results(out, "results.json", results)
        plot(entry, alpha, out / f"accuracy_alpha{alpha}.png")
    (out / "results.md").write_text(table(results))
    print(table(results))


def _completed(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "completed"


def _overrides(text: str) -> dict:
    from common.config import parse_overrides

    return parse_overrides(text)


def table(results: dict) -> str:
    lines = []
    for key, entry in results.items():
        central = entry.get("centralized", {}).get("accuracy")
        if central is None:  # baselines not run yet for this alpha
            continue
        lines += [f"\n### {key}\n", f"centralized LoRA: {central:.4f}; local-only (mean of "
                  f"sites): {entry.get('local-only', {}).get('accuracy', float('nan')):.4f}\n",
                  "| strategy | final acc. | best acc. | % of centralized | rounds to 90% of "
                  "centralized | mean agg_rel_error | KB up / client / round | KB down / client "
                  "/ round |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in entry.items():
            if name in ("centralized", "local-only"):
                continue
            acc = r["accuracy"]
            reach = next((i for i, a in enumerate(acc) if central and a >= 0.9 * central), None)
            errors = [e for e in r["agg-rel-error"] if e is not None]
            lines.append(
                f"| {name} | {acc[-1]:.4f} | {max(acc):.4f} | "
                f"{100 * acc[-1] / central:.1f}% | {reach if reach is not None else '-'} | "
                f"{sum(errors) / len(errors):.2e} | {r['bytes-up-per-client'] / 1e3:.0f} | "
                f"{r['bytes-down-per-client'] / 1e3:.0f} |")
    return "\n".join(lines) + "\n"


def plot(entry: dict, alpha: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in entry.items():
        if "accuracy" in r and isinstance(r["accuracy"], list):
            ax.plot(range(len(r["accuracy"])), r["accuracy"], marker="o", label=name)
    for name, style in (("centralized", "--"), ("local-only", ":")):
        if name in entry:
            ax.axhline(entry[name]["accuracy"], linestyle=style, color="gray", label=name)
    ax.set(xlabel="round", ylabel="server accuracy",
           title=f"BANKING77, 10 sites, Dirichlet alpha {alpha}")
    save_figure(fig, ax, path)


def save_figure(fig, ax, path: Path) -> None:
    """Legend, layout, a PNG at the size docs/ uses, and the figure freed."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
