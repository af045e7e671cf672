"""What SecAgg+ costs per round (issue: privacy).

1. Federations: the same fedavg federation on BANKING77 with and without secure aggregation,
   at 5 and 10 sites, through the Ray simulation. Per round: the training exchange's seconds
   (sampling to aggregate: with SecAgg+ its four stages), the whole round's seconds, and the
   bytes of the serialised messages down to and up from the sites (training and evaluation).
2. The protocol alone, in this process: sites that answer at once with a fixed adapter of the
   default model's shapes for BANKING77 (103k values), at 5, 10 and 20 sites: the wall seconds of
   a training exchange (every site's mod and the server's workflow, one after the other) and its
   serialised bytes, with and without SecAgg+.

Resumable. Writes secagg.json and secagg.md under --out.

    .venv/bin/python bench/secagg.py --data ../shared/data/banking77
"""

from __future__ import annotations

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


def main() -> None:
    parser = federation_parser("bench-secagg", ["fedavg"])
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--protocol-sites", type=int, nargs="+", default=[5, 10, 20])
    parser.set_defaults(rounds=3)
    args = parser.parse_args()
    out = Path(args.out)
    _, results = load_results(out, "secagg.json")
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
                rounds = RunDirectory(run_dir).read_rounds()[1:]
                results[key] = {
                    "strategy": strategy, "sites": sites, "secagg": secure,
                    "train-exchange-seconds": statistics.mean(
                        r["train-exchange-seconds"] for r in rounds),
                    "round-seconds": statistics.mean(r["seconds"] for r in rounds),
                    "bytes-down": statistics.mean(r["bytes-down"] for r in rounds),
                    "bytes-up": statistics.mean(r["bytes-up"] for r in rounds),
                    "accuracy": rounds[-1]["server"]["accuracy"]}
                store_results(out, "secagg.json", results)
    for sites in args.protocol_sites:
        key = f"protocol sites={sites}"
        if key not in results:
            results[key] = protocol_cost(sites)
            store_results(out, "secagg.json", results)
    (out / "secagg.md").write_text(table(results) + "\n" + protocol_table(results))
    print(table(results) + "\n" + protocol_table(results))


def protocol_cost(sites: int, rounds: int = 3) -> dict:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from client.mods import secure_aggregation_mod
    from common.config import FedLoraConfig
    from common.flower_compat import set_task_identity
    from common.model import build_lora_model
    from common.records import adapter_to_record
    from server.federation_loop import plain_exchange
    from server.secure_aggregation import ObservedGrid, SecAggPlusRound
    from server.strategies.fedavg import LoraFedAvg
    from simulations.inprocess import InProcessGrid

    set_task_identity(run_id=1, task_id=1, node_id=0)
    adapter = build_lora_model(FedLoraConfig(), [str(i) for i in range(77)]).trainable_state()
    app = ClientApp()

    @app.train(mods=[secure_aggregation_mod])
    def train(msg, context):
        return Message(RecordDict({"arrays": adapter_to_record(adapter),
                                   "metrics": MetricRecord({"num-examples": 100})}),
                       reply_to=msg)

    cost = {"sites": sites, "values": sum(t.numel() for t in adapter.values())}
    for secure in (False, True):
        cfg = FedLoraConfig(num_clients=sites, min_available_clients=sites,
                            min_train_clients=sites, secure_aggregation=secure)
        strategy = LoraFedAvg(cfg, adapter)
        exchange = SecAggPlusRound(strategy, cfg) if secure else plain_exchange(strategy)
        grid = ObservedGrid(InProcessGrid(cfg, sites, app=app))
        seconds = []
        for server_round in range(1, rounds + 1):
            started = time.perf_counter()
            arrays, _ = exchange(grid, server_round, adapter_to_record(adapter), ConfigRecord(),
                                 60.0)
            seconds.append(time.perf_counter() - started)
            assert arrays is not None, f"round {server_round} aggregated nothing"
        name = "secagg" if secure else "plain"
        cost[f"{name}-seconds"] = statistics.median(seconds)
        cost[f"{name}-bytes-down"] = grid.bytes_down / rounds
        cost[f"{name}-bytes-up"] = grid.bytes_up / rounds
    return cost


def protocol_table(results: dict) -> str:
    return markdown_table(
        ["sites", "plain s/round", "SecAgg+ s/round", "plain MB down/up", "SecAgg+ MB down/up"],
        [[str(r["sites"]), f"{r['plain-seconds']:.2f}", f"{r['secagg-seconds']:.2f}",
          f"{r['plain-bytes-down'] / 1e6:.2f} / {r['plain-bytes-up'] / 1e6:.2f}",
          f"{r['secagg-bytes-down'] / 1e6:.2f} / {r['secagg-bytes-up'] / 1e6:.2f}"]
         for r in results.values() if "plain-seconds" in r])


def table(results: dict) -> str:
    federations = [r for r in results.values() if "strategy" in r]
    return markdown_table(
        ["strategy", "sites", "SecAgg+", "train exchange s/round", "round s", "MB down/round",
         "MB up/round", "final acc."],
        [[r["strategy"], str(r["sites"]), "yes" if r["secagg"] else "no",
          f"{r['train-exchange-seconds']:.1f}", f"{r['round-seconds']:.1f}",
          f"{r['bytes-down'] / 1e6:.2f}", f"{r['bytes-up'] / 1e6:.2f}", f"{r['accuracy']:.4f}"]
         for r in sorted(federations, key=lambda r: (r["strategy"], r["sites"], r["secagg"]))])


if __name__ == "__main__":
    main()
