"""Personal heads against the global model and local-only training, per site (issue 23).

For each Dirichlet alpha: one `fedlora simulate` run with personal-head=true (every site scores
the global model, its personal head and its local-only closed-form head on its own validation
rows at every evaluation), and the local-only baseline (simulations/baselines.py: each site
trains LoRA and its head alone on its partition for all rounds' local training), scored on the
same validation rows. Sites are matched by partition id. With `--site-eval-rows test` every
site scores, instead of its validation rows, its share of the data's test split dealt by its
share of each label (site-eval-rows=test; ~10x the rows). Writes, under --out, personal.json
and personal.md (the table for docs/benchmarks.md).

    .venv/bin/python bench/personal.py --data ../shared/data/banking77
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import load_results, markdown_table, store_results  # noqa: E402  (bench/results.py)
from strategies import _overrides, federation_parser  # noqa: E402  (bench/strategies.py)

from common.config import FedLoraConfig  # noqa: E402
from simulations.baselines import local_only_sites  # noqa: E402

MODELS = {"global": "eval-accuracy", "personal": "eval-personal-accuracy",
          "personal adapter (personal-steps)": "eval-personal-adapter-accuracy",
          "local-only head (base features)": "eval-local-head-accuracy"}


def federation(args, alpha: float, run_dir: Path, steps: int, extra: str) -> list[dict]:
    """The last round's per-site evaluation of a run with personal heads."""
    if not (run_dir / "summary.json").is_file() or \
            json.loads((run_dir / "summary.json").read_text()).get("status") != "completed":
        subprocess.run([str(ROOT / ".venv/bin/fedlora"), "simulate", "--data", args.data,
                        "--num-clients", str(args.clients), "--rounds", str(args.rounds),
                        "--partition", "dirichlet", "--alpha", str(alpha), "--out",
                        str(run_dir), "--run-config",
                        f"{args.run_config} personal-head=true personal-steps={steps}{extra}"],
                       check=True, cwd=ROOT)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rounds[-1]["evaluate-per-client"]


def main() -> None:
    parser = federation_parser("bench-personal", ["fedavg"])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--personal-steps", type=int, default=0,
                        help="also train a personal adapter this many steps after the last round")
    parser.add_argument("--site-eval-rows", choices=["validation", "test"], default="validation",
                        help="what each site scores: its validation rows, or its share of the "
                             "test split (site-eval-rows=test)")
    parser.set_defaults(rounds=3, run_config="label-column=category local-epochs=1")
    args = parser.parse_args()
    out = Path(args.out)
    _, results = load_results(out, "personal.json")
    test_rows = args.site_eval_rows == "test"
    extra = " site-eval-rows=test" if test_rows else ""
    for alpha in args.alphas:
        steps = args.personal_steps
        suffix = f" personal-steps={steps}" if steps else ""
        entry = results.setdefault(f"alpha={alpha}{extra}{suffix}", {"alpha": alpha})
        if "sites" not in entry:
            run_dir = out / (f"alpha{alpha}{'-test' if test_rows else ''}"
                             f"{f'-steps{steps}' if steps else ''}")
            entry["sites"] = federation(args, alpha, run_dir, steps, extra)
            store_results(out, "personal.json", results)
        # the same without steps
        alone = results.get(f"alpha={alpha}{extra}", {}).get("local-only")
        if "local-only" not in entry and alone is not None:
            entry["local-only"] = alone
        if "local-only" not in entry:
            cfg = FedLoraConfig.from_run_config({
                **_overrides(args.run_config), "data": args.data, "num-clients": args.clients,
                "num-rounds": args.rounds, "partition": "dirichlet", "alpha": alpha,
                "site-eval-rows": args.site_eval_rows})
            entry["local-only"] = local_only_sites(cfg)
            store_results(out, "personal.json", results)
    report = table(results) + "\n" + site_lines(results)
    (out / "personal.md").write_text(report)
    print(report)


def per_site(entry: dict) -> list[dict]:
    """Per partition: its validation rows and each model's accuracy on them."""
    alone = {int(s["partition-id"]): s for s in entry["local-only"]}
    sites = []
    for site in sorted(entry["sites"], key=lambda s: s["partition-id"]):
        pid = int(site["partition-id"])
        row = {"partition-id": pid, "rows": int(site["num-examples"]),
               **{name: site.get(key) for name, key in MODELS.items()}}
        if pid in alone:
            row["local-only (LoRA + head, trained alone)"] = alone[pid]["accuracy"]
            row["rows alone"] = int(alone[pid]["num-examples"])  # the same rows: a check
        sites.append(row)
    return sites


def table(results: dict) -> str:
    names = [*MODELS, "local-only (LoRA + head, trained alone)"]
    adapter = "personal adapter (personal-steps)"
    rows = []
    for key, entry in results.items():
        sites = per_site(entry)
        for name in names:
            values = [s[name] for s in sites if s.get(name) is not None]
            if not values:
                continue
            rows.append([key.removeprefix("alpha="), name, str(len(values)),
                         f"{statistics.mean(values):.4f}", f"{min(values):.4f}",
                         f"{statistics.median(values):.4f}", f"{max(values):.4f}",
                         *(gain(sites, mine, name) for mine in ("personal", adapter))])
    return markdown_table(["alpha (run)", "model", "sites", "mean", "worst", "median", "best",
                           "personal head minus it: mean / worst site",
                           "personal adapter minus it: mean / worst site"], rows)


def site_lines(results: dict) -> str:
    """Each run's sites, in partition order: rows, then each model's accuracy."""
    short = {"global": "g", "personal": "p", "personal adapter (personal-steps)": "a",
             "local-only (LoRA + head, trained alone)": "L"}
    lines = []
    for key, entry in results.items():
        sites = per_site(entry)
        lines.append(f"{key.removeprefix('alpha=')}: rows " +
                     " ".join(str(s["rows"]) for s in sites) + ";")
        for name, letter in short.items():
            if all(s.get(name) is not None for s in sites):
                lines.append(f"{letter} " + " ".join(f"{s[name]:.3f}" for s in sites) + ";")
    return "\n".join(lines) + "\n"


def gain(sites: list[dict], mine: str, name: str) -> str:
    """How much model `mine` beats model `name` by on the mean site and on its worst site."""
    gains = [s[mine] - s[name] for s in sites
             if s.get(name) is not None and s.get(mine) is not None]
    if name == mine or not gains:
        return ""
    return f"{statistics.mean(gains):+.4f} / {min(gains):+.4f}"


if __name__ == "__main__":
    main()
