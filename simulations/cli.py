"""The `fedlora` command. `fedlora simulate` runs a local federation and shows its progress;
`report`, `export` and `evaluate` work on what a run left, `dashboard` shows runs live in a
browser; `fedlora certs`, `fedlora connect`
and `fedlora gateway` (the coordinator's public port) serve a real deployment
(docs/deployment.md)."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import STRATEGIES, FedLoraConfig, build_config
from common.errors import FedLoraError
from simulations.inspect import add_inspect_parser, inspect_command
from simulations.shared_pool import Rows, SharedPool
from simulations.tune import add_tune_parser

if TYPE_CHECKING:  # rich and the server's modules are imported where a command needs them
    from rich.console import Console

    from server.outputs import RunDirectory

# Each look at the SuperLink is one HTTPS request; 0.5 s keeps 100 idle sites under 200 a second.
SUPERNODE_POLL_SECONDS = 0.5
SUPERNODE_POLL_MIN, SUPERNODE_POLL_MAX = 0.01, 3.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise FedLoraError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlora", description="Federated LoRA fine-tuning with Flower.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = commands.add_parser("simulate", help="run a federation of simulated sites locally")
    sim.add_argument("--num-clients", type=int, help="simulated sites (default 10)")
    sim.add_argument("--rounds", type=int, help="federated rounds (default 3)")
    sim.add_argument("--partition", choices=["iid", "dirichlet", "quantity"])
    sim.add_argument("--alpha", type=float, help="Dirichlet concentration for skewed partitions")
    sim.add_argument("--data", help="data file, folder with train/test files, or hub data set")
    sim.add_argument("--model", help="Hugging Face model id or folder ('default': MiniLM-L6)")
    sim.add_argument("--task", choices=["classification", "causal-lm"])
    sim.add_argument("--strategy", choices=list(STRATEGIES),
                     help="aggregation (default fedavg); see docs/strategies.md")
    sim.add_argument("--out", help="run directory (default runs/<timestamp>)")
    sim.add_argument("--seed", type=int)
    sim.add_argument("--client-cpus", type=float, help="CPUs per simulated client (default 1)")
    sim.add_argument("--client-gpus", type=float, help="GPU share per simulated client")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run after its last complete round (its "
                          "config is reused; --rounds may extend it)")
    sim.add_argument("--run-config", action="append", default=[], metavar='"KEY=VALUE ..."',
                     help="any config key, as for flwr run --run-config; may be repeated (a "
                          "later value of a key wins)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.add_argument("--local-only", action="store_true",
                     help="after the run, also train each site alone on its own rows (as many "
                          "epochs as the rounds gave it) and score it on the rows the sites "
                          "scored: the report's local-only row (classification)")
    sim.add_argument("--ray-address", metavar="ADDRESS",
                     help="run the simulated sites on an existing Ray cluster (HOST:PORT of its "
                          "head, or 'auto'); default: a Ray instance of this machine")

    certs = commands.add_parser(
        "certs", help="deployment credentials: CA + SuperLink certificate, site key pairs")
    certs.add_argument("--out", required=True, help="folder for the files")
    certs.add_argument("--san", action="append", default=[], metavar="HOST_OR_IP",
                       help="coordinator: create ca.crt/ca.key and server.crt/server.key for "
                            "this name or IP (repeat for several)")
    certs.add_argument("--site", action="append", default=[], metavar="NAME",
                       help="site: create NAME.key (stays on the site) and NAME.pub (goes to "
                            "the coordinator); repeat for several")
    certs.add_argument("--days", type=int, default=365, help="certificate validity (days)")
    certs.add_argument("--force", action="store_true", help="replace existing files")

    report = commands.add_parser(
        "report", help="one HTML page of a run (plots embedded), and its plots as PNG files")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    report.add_argument("--out", help="the HTML file (default RUN_DIR/report.html)")

    dashboard = commands.add_parser(
        "dashboard", help="a live page of one or more runs in a browser: status, rounds, "
                          "sites, plots")
    dashboard.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                           help="run directories (several: side by side, compared)")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="the address to listen on (default 127.0.0.1); any other needs "
                                "the access token printed at start")
    dashboard.add_argument("--port", type=int, default=8765,
                           help="the port (default 8765; 0: any free one)")
    dashboard.add_argument("--tls-cert", metavar="PEM",
                           help="serve HTTPS with this certificate (e.g. the coordinator's "
                                "server.crt from fedlora certs); with --tls-key")
    dashboard.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")

    export = commands.add_parser(
        "export", help="the final adapter of a run: merged into the base model, or alone")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or adapter folder")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--merged", metavar="OUT", help="the base model with the adapter "
                        "merged in, with its tokenizer: AutoModelFor...from_pretrained(OUT)")
    target.add_argument("--adapter", metavar="OUT", help="the PEFT adapter alone")
    export.add_argument("--model", help="the base model, if not where the run found it")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.add_argument("--personal-head", metavar="PATH", help="a site's personal head (its "
                        "folder or personal_head.safetensors) in place of the global head")

    evaluate = commands.add_parser(
        "evaluate", help="score a saved adapter on a data set, with example predictions")
    evaluate.add_argument("--adapter", required=True, metavar="PATH",
                          help="an adapter folder or a run directory")
    evaluate.add_argument("--data", required=True, metavar="PATH",
                          help="a data file (all of it is used) or a folder (its test split)")
    evaluate.add_argument("--model", help="the base model, if not where the run found it")
    evaluate.add_argument("--personal-head", metavar="PATH", help="a site's personal head (its "
                          "folder or personal_head.safetensors) in place of the global head")
    evaluate.add_argument("--max-examples", type=int, default=0, help="score at most N (0: all)")
    evaluate.add_argument("--examples", type=int, default=5, help="example predictions shown")
    evaluate.add_argument("--run-config", action="append", default=[],
                          metavar='"KEY=VALUE ..."',
                          help="config keys, e.g. the data's text-column or label-column (a run "
                               "directory's own config is used first)")

    add_inspect_parser(commands)
    add_tune_parser(commands)

    connect = commands.add_parser(
        "connect", help="save a SuperLink connection for flwr run / flwr supernode register")
    connect.add_argument("name", help="connection name, e.g. consortium")
    connect.add_argument("--address", required=True, help="the SuperLink's HOST:PORT")
    connect.add_argument("--ca", required=True, help="the federation's ca.crt")
    connect.add_argument("--default", action="store_true", help="make it flwr's default")

    gateway = commands.add_parser(
        "gateway", help="coordinator: the public port, passing only the sites' Fleet API calls "
                        "to a SuperLink bound to 127.0.0.1")
    gateway.add_argument("--listen", default="0.0.0.0:8000", metavar="HOST:PORT",
                         help="where sites connect (default 0.0.0.0:8000)")
    gateway.add_argument("--superlink", default="127.0.0.1:9000", metavar="HOST:PORT",
                         help="the SuperLink's --host:--port (default 127.0.0.1:9000)")
    gateway.add_argument("--certs", required=True, metavar="DIR",
                         help="the folder of fedlora certs --san: ca.crt, server.crt, server.key")
    site = commands.add_parser(
        "site", help="a site: the resident runtime beside its SuperNode, holding the model and "
                     "data across messages")
    site.add_argument("--data", required=True, help="this site's data file or folder")
    site.add_argument("--socket", default=None, metavar="PATH",
                      help="where the SuperNode's ClientApp reaches it (default: "
                           "<tmp>/fedlora-site-<uid>/site.sock)")
    site.add_argument("--model", default=None,
                      help="the model this site agreed to train; a run asking for another is "
                           "refused")
    site.add_argument("--node-config", default="", metavar="'KEY=VALUE ...'",
                      help="this site's settings besides data-path (lora-r, batch-size, device, "
                           "load-in-4bit, gradient-checkpointing)")
    supernode = commands.add_parser(
        "supernode", help="Flower's SuperNode: flower-supernode's own arguments, but looking for "
                          "messages every --poll-interval seconds, not every 3 s")
    supernode.add_argument("--poll-interval", type=float, default=SUPERNODE_POLL_SECONDS,
                           metavar="S", help="seconds between looks at the SuperLink while no "
                           f"message waits, and for the reply (default {SUPERNODE_POLL_SECONDS}; "
                           "Flower's: 3)")
    supernode.add_argument("--in-process", action="store_true",
                           help="run each message's ClientApp in this process (fedlora runs "
                                "only) instead of a new process per message")
    status = commands.add_parser(
        "site-status", help="one line: are this site's SuperNode, runtime and data ready?")
    status.add_argument("--socket", default=None, metavar="PATH",
                        help="the runtime's socket (default: as `fedlora site`'s)")
    status.add_argument("--supernode", default="127.0.0.1:9094", metavar="HOST:PORT",
                        help="the SuperNode's runtime API, its --port (default "
                             "127.0.0.1:9094)")
    return parser


def supernode_command(args: argparse.Namespace, flower_args: list[str]) -> int:
    from common.flower_compat import run_supernode

    if not SUPERNODE_POLL_MIN <= args.poll_interval <= SUPERNODE_POLL_MAX:  # NaN fails too
        raise FedLoraError(f"supernode: --poll-interval must be between {SUPERNODE_POLL_MIN} "
                           f"and {SUPERNODE_POLL_MAX} seconds, not {args.poll_interval}")
    clientapp = None
    if args.in_process:
        from client.entry import app as clientapp
    run_supernode(flower_args, args.poll_interval, clientapp)
    return 0


def site_status_command(args: argparse.Namespace) -> int:
    """Exit 0 and one line when the site is ready; 1 and one line saying what is not."""
    import socket

    from client.site_link import default_socket, request_status

    socket_path = Path(args.socket).expanduser() if args.socket else default_socket()
    host, port = host_port("site-status: --supernode", args.supernode)
    problems, parts = [], []
    try:
        with socket.create_connection((host, port), timeout=5):
            parts.append(f"SuperNode up on {host}:{port}")
    except OSError as err:
        problems.append(f"no SuperNode on {host}:{port} ({err.strerror or err})")
    try:
        status = request_status(socket_path)
    except FedLoraError as err:
        problems.append(str(err))
    else:
        held = ", ".join(f"{s['model']} with {s['train-rows']}+{s['val-rows']} rows"
                         for s in status["resident"]) or "nothing loaded yet"
        parts.append(f"runtime pid {status['pid']} on {socket_path} "
                     f"({'busy, ' if status['busy'] else ''}{status['answered']} messages "
                     f"answered; holds {held})")
        parts.append(f"data {status['data']} ({status['data-rows']} rows)")
    if problems:
        print(f"site not ready: {'; '.join(problems)}")
        return 1
    print(f"site ready: {'; '.join(parts)}")
    return 0


def site_command(args: argparse.Namespace) -> int:
    import logging
    import signal

    from client.site_link import RUNTIME_KEY, default_socket
    from client.site_runtime import SiteRuntime
    from common.config import parse_overrides

    socket_path = Path(args.socket).expanduser() if args.socket else default_socket()
    runtime = SiteRuntime(socket_path, Path(args.data).expanduser(),
                          parse_overrides(args.node_config) if args.node_config else {},
                          args.model)
    runtime.bind()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
    print(f"fedlora site: serving {args.data} on {socket_path}; start the SuperNode with "
          f"--node-config '{RUNTIME_KEY}=\"{socket_path}\"'", flush=True)
    try:
        runtime.serve_forever()
    except KeyboardInterrupt:
        runtime.stop()
    return 0


def certs_command(args: argparse.Namespace) -> int:
    from common.certs import check_before_writing, write_ca_and_server_cert, write_site_keys

    if not args.san and not args.site:
        raise FedLoraError("certs: give --san (coordinator's CA and server certificate) "
                           "and/or --site NAME (a site's key pair)")
    if not 0 < args.days <= 36500:
        raise FedLoraError(f"certs: --days must be between 1 and 36500, got {args.days}")
    out = Path(args.out).expanduser()
    if len(set(args.site)) != len(args.site):
        raise FedLoraError("certs: a --site is named twice")
    check_before_writing(out, args.san, args.site, force=args.force)
    written: list[Path] = []
    if args.san:
        written += write_ca_and_server_cert(out, args.san, force=args.force, days=args.days)
    for site in args.site:
        keys = write_site_keys(out, site, force=args.force)
        written += [keys.private_key, keys.public_key]
    for path in written:
        print(path)
    return 0


def connect_command(args: argparse.Namespace) -> int:
    """Writes [superlink.NAME] into $FLWR_HOME/config.toml with Flower's own code."""
    import re

    import click

    from common.flower_compat import SuperLinkConnection, write_superlink_connection
    from common.flower_compat import set_default_superlink_connection as set_default

    # The name becomes a TOML table under [superlink], beside its `default` key.
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name) or args.name == "default":
        raise FedLoraError(f"connect: connection name {args.name!r} must be letters, digits, "
                           f"'_' or '-' (and not 'default')")
    host_port("connect: --address", args.address)
    ca = Path(args.ca).expanduser().resolve()
    if not ca.is_file():
        raise FedLoraError(f"connect: CA certificate {args.ca!r} does not exist")
    try:
        write_superlink_connection(SuperLinkConnection(
            name=args.name, address=args.address, root_certificates=str(ca)))
        if args.default:
            set_default(args.name)
    except (ValueError, click.ClickException) as err:
        raise FedLoraError(f"connect: {err}") from None
    print(f"saved SuperLink connection {args.name!r} ({args.address}, CA {ca})")
    return 0


