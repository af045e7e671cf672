"""Deployment against simulation (issue 21): the same federation run three ways on loopback:
`fedlora simulate`; a real deployment (TLS SuperLink with SuperNode authentication, one
authenticated SuperNode per site, `flwr run`), where every message starts a ClientApp process
that loads the model again; and the same deployment with a resident runtime (`fedlora site`)
beside each SuperNode.

Data: BANKING77's train split, --rows rows drawn with seed 0, dealt out to the sites in turn
(each site's file in the deployments; the same pool partitioned iid by the simulation); the
server scores --eval-rows rows of the test split. Measured per run, from metrics.jsonl:
- the steady round (rounds 2 to N: round 1 pays for first loads) and its ratio to the
  simulation's;
- the per-message overhead: a round's train exchange (from sending the messages to the last
  reply) minus the slowest site's training seconds (measured inside the site);
- each kind of process's peak resident memory (sampled every 0.5 s; a process tree's parts
  counted apart: the SuperNode, each ClientApp, the runtime; Ray's workers).
Each process's output is kept in the run's `-processes` folder, every line behind the
time.time() it was printed at (the SuperNode's "Receiving"/"Sent", the runtime's "answered in",
`flwr run`'s lines): where a message's seconds go.
Mode exec-poll: each SuperNode's SuperExec asks for ClientApps to start every 0.05 s
(FLWR_SUPEREXEC_TASK_POLL_INTERVAL) instead of Flower's 1 s. Mode fedlora-supernode: each site
runs `fedlora supernode` (Flower's SuperNode looking for messages every --poll-interval s, and
its SuperExec every 0.1 s) instead of `flower-supernode` (3 s, 1 s). Mode unpacked: the run
sends each array as objects of its own (packed-arrays=false), as before fedlora packed them.
Mode in-process: `fedlora supernode --in-process`, whose own thread runs each message's
ClientApp (which forwards it to the runtime) instead of a new process per message. Mode
memory-state: the SuperLink keeps its state in memory (Flower's default: no `--database`)
instead of in an SQLite file.
With --model causal-lm, bench/causal_lm.py's ~100M-parameter Llama-style model (random weights)
learns BANKING77's intent names as responses to the queries.
Resumable. Writes deployment.json and deployment.md under --out.

    .venv/bin/python bench/deployment.py --data ../shared/data/banking77
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import load_results, markdown_table, store_results, store_text  # noqa: E402

from server.outputs import RunDirectory  # noqa: E402

BIN = Path(sys.executable).parent
# 3s-poll: the runtime with Flower's own reply polling (every 3 s), as before reply-poll-interval.
# exec-poll: the runtime with each SuperNode's SuperExec looking for messages to start a ClientApp
# for every 0.05 s instead of Flower's 1 s (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, a Flower setting).
MODES = ("simulation", "deployment", "deployment+runtime", "deployment+runtime+3s-poll",
         "deployment+runtime+exec-poll", "deployment+runtime+fedlora-supernode",
         "deployment+runtime+fedlora-supernode+unpacked",
         "deployment+runtime+fedlora-supernode+in-process",
         "deployment+runtime+fedlora-supernode+in-process+memory-state")
SUPEREXEC_POLL_SECONDS = "0.05"
# Which kind of process a command line is: the first pattern it contains.
KINDS = [("bin/flwr run ", "flwr run"), ("flwr-clientapp", "ClientApp"),
         ("flwr-serverapp", "ServerApp"),
         ("superexec", "SuperExec"), ("flower-supernode", "SuperNode"),
         (" supernode ", "SuperNode"),
         ("flower-superlink", "SuperLink"), (" site ", "site runtime"),
         ("ray::", "Ray worker"), ("raylet", "Ray (raylet, GCS)"), ("gcs_server",
         "Ray (raylet, GCS)"), ("simulate", "simulation driver")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessMeter:
    """Samples every process under some roots, by kind of process: its peak resident memory and
    the CPU seconds each has used (as last sampled: a process that lives less than the 0.5 s
    between samples, or its last 0.5 s, is missed)."""

    def __init__(self) -> None:
        self.roots: list[int] = []
        self.peaks: dict[str, float] = {}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds so far)
        self.series: list[tuple[float, dict[str, float]]] = []  # (time, cpu_seconds()) a sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            for root in list(self.roots):
                try:
                    tree = [psutil.Process(root)]
                    tree += tree[0].children(recursive=True)
                except psutil.Error:
                    continue
                for proc in tree:
                    try:
                        command = " ".join(proc.cmdline())
                        rss = proc.memory_info().rss / 2**20
                        times = proc.cpu_times()
                    except psutil.Error:
                        continue
                    kind = next((k for pattern, k in KINDS if pattern in command), None)
                    if kind:
                        self.peaks[kind] = max(self.peaks.get(kind, 0.0), rss)
                        self.cpu[proc.pid] = (kind, times.user + times.system)
            self.series.append((time.time(), self.cpu_seconds()))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v) for k, v in sorted(self.peaks.items())}

    def cpu_seconds_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by kind of process from the last sample before `start` to the first
        after `end` (at most 0.5 s more on each side)."""
        first = next((c for t, c in reversed(self.series) if t <= start), {})
        last = next((c for t, c in self.series if t >= end), self.series[-1][1])
        return {k: round(v - first.get(k, 0.0), 1) for k, v in last.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds by kind of process, all of its processes together."""
        totals: dict[str, float] = {}
        for kind, seconds in self.cpu.values():
            totals[kind] = totals.get(kind, 0.0) + seconds
        return {k: round(v, 1) for k, v in sorted(totals.items())}


class Processes:
    """Started in their own sessions; stop_all() ends them and whatever they spawned."""

    def __init__(self, env: dict, logs: Path, meter: ProcessMeter) -> None:
        self.env, self.logs, self.meter, self.started = env, logs, meter, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Its output in NAME.log, each line behind the time.time() it was read at: where a
        message's seconds go is read off the SuperNode's, the runtime's and the run's logs."""
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop_all)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        threading.Thread(target=stamp_lines, args=(proc.stdout, log), daemon=True).start()
        self.started.append((proc, log))
        self.meter.roots.append(proc.pid)
        return proc

    def stop_all(self) -> None:
        import signal

        for proc, log in self.started:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            log.close()


