"""Time to accuracy (issue: reach the pooled model's accuracy faster than centralized training).

Parts, each resumable (a finished part is read back, not repeated):

    federations  `fedlora simulate`, the default model, the whole of BANKING77, 10 sites at
                 Dirichlet alpha 0.1: as it runs (bf16 autocast where the CPU has it natively,
                 batches grouped by length) and with cpu-bf16=false. Seconds from the command's
                 start until the server's accuracy first reaches --target; accuracy per round.
    centralized  the plain float32 peft loop on the pooled training rows (shuffled batches of
                 32, AdamW, the head trained from its random start: a plain loop has no
                 closed-form head), scored on the test split every --eval-every steps; its clock
                 counts loading, tokenising and training, not the scoring.
    make-run     `make run`'s command at this commit and at --before (a git worktree of that
                 commit, run with this venv, removed afterwards): seconds to --target and in
                 all.

Writes results.json and results.md under --out (default runs/bench-time-to-accuracy).

    .venv/bin/python bench/time_to_accuracy.py --data ../shared/data/banking77
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from head import MAKE_RUN, MAKE_RUN_CONFIG  # noqa: E402, I001  (bench/head.py: make run's)
from results import load_results, markdown_table, store_results, store_text  # noqa: E402

FEDERATION = ["--num-clients", "10", "--partition", "dirichlet", "--alpha", "0.1"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/banking77"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-time-to-accuracy"))
    parser.add_argument("--parts", nargs="+", default=["federations", "centralized", "make-run"])
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=50, help="centralized: steps")
    parser.add_argument("--max-epochs", type=int, default=3, help="centralized: gives up after")
    parser.add_argument("--before", default="8e18888", help="make-run: the commit to compare")
    args = parser.parse_args()
    out = Path(args.out)
    _, results = load_results(out, "results.json")
    jobs = {
        "federation, bf16 where native (default)": ("federations", lambda: federation(
            args, out / "federation-default", FEDERATION + ["--rounds", str(args.rounds)],
            "label-column=category")),
        "federation, cpu-bf16=false": ("federations", lambda: federation(
            args, out / "federation-float32", FEDERATION + ["--rounds", str(args.rounds)],
            "label-column=category cpu-bf16=false")),
        "centralized plain loop, float32": ("centralized", lambda: centralized(args)),
        "make run, this commit": ("make-run", lambda: federation(
            args, out / "make-run", MAKE_RUN, MAKE_RUN_CONFIG)),
        f"make run, commit {args.before}": ("make-run", lambda: federation(
            args, out / "make-run-before", MAKE_RUN, MAKE_RUN_CONFIG,
            code=worktree(args.before, out / "before"))),
    }
    for key, (part, job) in jobs.items():
        if part in args.parts and key not in results:
            print(f"== {key}", flush=True)
            results[key] = job()
            store_results(out, "results.json", results)
    if (out / "before").exists():  # the earlier commit's checkout is not kept
        subprocess.run(["git", "worktree", "remove", "--force", str(out / "before")], cwd=ROOT,
                       check=False, capture_output=True)
    store_text(out, "results.md", report(results, args.target))
    print(report(results, args.target))


def federation(args, run_dir: Path, flags: list[str], run_config: str,
               code: Path = ROOT) -> dict:
    """`fedlora simulate` from `code`; the seconds from its start to each round's line in
    metrics.jsonl, read as the run writes it."""
    import shutil

    # Both absolute: the command runs in `code`, read here.
    run_dir, data = run_dir.resolve(), str(Path(args.data).resolve())
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(code))  # another commit's code before this venv's
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--data", data,
               *flags, "--out", str(run_dir), "--run-config", run_config]
    started = time.time()
    proc = subprocess.Popen(command, cwd=code, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(0.25)
        for row in _complete_rows(metrics):
            seen.setdefault(row["round"], time.time() - started)
    total = time.time() - started
    for row in _complete_rows(metrics):
        seen.setdefault(row["round"], total)
    if proc.returncode:
        raise SystemExit(f"{run_dir.name} failed: {proc.stderr.read()[-2000:]}")
    rows = _complete_rows(metrics)
    accuracy = [row["server"]["accuracy"] for row in rows]
    reached = next((seen[row["round"]] for row in rows
                    if row["server"]["accuracy"] >= args.target), None)
    return {"accuracy": accuracy, "seconds-at-round": [seen[row["round"]] for row in rows],
            "seconds-to-target": reached, "seconds": total}


def _complete_rows(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    lines = metrics.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1] if line]  # the last: being written


def worktree(commit: str, folder: Path) -> Path:
    if not (folder / "pyproject.toml").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=ROOT,
                       check=True, capture_output=True)
    return folder


def centralized(args) -> dict:
    """The plain loop on the pooled rows until the test accuracy reaches the target."""
    import torch
    from throughput import plain_step  # bench/throughput.py: the same plain loop

    from common.config import FedLoraConfig
    from common.data import batches, load_splits, resolve_labels, tokenize
    from common.metrics import evaluate_examples
    from common.model import build_lora_model

    torch.set_num_threads(2)  # as a site, and the federation's sites together, have here
    clock = time.perf_counter()
    cfg = FedLoraConfig(data=args.data, label_column="category", head_mode="train")
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits)
    lora = build_lora_model(cfg, labels)
    pad = lora.tokenizer.pad_token_id
    train = tokenize(splits.train, lora.tokenizer, cfg, labels)
    test = tokenize(splits.test, lora.tokenizer, cfg, labels)
    params = [p for p in lora.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    elapsed, step, history = time.perf_counter() - clock, 0, []
    for epoch in range(args.max_epochs):
        for batch in batches(train, cfg.batch_size, pad, shuffle_seed=epoch, by_length=False):
            started = time.perf_counter()
            plain_step(lora.model, batch, params, optimizer, cfg)
            elapsed += time.perf_counter() - started
            step += 1
            if step % args.eval_every:
                continue
            score = evaluate_examples(lora.model, test, batch_size=64, pad_id=pad,
                                      device=lora.device, classification=True)["accuracy"]
            history.append({"step": step, "epoch": step * cfg.batch_size / len(train),
                            "seconds": elapsed, "accuracy": score})
            print(history[-1], flush=True)
            if score >= args.target:
                return {"history": history, "seconds-to-target": elapsed,
                        "accuracy": [h["accuracy"] for h in history]}
    return {"history": history, "seconds-to-target": None,
            "accuracy": [h["accuracy"] for h in history]}


def report(results: dict, target: float) -> str:
    rows = []
    for key, result in results.items():
        reached = result.get("seconds-to-target")
        rows.append([key, f"{reached:.0f}" if reached is not None else "not reached",
                     f"{max(result['accuracy']):.4f}", f"{result['accuracy'][-1]:.4f}",
                     f"{result['seconds']:.0f}" if "seconds" in result else "-"])
    return markdown_table(["run", f"s to {target:.0%}", "best accuracy", "last accuracy",
                           "command s"], rows)


if __name__ == "__main__":
    main()