def host_port(what: str, address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedLoraError(f"{what} must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def gateway_command(args: argparse.Namespace) -> int:
    from server.fleet_gateway import serve

    listen = host_port("gateway: --listen", args.listen)
    superlink = host_port("gateway: --superlink", args.superlink)
    if listen == superlink:
        raise FedLoraError("gateway: --listen and --superlink are the same address; bind the "
                           "SuperLink to another port (flower-superlink --host 127.0.0.1 "
                           "--port 9000)")
    certs = Path(args.certs).expanduser()
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (certs / name).is_file():
            raise FedLoraError(f"gateway: {certs / name} does not exist (fedlora certs --out "
                               f"{certs} --san HOST makes it)")
    serve(listen, superlink, certs)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from server.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def dashboard_command(args: argparse.Namespace) -> int:
    from server.dashboard import Dashboard

    if not 0 <= args.port <= 65535:
        raise FedLoraError(f"dashboard: --port {args.port} is not a port (0-65535)")
    dashboard = Dashboard(args.run_dirs, host=args.host, port=args.port,
                          tls_cert=args.tls_cert, tls_key=args.tls_key)
    print(f"fedlora dashboard of {len(dashboard.paths)} run(s): {dashboard.url}", flush=True)
    if dashboard.token:
        print("Anyone with this link (it holds the access token) sees the runs: share it like a "
              "password" + ("." if dashboard.tls else "; this is plain HTTP: across networks add "
                            "--tls-cert/--tls-key, or use an SSH tunnel."), flush=True)
    dashboard.serve()
    return 0


def export_command(args: argparse.Namespace) -> int:
    from common.adapters import read_saved_adapter
    from server.export import export_adapter, export_merged

    saved = read_saved_adapter(args.run_dir, args.model, args.personal_head)
    if args.merged:
        out = export_merged(saved, args.merged, force=args.force)
        print(f"merged model: {out} (load with AutoModelFor"
              f"{'SequenceClassification' if saved.task == 'classification' else 'CausalLM'}"
              f".from_pretrained)")
    else:
        out = export_adapter(saved, args.adapter, force=args.force)
        print(f"adapter: {out} (base model {saved.base_model})")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from common.adapters import read_saved_adapter
    from server.evaluation import evaluate_saved_adapter

    if args.max_examples < 0 or args.examples < 0:
        raise FedLoraError("evaluate: --max-examples and --examples must not be negative")
    saved = read_saved_adapter(args.adapter, args.model, args.personal_head)
    data = Path(args.data).expanduser()
    if not data.exists():
        raise FedLoraError(f"evaluate: data {args.data!r} does not exist")
    known = FedLoraConfig().to_run_config()
    cfg = build_config({k: v for k, v in saved.run_config.items() if k in known},
                       overrides=args.run_config,
                       flags={"task": saved.task, "eval-data": str(data.resolve()),
                              "resume": False, "max-eval-examples": args.max_examples})
    console = Console()
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("scoring", total=None)
        result = evaluate_saved_adapter(
            saved, cfg, num_examples=args.examples,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    table = Table(title=f"{saved.path} on {data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if result.examples:
        examples = Table(title="example predictions", show_lines=True)
        for column in ("input", "reference", "prediction"):
            examples.add_column(column, overflow="fold")
        for example in result.examples:
            examples.add_row(example["input"], example["reference"], example["prediction"])
        console.print(examples)
    return 0


def tune_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from simulations import runner
    from simulations.tune import check_space, tune

    space = check_space(args)
    out = Path(args.out).expanduser().resolve()
    base = prepare_simulation_config(build_config(
        overrides=args.run_config,
        flags={"data": args.data, "num-clients": args.num_clients, "num-rounds": args.rounds,
               "partition": args.partition, "alpha": args.alpha,
               "out-dir": str(out / "trial-000"), "resume": False}))
    preflight(base)
    console = Console()
    console.print(f"[bold]fedlora[/] tune: {args.trials} trials of {base.num_clients} sites x "
                  f"{base.num_rounds} rounds, objective best {base.selection_key}, study "
                  f"{out / 'study.db'}", soft_wrap=True)

    def show(trial) -> None:
        value = "" if trial.value is None else f" {base.selection_key} {trial.value:.4f}"
        console.print(f"trial {trial.number}: {trial.state.name.lower()}{value} "
                      f"{trial.params}", highlight=False, soft_wrap=True)

    from common.flower_compat import update_console_handler

    update_console_handler(level=logging.WARNING)
    tune(base, out, args.trials, space, simulate=lambda cfg: runner.simulate(cfg),
         study_name=args.study_name, pruner_warmup=args.prune_after, on_trial=show)
    console.print((out / "summary.md").read_text(), highlight=False, soft_wrap=True)
    if (out / "best.toml").exists():
        console.print(f"best config: {out / 'best.toml'} (fedlora simulate --run-config "
                      f"{out / 'best.toml'}, or flwr run . --run-config {out / 'best.toml'})",
                      highlight=False, soft_wrap=True)
    return 0


def config_from_args(args: argparse.Namespace) -> FedLoraConfig:
    resumed: dict = {}
    if args.resume:
        from server.outputs import RunDirectory

        if not (Path(args.resume) / "config.json").is_file():
            raise FedLoraError(f"nothing to resume: {args.resume} is not a run directory")
        resumed = {**RunDirectory(args.resume).config_to_resume(),
                   "resume": True, "out-dir": str(Path(args.resume).resolve())}
    cfg = build_config(resumed, overrides=args.run_config, flags={
        "num-clients": args.num_clients, "num-rounds": args.rounds,
        "partition": args.partition, "alpha": args.alpha, "data": args.data,
        "model": args.model, "task": args.task, "strategy": args.strategy,
        "out-dir": args.out, "seed": args.seed,
        "client-num-cpus": args.client_cpus, "client-num-gpus": args.client_gpus})
    return prepare_simulation_config(cfg)


def prepare_simulation_config(cfg: FedLoraConfig) -> FedLoraConfig:
    """Absolute paths (Ray workers have other working directories), a run directory, and
    minimum client counts no larger than the federation."""
    from server.outputs import default_run_dir

    data = cfg.data_source
    if Path(data).expanduser().exists():
        data = str(Path(data).expanduser().resolve())
    model = cfg.model
    if model != "default" and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    out_dir = Path(cfg.out_dir or default_run_dir()).expanduser().resolve()
    n = cfg.num_clients
    return cfg.replace(data=data, model=model, out_dir=str(out_dir),
                       min_train_clients=min(cfg.min_train_clients, n),
                       min_evaluate_clients=min(cfg.min_evaluate_clients, n),
                       min_available_clients=min(cfg.min_available_clients, n))


def preflight(cfg: FedLoraConfig) -> SharedPool:
    """Find bad input (data, columns, model, partition sizes) before the run starts. What was
    read and partitioned is returned, for the client processes (simulations/shared_pool.py)."""
    from common.config import check_resumable
    from common.data import columns, load_splits, resolve_labels
    from common.data_checks import check_pool
    from common.model import (
        check_rank_fits,
        load_model_config,
        resolve_pooling,
        target_modules_for,
    )
    from common.partitioning import partition_indices
    from server.outputs import RunDirectory, check_new_run_dir, check_not_in_use
    from server.strategies import check_privacy_fits_strategy, resolve_head_mode

    if cfg.resume:
        check_resumable(RunDirectory(cfg.out_dir).config_to_resume(), cfg)
    elif cfg.out_dir:
        check_new_run_dir(cfg.out_dir)
    if cfg.out_dir and Path(cfg.out_dir).is_dir():
        check_not_in_use(cfg.out_dir)
    check_privacy_fits_strategy(cfg)
    model_config = load_model_config(cfg)
    target_modules_for(cfg, model_config.model_type)
    check_rank_fits(cfg, model_config)
    resolve_head_mode(cfg, resolve_pooling(cfg) if cfg.is_classification else None)
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits) if cfg.is_classification else None
    check_pool(cfg, splits, labels)  # a refuse policy stops the run before anything starts
    partitions = partition_indices(splits.train, cfg)
    return SharedPool(Rows(*columns(splits.train, "text", "target")), labels, partitions)


def simulate_command(cfg: FedLoraConfig, verbose: bool, ray_address: str | None = None,
                     local_only: bool = False) -> int:
    from rich.console import Console

    from server.outputs import RunDirectory
    from simulations.progress import RoundProgress
    from simulations.runner import simulate, start_ray_during

    if local_only and not cfg.is_classification:
        raise FedLoraError("--local-only compares the sites' accuracy: classification only, "
                           f"not task {cfg.task}")
    console = Console(stderr=False)
    # Ray starts while the input is checked (seconds each); bad input stops it again.
    start_ray_during(lambda: preflight(cfg), cfg, ray_address)
    if not verbose:
        from common.flower_compat import update_console_handler

        update_console_handler(level=logging.WARNING)
    run = RunDirectory(cfg.out_dir)
    console.print(f"[bold]fedlora[/] simulate: {cfg.num_clients} clients, {cfg.num_rounds} "
                  f"rounds, {cfg.partition} partition, model {cfg.model}, run directory {run.path}",
                  soft_wrap=True)
    started = time.time()
    failure: BaseException | None = None
    with RoundProgress(run, cfg, console) as progress:
        worker = threading.Thread(target=progress.follow, daemon=True)
        worker.start()
        try:
            simulate(cfg, verbose=verbose, ray_address=ray_address)
        except BaseException as err:  # reported below from the run's own summary
            failure = err
        finally:
            progress.stop()
            worker.join()
    summary = run.read_summary()
    if failure is not None or summary.get("status") != "completed":
        reason = summary.get("error") or (f"{type(failure).__name__}: {failure}" if failure
                                          else "the run did not complete")
        if isinstance(failure, FedLoraError) and failure.__cause__ is None:
            reason = str(failure)
        print(f"fedlora: error: run failed: {reason.splitlines()[0]}", file=sys.stderr)
        return 1
    progress.print_summary(time.time() - started)
    if summary.get("best-round") is not None:
        metric = summary["selection-metric"]
        console.print(f"best round: {summary['best-round']} ({metric} "
                      f"{summary['best'].get(metric, float('nan')):.4f}), adapter in "
                      f"{run.path / 'best_adapter'}", highlight=False, soft_wrap=True)
    if summary.get("stopped-early"):
        console.print(f"[yellow]stopped after round {summary['rounds']}:[/] "
                      f"{summary['stopped-early']}", soft_wrap=True)
    if local_only:
        # As many rounds' local training as the federation had (fewer if it stopped early).
        rounds = int(summary.get("rounds") or cfg.num_rounds)
        train_each_site_alone(cfg.replace(num_rounds=rounds), run, console)
    return 0


def train_each_site_alone(cfg: FedLoraConfig, run: RunDirectory, console: Console) -> None:
    """--local-only: the sites trained alone, written to the run directory for the report."""
    from rich.progress import Progress

    from simulations.baselines import each_local_only_site

    sites = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("local-only: each site trains alone", total=cfg.num_clients)
        for site in each_local_only_site(cfg):
            sites.append(site)
            progress.advance(task)
    run.write_local_only(sites, cfg.num_rounds)
    accuracies = [s["accuracy"] for s in sites]
    if not accuracies:
        console.print("local-only: no site has rows to score", highlight=False)
        return
    console.print(f"local-only: worst site {min(accuracies):.4f}, median "
                  f"{statistics.median(accuracies):.4f} (each site trained alone, on the rows "
                  f"its evaluation scores), in {run.local_only_file}", highlight=False,
                  soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    from common.flower_compat import check_flower_version

    check_flower_version()  # an unsupported Flower: one line, before anything else
    try:
        # flower-supernode's arguments pass through `fedlora supernode` unread.
        args, unread = build_parser().parse_known_args(argv)
        if args.command == "supernode":
            return supernode_command(args, unread)
        if unread:
            raise FedLoraError(f"unrecognized arguments: {' '.join(unread)}")
        if args.command == "simulate":
            return simulate_command(config_from_args(args), args.verbose, args.ray_address,
                                    local_only=args.local_only)
        commands = {"certs": certs_command, "connect": connect_command,
                    "gateway": gateway_command, "site": site_command,
                    "site-status": site_status_command,
                    "report": report_command, "dashboard": dashboard_command,
                    "export": export_command,
                    "evaluate": evaluate_command, "tune": tune_command,
                    "inspect": inspect_command}
        return commands[args.command](args)
    except FedLoraError as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