def stamp_lines(source, log) -> None:
    try:
        for line in iter(source.readline, b""):
            log.write(f"{time.time():.3f} ".encode() + line)
            log.flush()
    except ValueError:  # the log was closed: the process was stopped
        pass


def run(env: dict, *args: str) -> str:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise SystemExit(f"{' '.join(args[:3])} failed: {result.stderr[-2000:]}")
    return result.stdout


def prepare_data(args, sites: int, folder: Path) -> None:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(Path(args.data) / "train.csv").sample(n=args.rows, random_state=0)
    test = pd.read_csv(Path(args.data) / "test.csv").sample(n=args.eval_rows, random_state=0)
    if args.model == "causal-lm":
        train = train.rename(columns={"text": "prompt", "category": "response"})
        test = test.rename(columns={"text": "prompt", "category": "response"})
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    for site in range(sites):
        train.iloc[site::sites].to_csv(folder / f"site-{site}.csv", index=False)


def model_of(args, folder: Path) -> str:
    """The run's `model` value (what a runtime's --model must match)."""
    return str(folder.parent / "model") if args.model == "causal-lm" else "default"


def run_config(args, folder: Path) -> str:
    common = (f"local-epochs=1 max-eval-examples={args.eval_rows} "
              f"max-train-examples={args.rows} model='{model_of(args, folder)}'")
    if args.model == "causal-lm":
        return f"{common} task='causal-lm' max-length=32 lora-target-modules='q_proj,v_proj'"
    return f"{common} label-column='category'"


