"""Bytes on the wire per client per round against the full model, for each transfer dtype
(issue: performance, item 1): the same fedavg federation on BANKING77 with adapters sent as
float32, float16 and int8, and the final server accuracy of each.

Bytes are those of the serialised messages (training and evaluation, down and up), as
metrics.jsonl counts them; the full model is every parameter of the default model for
BANKING77 in float32. Resumable. Writes communication.json and communication.md under --out.

    .venv/bin/python bench/communication.py --data ../shared/data/banking77
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import load_results, markdown_table, store_results  # noqa: E402  (bench/results.py)
from strategies import federation_parser  # noqa: E402  (bench/strategies.py)

from server.outputs import RunDirectory  # noqa: E402

DTYPES = ["float32", "float16", "int8"]


def full_model_bytes() -> int:
    from common.config import FedLoraConfig
    from common.model import build_lora_model

    lora = build_lora_model(FedLoraConfig(), [str(i) for i in range(77)])
    return sum(p.numel() for p in lora.model.parameters()) * 4


def main() -> None:
    args = federation_parser("bench-communication", ["fedavg"]).parse_args()
    out = Path(args.out)
    _, results = load_results(out, "communication.json")
    results.setdefault("full-model-bytes", full_model_bytes())
    for strategy in args.strategies:
        for dtype in DTYPES:
            key = f"{strategy} {dtype}"
            if key in results:
                continue  # resumable
            run_dir = out / key.replace(" ", "-")
            subprocess.run([str(ROOT / ".venv/bin/fedlora"), "simulate", "--data", args.data,
                            "--num-clients", str(args.clients), "--rounds", str(args.rounds),
                            "--strategy", strategy, "--out", str(run_dir), "--run-config",
                            f"{args.run_config} transfer-dtype={dtype}"], check=True, cwd=ROOT)
            rounds = RunDirectory(run_dir).read_rounds()[1:]
            results[key] = {
                "strategy": strategy, "dtype": dtype,
                "bytes-down-per-client": statistics.mean(r["bytes-down-per-client"]
                                                         for r in rounds),
                "bytes-up-per-client": statistics.mean(r["bytes-up-per-client"] for r in rounds),
                "accuracy": rounds[-1]["server"]["accuracy"]}
            store_results(out, "communication.json", results)
    (out / "communication.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    full = results["full-model-bytes"]
    runs = [r for r in results.values() if isinstance(r, dict)]
    rows = []
    for r in runs:
        base = next(b for b in runs if b["strategy"] == r["strategy"] and b["dtype"] == "float32")
        total = r["bytes-down-per-client"] + r["bytes-up-per-client"]
        base_total = base["bytes-down-per-client"] + base["bytes-up-per-client"]
        rows.append([r["strategy"], r["dtype"], f"{r['bytes-down-per-client'] / 1e3:.1f}",
                     f"{r['bytes-up-per-client'] / 1e3:.1f}", f"{total / base_total:.3f}",
                     f"{r['bytes-up-per-client'] / full:.4f}", f"{r['accuracy']:.4f}",
                     f"{100 * (r['accuracy'] - base['accuracy']):+.1f}"])
    return f"Full model (float32): {full / 1e6:.1f} MB.\n\n" + markdown_table(
        ["strategy", "transfer dtype", "KB down/client/round", "KB up/client/round",
         "x float32", "x full model (up)", "final acc.", "vs float32 (points)"], rows)


if __name__ == "__main__":
    main()
