"""Server accuracy against the privacy budget (issue: privacy): example-level DP-SGD on every
site, for fedavg and ffa on BANKING77, at epsilon 1, 3, 8 and without DP.

Sites are IID (equal sizes, so every site spends the same epsilon); for each target epsilon the
noise multiplier is the one Opacus' RDP accountant says spends exactly that epsilon (delta 1e-5)
over the run's rounds x local steps at sample rate batch-size / site size. Resumable. Writes
privacy.json, privacy.md and privacy.png under --out.

    .venv/bin/python bench/privacy.py --data ../shared/data/banking77
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import load_results, store_results  # noqa: E402  (bench/results.py)
from strategies import federation_parser, save_figure  # noqa: E402  (bench/strategies.py)

from common.config import FedLoraConfig, parse_overrides  # noqa: E402
from server.outputs import RunDirectory  # noqa: E402

EPSILONS = [1.0, 3.0, 8.0, None]  # None: no DP


def noise_for(epsilon: float, cfg: FedLoraConfig, site_examples: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(
        target_epsilon=epsilon, target_delta=cfg.dp_delta,
        sample_rate=min(1.0, cfg.batch_size / site_examples),
        steps=cfg.local_steps * cfg.num_rounds, accountant="rdp"))


def main() -> None:
    args = federation_parser("bench-privacy", ["fedavg", "ffa"]).parse_args()
    out = Path(args.out)
    _, results = load_results(out, "privacy.json")
    cfg = FedLoraConfig.from_run_config({**parse_overrides(args.run_config),
                                         "num-rounds": args.rounds, "num-clients": args.clients})
    # IID: every site holds max-train-examples / clients rows, minus its validation share.
    site_examples = int(cfg.max_train_examples / args.clients * (1 - cfg.val_fraction))
    for strategy in args.strategies:
        for epsilon in EPSILONS:
            key = f"{strategy} eps={epsilon if epsilon else 'none'}"
            if key in results:
                continue  # resumable
            noise = noise_for(epsilon, cfg, site_examples) if epsilon else 0.0
            run_dir = out / key.replace(" ", "-").replace("=", "")
            subprocess.run([str(ROOT / ".venv/bin/fedlora"), "simulate", "--data", args.data,
                            "--num-clients", str(args.clients), "--rounds", str(args.rounds),
                            "--strategy", strategy, "--out", str(run_dir), "--run-config",
                            f"{args.run_config} dp-noise-multiplier={noise}"],
                           check=True, cwd=ROOT)
            rounds = RunDirectory(run_dir).read_rounds()
            spent = [max((c.get("dp-epsilon", 0.0) for c in r.get("train-per-client", [])),
                         default=0.0) for r in rounds[1:]]
            results[key] = {"strategy": strategy, "target-epsilon": epsilon,
                            "noise-multiplier": noise, "epsilon-spent": spent,
                            "accuracy": [r["server"]["accuracy"] for r in rounds],
                            "seconds": RunDirectory(run_dir).read_summary()["seconds"]}
            store_results(out, "privacy.json", results)
    (out / "privacy.md").write_text(table(results))
    plot(results, out / "privacy.png")
    print(table(results))


def table(results: dict) -> str:
    lines = ["| strategy | target epsilon | noise multiplier | epsilon spent | final acc. | "
             "best acc. | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        eps = r["target-epsilon"]
        lines.append(f"| {r['strategy']} | {eps if eps else 'no DP'} | "
                     f"{r['noise-multiplier']:.3f} | "
                     f"{r['epsilon-spent'][-1] if eps else 0:.2f} | {r['accuracy'][-1]:.4f} | "
                     f"{max(r['accuracy']):.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in sorted({r["strategy"] for r in results.values()}):
        points = [(r["target-epsilon"], r["accuracy"][-1]) for r in results.values()
                  if r["strategy"] == strategy and r["target-epsilon"]]
        no_dp = [r["accuracy"][-1] for r in results.values()
                 if r["strategy"] == strategy and not r["target-epsilon"]]
        if points:
            xs, ys = zip(*sorted(points))
            line, = ax.plot(xs, ys, marker="o", label=f"{strategy} (DP-SGD)")
            for acc in no_dp:
                ax.axhline(acc, linestyle="--", color=line.get_color(),
                           label=f"{strategy}, no DP")
    ax.set(xscale="log", xlabel="epsilon (delta 1e-5)", ylabel="final server accuracy",
           title="BANKING77, 10 IID sites, DP-SGD on every site")
    save_figure(fig, ax, path)


if __name__ == "__main__":
    main()