def simulation(args, sites: int, folder: Path, out: Path) -> dict:
    meter = ProcessMeter()
    proc = subprocess.Popen([str(BIN / "fedlora"), "simulate", "--data", str(folder),
                             "--num-clients", str(sites), "--rounds", str(args.rounds),
                             "--partition", "iid", "--out", str(out), "--run-config",
                             run_config(args, folder)], cwd=ROOT, stdout=subprocess.DEVNULL)
    meter.roots.append(proc.pid)
    if proc.wait():
        raise SystemExit(f"fedlora simulate failed ({out})")
    return {"peak-mib": meter.stop(), "cpu-seconds": meter.cpu_seconds(),
            "steady-round-cpu-seconds": steady_round_cpu(meter, out)}


def deployment(args, sites: int, folder: Path, out: Path, mode: str) -> dict:
    """One of MODES but the simulation; the mode's parts say what differs (see the top)."""
    with_runtime, fedlora_supernode = "runtime" in mode, "fedlora-supernode" in mode
    flower_poll, exec_poll = mode.endswith("3s-poll"), mode.endswith("exec-poll")
    unpacked, in_process = "+unpacked" in mode, "+in-process" in mode
    memory_state = "+memory-state" in mode
    work = out.parent / f"{out.name}-processes"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_HOME=str(work / "flwr_home"),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    if exec_poll:  # the SuperNode passes its environment on to the SuperExec it starts
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = SUPEREXEC_POLL_SECONDS
    names = [f"site-{i}" for i in range(sites)]
    if not (work / "keys").exists():
        run(env, "fedlora", "certs", "--out", str(work / "certs"), "--san", "127.0.0.1")
        run(env, "fedlora", "certs", "--out", str(work / "keys"),
            *[a for n in names for a in ("--site", n)])
    meter = ProcessMeter()
    procs = Processes(env, work, meter)
    sockets = tempfile.mkdtemp(prefix="fedlora-bench-")
    port = free_port()
    certs = work / "certs"
    try:
        procs.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
                    "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile",
                    str(certs / "server.key"), "--enable-supernode-auth",
                    *([] if memory_state else ["--database", str(work / "superlink.db")]),
                    "--host", "127.0.0.1", "--port", str(port),
                    "--disable-runtime-dependency-installation")
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("the SuperLink did not start") from None
                time.sleep(0.5)
        run(env, "fedlora", "connect", "bench", "--address", f"127.0.0.1:{port}", "--ca",
            str(certs / "ca.crt"))
        for name in names:
            run(env, "flwr", "supernode", "register", str(work / "keys" / f"{name}.pub"),
                "bench")
        for name in names:
            data = folder / f"{name}.csv"
            node_config = f"data-path='{data}'"
            if with_runtime:
                # AF_UNIX paths are short (108 bytes): a short folder, not the run's own
                sock = Path(sockets) / f"{name}.sock"
                procs.start(f"{name}-runtime", "fedlora", "site", "--data", str(data),
                            "--socket", str(sock), "--model", model_of(args, folder))
                deadline = time.time() + 120
                while not sock.exists():
                    if time.time() > deadline:
                        raise SystemExit(f"{name}'s runtime did not start")
                    time.sleep(0.2)
                node_config = f"site-runtime='{sock}'"
            supernode = ["fedlora", "supernode", "--poll-interval", str(args.poll_interval),
                         *(["--in-process"] if in_process else [])] \
                if fedlora_supernode else ["flower-supernode"]
            procs.start(name, *supernode, "--superlink", f"127.0.0.1:{port}",
                        "--root-certificates", str(certs / "ca.crt"),
                        "--auth-supernode-private-key", str(work / "keys" / f"{name}.key"),
                        "--node-config", node_config, "--port", str(free_port()))
        overrides = (f"{run_config(args, folder)} eval-data='{folder / 'test.csv'}' "
                     f"num-rounds={args.rounds} out-dir='{out}'"
                     f"{' reply-poll-interval=0' if flower_poll else ''}"
                     f"{' packed-arrays=false' if unpacked else ''}")
        started = time.time()
        procs.start("flwr-run", "flwr", "run", ".", "bench", "--stream", "--run-config",
                    overrides).wait(timeout=3600)
        elapsed = time.time() - started
    finally:
        procs.stop_all()
        shutil.rmtree(sockets, ignore_errors=True)
    status = RunDirectory(out).read_summary()["status"]
    if status != "completed":
        raise SystemExit(f"the {out.name} run ended {status}")
    return {"peak-mib": meter.stop(), "cpu-seconds": meter.cpu_seconds(),
            "steady-round-cpu-seconds": steady_round_cpu(meter, out), "flwr-run-seconds": elapsed}


def steady_round_cpu(meter: ProcessMeter, out: Path) -> dict[str, float]:
    """CPU seconds a steady round (rounds 2 on) by kind of process: the steady rounds end when
    the last round's line is written (metrics.jsonl's time) and last as long as their lines say."""
    rounds = RunDirectory(out).read_rounds()[2:]
    end = (out / "metrics.jsonl").stat().st_mtime
    used = meter.cpu_seconds_between(end - sum(r["seconds"] for r in rounds), end)
    return {k: round(v / len(rounds), 2) for k, v in used.items()}


def measure(out: Path) -> dict:
    rounds = RunDirectory(out).read_rounds()
    steady = rounds[2:]
    overhead = [r["train-exchange-seconds"]
                - max(c["train-seconds"] for c in r["train-per-client"]) for r in rounds[1:]]
    metric = "accuracy" if "accuracy" in rounds[-1]["server"] else "loss"
    return {"round-seconds": [r["seconds"] for r in rounds[1:]],
            "steady-round-seconds": statistics.mean(r["seconds"] for r in steady),
            "message-overhead-seconds": overhead,
            "steady-message-overhead-seconds": statistics.median(overhead[1:]),
            "final": {metric: rounds[-1]["server"][metric]}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/banking77"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-deployment"))
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1200, help="training rows, all sites")
    parser.add_argument("--eval-rows", type=int, default=500)
    parser.add_argument("--model", choices=["default", "causal-lm"], default="default")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="fedlora supernode's --poll-interval (mode fedlora-supernode)")
    args = parser.parse_args()
    out = Path(args.out)
    _, results = load_results(out, "deployment.json")
    if args.model == "causal-lm" and not (out / "model").exists():
        from causal_lm import save_model  # bench/causal_lm.py

        save_model(out / "model")
    for sites in args.sites:
        folder = out / f"data-{sites}"
        prepare_data(args, sites, folder)
        for mode in args.modes:
            key = f"{args.model} sites={sites} {mode}"
            if key in results:  # resumable
                continue
            run_dir = out / f"{args.model}-{sites}-{mode.replace('+', '-')}"
            if mode == "simulation":
                extra = simulation(args, sites, folder, run_dir)
            else:
                extra = deployment(args, sites, folder, run_dir, mode)
            results[key] = {"model": args.model, "sites": sites, "mode": mode,
                            **measure(run_dir), **extra}
            if mode != "simulation":
                work = run_dir.parent / f"{run_dir.name}-processes"
                results[key]["train-message-phases"] = message_timeline(work, sites)
            store_results(out, "deployment.json", results)
    store_text(out, "deployment.md", table(results))
    print(table(results))


# Where a train message's seconds go, from the stamped logs: each phase ends at a line.
PHASES = (("wait for the SuperNode's poll", "Receiving: train"),
          ("message pulled by the SuperNode", "Received successfully"),
          ("ClientApp process started", "Start `flwr-clientapp` process"),
          ("runtime reached", None), ("handler (training)", None),
          ("reply back at the SuperNode", "Sending: train"),
          ("reply pushed to the SuperLink", "Sent successfully"))


def message_timeline(work: Path, sites: int) -> dict[str, float]:
    """Median seconds of each phase of the train messages of rounds 2 on, over the sites:
    from the server's "[ROUND r/N]" line (its messages go out) to the SuperNode's "Sent". With
    a runtime, its "answered in D s" line splits the ClientApp's time into reaching the runtime,
    the handler and the way back; without one, the ClientApp's whole time is the handler."""
    import re

    def stamped(name: str) -> list[tuple[float, str]]:
        path = work / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return [(float(t), rest) for t, _, rest in (x.partition(" ") for x in lines)
                if re.fullmatch(r"\d+\.\d+", t)]

    pushed = [t for t, line in stamped("flwr-run") if re.search(r"\[ROUND \d+/\d+\]", line)]
    phases: dict[str, list[float]] = {name: [] for name, _ in PHASES}
    for site in range(sites):
        log = stamped(f"site-{site}")
        answers = [(t, float(m.group(1))) for t, line in stamped(f"site-{site}-runtime")
                   if (m := re.search(r"train message .* answered in ([\d.]+) s", line))]
        starts = [i for i, (_, line) in enumerate(log) if "Receiving: train" in line]
        for k, first in enumerate(starts[1:len(pushed)], start=1):  # round 1 loads; skip it
            marks = {name: next((t for t, line in log[first:] if text in line), None)
                     for name, text in PHASES if text is not None}
            if marks["ClientApp process started"] is None:  # --in-process: no process
                marks["ClientApp process started"] = marks["message pulled by the SuperNode"]
            started = marks["ClientApp process started"]
            if k < len(answers):
                answered, handler = answers[k]
                marks["runtime reached"], marks["handler (training)"] = answered - handler, answered
            else:
                marks["runtime reached"] = started
                marks["handler (training)"] = marks["reply back at the SuperNode"]
            # A SuperExec that polls fast starts the ClientApp before the SuperNode logs the
            # message received: a phase that overlaps the one before it counts 0.
            previous = pushed[k]
            for name, _ in PHASES:
                phases[name].append(max(marks[name] - previous, 0.0))
                previous = max(previous, marks[name])
    return {name: statistics.median(values) for name, values in phases.items() if values}


def table(results: dict) -> str:
    rows = []
    for r in results.values():
        sim = results.get(f"{r['model']} sites={r['sites']} simulation")
        ratio = r["steady-round-seconds"] / sim["steady-round-seconds"] if sim else None
        peaks = ", ".join(f"{k} {v}" for k, v in r["peak-mib"].items())
        rows.append([r["model"], str(r["sites"]), r["mode"],
                     f"{r['steady-round-seconds']:.1f}",
                     f"{ratio:.2f}" if ratio else "",
                     f"{r['steady-message-overhead-seconds']:.1f}",
                     " ".join(f"{k} {v:.4f}" for k, v in r["final"].items()), peaks])
    main_table = markdown_table(["model", "sites", "run as", "steady round s",
                                 "ratio to simulation", "per-message overhead s", "final",
                                 "peak memory MiB by process"], rows)
    timed = [r for r in results.values() if r.get("train-message-phases")]
    if not timed:
        return main_table
    phases = markdown_table(
        ["model", "sites", "run as", *(name for name, _ in PHASES)],
        [[r["model"], str(r["sites"]), r["mode"],
          *(f"{r['train-message-phases'].get(name, 0):.2f}" for name, _ in PHASES)]
         for r in timed])
    caption = "A train message's seconds, median over rounds 2 on and the sites:"
    cpu = markdown_table(["model", "sites", "run as", "CPU seconds by process, whole run",
                          "CPU seconds by process, a steady round"],
                         [[r["model"], str(r["sites"]), r["mode"], ", ".join(
                             f"{k} {v}" for k, v in r.get("cpu-seconds", {}).items()),
                           ", ".join(f"{k} {v}" for k, v in
                                     r.get("steady-round-cpu-seconds", {}).items())]
                          for r in results.values()])
    return f"{main_table}\n\n{caption}\n\n{phases}\n\n{cpu}"


if __name__ == "__main__":
    main()
