"""A run's report (`fedlora report RUN_DIR`): one self-contained HTML page and its plots alone.

    <run_dir>/report.html   every plot embedded as a data: URI, inline CSS, no script; a page
                            that can be mailed or archived and opens the same anywhere
    <run_dir>/plots/*.png   server.png, clients_train_loss.png, clients_accuracy.png (causal LM:
                            clients_loss.png), sites.png (worst and median site), bytes.png,
                            epsilon.png (only when DP was on)

A plot without data is left out. Parts of a round record that are missing or of the wrong type
count as missing: a report of a running or crashed run shows what there is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write_bytes, atomic_write_text
from common.errors import FedLoraError
from server.outputs import RunDirectory, run_status
from server.round_record import (
    PERSONAL_METRICS,
    client_level_epsilon,
    round_epsilon,
    site_epsilon,
    site_spread,
)
from server.round_record import (
    number as _number,
)

# local_only.json's row: each site's LoRA and head trained on its rows alone, for as many
# epochs as the federation's rounds gave it (simulations/baselines.py).
LOCAL_ONLY_TRAINING = "local-only training (each site alone)"
MAX_LEGEND_ENTRIES = 20  # beyond this the legend hides the plot; the caption still names all
MAX_ROUND_TICKS = 12
MB = 1e6


# -- reading the run directory ---------------------------------------------------------------


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    rounds: list[dict]  # sorted by round number
    class_labels: list | None  # labels.json (classification)
    local_only: list[dict] | None = None  # local_only.json: each site trained alone
    status: str = "unknown"  # the summary's, or interrupted (server/outputs.py run_status)

    @property
    def is_causal_lm(self) -> bool:
        return self.config.get("task") == "causal-lm"

    @property
    def quality(self) -> str:
        """The server's headline metric."""
        return "perplexity" if self.is_causal_lm else "accuracy"

    @property
    def site_rows(self) -> str:
        """What the sites scored their evaluation on (config site-eval-rows)."""
        return ("share of the test split" if self.config.get("site-eval-rows") == "test"
                else "validation rows")

    @property
    def local_quality(self) -> str:
        """What a client reports of its local evaluation, plotted per client."""
        return "eval-loss" if self.is_causal_lm else "eval-accuracy"


def read_run(run_dir: str | Path, command: str = "report", wait_for_rounds: bool = False) -> Run:
    """The run in `run_dir`; FedLoraError (one line, starting with `command`) where it is not a
    run directory or a file in it cannot be read. `wait_for_rounds`: a run that has not yet
    recorded a round (no metrics.jsonl, a summary.json) is a run with no rounds."""
    run = RunDirectory(run_dir)
    if not run.path.exists():
        raise FedLoraError(f"{command}: {run.path} does not exist")
    if not run.path.is_dir():
        raise FedLoraError(f"{command}: {run.path} is not a directory")
    required = [run.path / "config.json"]
    if not (wait_for_rounds and (run.path / "summary.json").is_file()):
        required.insert(0, run.metrics_file)
    for path in required:
        if not path.is_file():
            raise FedLoraError(f"{command}: {run.path} is not a run directory (no {path.name})")
    config = _read_json(command, run.path / "config.json", run.saved_config)
    summary = _read_json(command, run.path / "summary.json", run.read_summary)
    labels_file = run.path / "labels.json"
    class_labels = (_read_json(command, labels_file, lambda: json.loads(labels_file.read_text()),
                               list) if labels_file.is_file() else None)
    rounds = _read_rounds(command, run.metrics_file) if run.metrics_file.is_file() else []
    try:
        local_only = run.read_local_only()
    except ValueError as err:
        raise FedLoraError(f"{command}: {run.local_only_file} is not what `fedlora simulate "
                           f"--local-only` writes ({_json_problem(err)})") from None
    return Run(run.path, config, summary, rounds, class_labels, local_only,
               run_status(run.path, summary))


def _read_json(command: str, path: Path, read, expected: type = dict):
    try:
        value = read()
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise FedLoraError(f"{command}: {path} is not valid JSON ({_json_problem(err)})") from None
    if not isinstance(value, expected):
        kind = "a JSON object" if expected is dict else "a JSON list"
        raise FedLoraError(f"{command}: {path} is not {kind}")
    return value


def _read_rounds(command: str, path: Path) -> list[dict]:
    data = path.read_bytes()
    lines = data.splitlines()
    # A last line without its newline is one a writer has not finished (a run writing it, a
    # copy under way): left out if it does not parse, not an error.
    unfinished = not data.endswith(b"\n")
    by_round: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if unfinished and number == len(lines):
                break
            raise FedLoraError(f"{command}: {path} line {number} is not valid JSON "
                               f"({_json_problem(err)})") from None
        if not isinstance(record, dict) or not _is_int(record.get("round")):
            raise FedLoraError(f"{command}: {path} line {number} is not a round record "
                               f"(no integer \"round\")")
        # A round repeated after a crash (recorded, then redone on resume): its last line counts.
        by_round[record["round"]] = record
    return [by_round[r] for r in sorted(by_round)]


def _json_problem(err: ValueError) -> str:
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    if not isinstance(err, json.JSONDecodeError):
        return str(err)
    where = f"column {err.colno}" if err.lineno == 1 else f"line {err.lineno} column {err.colno}"
    return f"{err.msg} ({where})"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _part(record: dict, key: str, kind: type = dict):
    value = record.get(key)
    return value if isinstance(value, kind) else kind()


def _client_entries(record: dict, key: str) -> list[dict]:
    """A round's per-client entries that say which client they are."""
    return [e for e in _part(record, key, list) if isinstance(e, dict) and _is_int(e.get("node"))]


# -- what the plots show ---------------------------------------------------------------------


def client_names(rounds: list[dict]) -> dict[int, str]:
    """node id -> "client i", numbered in the order of the node ids seen over the whole run."""
    nodes = {entry["node"] for record in rounds
             for key in ("train-per-client", "evaluate-per-client")
             for entry in _client_entries(record, key)}
    return {node: f"client {i}" for i, node in enumerate(sorted(nodes), start=1)}


@dataclass
class Series:
    label: str
    rounds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    dashed: bool = False  # a reference level (a budget), not a measurement

    def add(self, round_number: int, value) -> None:
        if (number := _number(value)) is not None:
            self.rounds.append(round_number)
            self.values.append(number)


@dataclass
class Panel:
    ylabel: str
    series: list[Series]
    log_y: bool = False
    from_zero: bool = False  # amounts (bytes, ε): an axis starting elsewhere exaggerates changes


@dataclass
class Plot:
    name: str  # the file's name in plots/, without .png
    title: str
    panels: list[Panel]
    caption: str = ""


def build_plots(run: Run, clients: dict[int, str]) -> list[Plot]:
    candidates = [server_plot(run),
                  per_client_plot(run, clients, "train-per-client", "train-loss",
                                  "clients_train_loss", "Each client's training loss"),
                  per_client_plot(run, clients, "evaluate-per-client", run.local_quality,
                                  f"clients_{run.local_quality.removeprefix('eval-')}",
                                  f"Each client's local {run.local_quality.removeprefix('eval-')}"
                                  " (its own test split)"),
                  sites_plot(run),
                  bytes_plot(run),
                  epsilon_plot(run)]
    # A plot with no data is left out.
    return [p for p in candidates if any(s.values for panel in p.panels for s in panel.series)]


def server_plot(run: Run) -> Plot:
    quality = [Series(run.quality)]
    if not run.is_causal_lm:
        quality.append(Series("macro-F1"))
    loss = Series("loss")
    for record in run.rounds:
        server = _part(record, "server")
        quality[0].add(record["round"], server.get(run.quality))
        if not run.is_causal_lm:
            quality[1].add(record["round"], server.get("macro-f1"))
        loss.add(record["round"], server.get("loss"))
    return Plot("server", "Global adapter on the server's test set",
                [Panel(run.quality, [s for s in quality if s.values], log_y=run.is_causal_lm),
                 Panel("loss", [loss])],
                caption="Round 0 is the adapter before any LoRA training (with a fitted head: "
                        "the head solved from the sites' statistics).")


def per_client_plot(run: Run, clients: dict[int, str], key: str, metric: str, name: str,
                    title: str) -> Plot:
    by_node = {node: Series(name) for node, name in clients.items()}
    for record in run.rounds:
        for entry in _client_entries(record, key):
            by_node[entry["node"]].add(record["round"], entry.get(metric))
    shown = [node for node, s in by_node.items() if s.values]
    caption = "; ".join(f"{clients[node]} = node {node}" for node in shown)
    return Plot(name, title, [Panel(metric, [by_node[node] for node in shown])], caption)


def bytes_plot(run: Run) -> Plot:
    down, up = Series("down (server to clients)"), Series("up (clients to server)")
    for record in run.rounds:
        # Round 0 sends something only with a head round (head-mode fit).
        if record["round"] > 0 or _number(record.get("bytes-up")):
            down.add(record["round"], _scaled(record.get("bytes-down"), 1 / MB))
            up.add(record["round"], _scaled(record.get("bytes-up"), 1 / MB))
    return Plot("bytes", "Bytes sent per round, all clients together",
                [Panel("MB (10⁶ bytes)", [down, up], from_zero=True)])


def sites_plot(run: Run) -> Plot:
    """The worst and the median site on its own validation rows, per round."""
    metric = run.local_quality
    # Under personal-head the same sites also score their personal head and the head they
    # would have alone (local-only, on the base model's features).
    heads = {metric: "", **{key: f"{name.split(' (')[0]}, "
                            for key, name in PERSONAL_METRICS.items()}}
    series = []
    for key, label in heads.items():
        worst, median = Series(f"{label}worst site"), Series(f"{label}median site")
        for record in run.rounds:
            spread = site_spread(record, key, higher_is_better=not run.is_causal_lm)
            if spread is not None:
                worst.add(record["round"], spread[0])
                median.add(record["round"], spread[1])
        if key == metric or worst.values:
            series += [worst, median]
    return Plot("sites", f"Sites on their own {run.site_rows}: worst and median",
                [Panel(metric, series)],
                caption="A federation's model is only as useful as it is to its worst site.")


def epsilon_plot(run: Run) -> Plot:
    dp_sgd = Series("example-level DP at the sites (largest ε of the round's sites)")
    client_level = Series("client-level DP at the server")
    for record in run.rounds:
        dp_sgd.add(record["round"], site_epsilon(record))
        client_level.add(record["round"], client_level_epsilon(record))
    series = [s for s in (dp_sgd, client_level) if s.values]
    # Each budget the run set, drawn as a level line over the rounds that spent ε.
    for key, spent in (("dp-target-epsilon", dp_sgd), ("client-dp-target-epsilon", client_level)):
        if spent.values and (budget := _number(run.config.get(key))):
            series.append(Series(f"budget ({key})", list(spent.rounds),
                                 [budget] * len(spent.rounds), dashed=True))
    return Plot("epsilon", "Privacy spent so far (ε)", [Panel("ε", series, from_zero=True)])


def _scaled(value, factor: float) -> float | None:
    number = _number(value)
    return None if number is None else number * factor


def render_png(plot: Plot) -> bytes:
    # The Agg canvas directly, not pyplot: no global backend switch, no figure left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(plot.panels) + 1.6, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(plot.title)
    for axes, panel in zip(figure.subplots(1, len(plot.panels), squeeze=False)[0], plot.panels):
        draw_panel(axes, panel)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def draw_panel(axes, panel: Panel) -> None:
    from matplotlib.ticker import LogFormatter, MaxNLocator

    for series, color in zip(panel.series, _colors(len(panel.series))):
        axes.plot(series.rounds, series.values, marker="" if series.dashed else "o",
                  markersize=4, linestyle="--" if series.dashed else "-", label=series.label,
                  color=color)
    axes.set_xlabel("round")
    axes.set_ylabel(panel.ylabel)
    axes.grid(alpha=0.3)
    rounds = sorted({r for series in panel.series for r in series.rounds})
    if len(rounds) <= MAX_ROUND_TICKS:
        axes.set_xticks(rounds)  # the default locator puts fractions of a round on short runs
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if panel.log_y:
        axes.set_yscale("log")
        # Plain numbers (20, not 2×10¹); LogFormatter thins the minor ticks' labels.
        axes.yaxis.set_major_formatter(LogFormatter())
        axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    if panel.from_zero:
        axes.set_ylim(bottom=0)
    _legend(axes, panel)


def _colors(count: int) -> list:
    if count <= 10:
        return [f"C{i}" for i in range(count)]  # matplotlib's default cycle
    from matplotlib import colormaps

    # The default cycle has 10 colours: more series would share them.
    return [colormaps["turbo"](i / (count - 1)) for i in range(count)]


def _legend(axes, panel: Panel) -> None:
    count = len(panel.series)
    if count == 0 or count > MAX_LEGEND_ENTRIES:
        return
    if count == 1 and panel.series[0].label == panel.ylabel:
        return  # the axis says it already
    if count <= 3:
        axes.legend(fontsize="small")
    else:  # outside the axes, where it hides no line
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))


# -- the page --------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
       background: #fff; max-width: 1150px; margin: 1.5rem auto; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.5rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 3px 1rem; margin: 0; }
dt { font-weight: 600; }
dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
th:first-child, td:first-child, table.config th, table.config td { text-align: left; }
.status { padding: 1px 8px; border-radius: 4px; font-weight: 600; background: #eee; }
.status.completed { background: #d8f0dc; color: #14532d; }
.status.failed { background: #f9d4d4; color: #7f1d1d; }
.status.running { background: #fbefc4; color: #6b3d0b; }
.status.interrupted { background: #e4e4f7; color: #2e2a6b; }
.error { background: #fdecec; border-left: 4px solid #c62828; padding: 0.5rem 0.75rem; }
.note { background: #f1f5fb; border-left: 4px solid #4a78b5; padding: 0.5rem 0.75rem; }
figure { margin: 1.25rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; margin-top: 4px; }
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; font-size: 0.8rem; }
"""

# Nothing outside the file may load, whatever a value in it says.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_page(run: Run, plots: list[tuple[Plot, bytes]], clients: dict[int, str]) -> str:
    title = f"fedlora run {run.path.name}"
    sections = [header_section(run, clients), summary_section(run),
                plots_section(plots), sites_section(run, clients), rounds_section(run, clients),
                personal_section(run), config_section(run)]
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n")


def header_section(run: Run, clients: dict[int, str]) -> str:
    status = run.status
    configured = run.config.get("num-clients")
    clients = f"{len(clients)} reported" + (f" ({configured} configured)" if configured else "")
    last_round = run.rounds[-1]["round"] if run.rounds else None
    rounds = f"{fmt(last_round)} recorded of {fmt(run.config.get('num-rounds'))}"
    items = [("run", str(run.path.resolve())),
             ("task", fmt(run.config.get("task"))),
             ("model", fmt(run.config.get("model"))),
             ("strategy", fmt(run.config.get("strategy"))),
             ("clients", clients),
             ("rounds", rounds)]
    if run.class_labels is not None:
        items.append(("classes", str(len(run.class_labels))))
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    badge = f'<span class="status {escape(status)}">{escape(status)}</span>'
    return f"<dl><dt>status</dt><dd>{badge}</dd>{rows}</dl>"


def summary_section(run: Run) -> str:
    summary, parts = run.summary, ["<h2>Summary</h2>"]
    if summary.get("status") == "failed":
        parts.append(f'<p class="error"><strong>The run failed:</strong> '
                     f'{escape(fmt(summary.get("error", "no error recorded")))}</p>')
        if summary.get("traceback"):
            parts.append(f"<details><summary>traceback</summary>"
                         f"<pre>{escape(str(summary['traceback']))}</pre></details>")
    elif run.status == "running":
        parts.append('<p class="note">The run has not finished (or was stopped where this '
                     "cannot tell: another machine's run): this shows the rounds recorded so "
                     "far.</p>")
    elif run.status == "interrupted":
        parts.append('<p class="note"><strong>Interrupted:</strong> the process that ran it '
                     "ended before it finished (killed, or its machine stopped). This shows the "
                     "rounds recorded until then; <code>fedlora simulate --resume RUN_DIR</code> "
                     "(or <code>resume=true</code> under <code>flwr run</code>) continues it "
                     "from its last checkpoint.</p>")
    if summary.get("stopped-early"):
        parts.append(f'<p class="note"><strong>Stopped early:</strong> '
                     f'{escape(fmt(summary["stopped-early"]))}</p>')
    parts.append(server_metrics_table(run))
    if summary.get("best-round") is not None:
        metric = str(summary.get("selection-metric", ""))
        value = _part(summary, "best").get(metric)
        parts.append(f"<p><strong>Best round:</strong> {escape(str(summary['best-round']))} "
                     f"({escape(metric)} {escape(fmt(value))}): its adapter is in "
                     f"best_adapter/</p>")
    if isinstance(summary.get("head"), dict):
        head = summary["head"]
        parts.append(f"<p><strong>Head:</strong> {escape(fmt(head.get('mode')))} (reads "
                     f"{escape(fmt(head.get('pooling')))}-pooled features)</p>")
    if (seconds := _number(summary.get("seconds"))) is not None and math.isfinite(seconds):
        parts.append(f"<p>Time: {escape(_duration(seconds))}</p>")
    return "\n".join(parts)


def server_metrics_table(run: Run) -> str:
    if not run.rounds:
        return "<p>No round was recorded.</p>"
    first, last = run.rounds[0], run.rounds[-1]
    initial = _part(run.summary, "initial") or _part(first, "server")
    final = _part(run.summary, "final") or _part(last, "server")
    final_heading = "final" if run.summary.get("status") == "completed" else "last recorded"
    headers = ["server metric", f"initial (round {first['round']})",
               f"{final_heading} (round {last['round']})"]
    names = list(dict.fromkeys([*initial, *final]))
    return html_table(headers, [[name, fmt(initial.get(name)), fmt(final.get(name))]
                            for name in names])


def plots_section(plots: list[tuple[Plot, bytes]]) -> str:
    if not plots:
        return "<h2>Plots</h2>\n<p>Nothing to plot yet.</p>"
    figures = []
    for plot, png in plots:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        caption = f"<figcaption>{escape(plot.caption)}</figcaption>" if plot.caption else ""
        figures.append(f'<figure id="{escape(plot.name)}"><img src="{uri}" '
                       f'alt="{escape(plot.title)}">{caption}</figure>')
    return "<h2>Plots</h2>\n" + "\n".join(figures)


def rounds_section(run: Run, clients: dict[int, str]) -> str:
    local = run.local_quality.removeprefix("eval-")
    with_epsilon = any(round_epsilon(r) is not None for r in run.rounds)
    headers = ["round", f"server {run.quality}", "server loss", "train loss (mean)",
               f"local {local} (mean)", f"worst site's {local}", "clients trained", "MB down",
               "MB up",
               *(["ε"] if with_epsilon else []), "seconds", "dropped"]
    rows = []
    for record in run.rounds:
        server, clients = _part(record, "server"), _part(record, "clients")
        trained = (f"{fmt(clients.get('train-clients-aggregated'))} of "
                   f"{fmt(clients.get('train-clients-sampled'))}"
                   if "train-clients-sampled" in clients else "—")
        rows.append([record["round"], fmt(server.get(run.quality)), fmt(server.get("loss")),
                     fmt(_part(record, "train").get("train-loss")),
                     fmt(_part(record, "evaluate").get(run.local_quality)),
                     fmt(_worst_site(run, record)), trained,
                     fmt(_scaled(record.get("bytes-down"), 1 / MB)),
                     fmt(_scaled(record.get("bytes-up"), 1 / MB)),
                     *([fmt(round_epsilon(record))] if with_epsilon else []),
                     fmt(record.get("seconds")), _dropped(record, clients)])
    return "<h2>Rounds</h2>\n" + html_table(headers, rows)


def _worst_site(run: Run, record: dict) -> float | None:
    spread = site_spread(record, run.local_quality, higher_is_better=not run.is_causal_lm)
    return None if spread is None else spread[0]


def sites_section(run: Run, clients: dict[int, str]) -> str:
    """The last round's sites: how many each phase sampled, kept and left out, and each site's
    example count, training loss and local quality, or why it was dropped; then the data
    checks' totals over every site reported so far."""
    parts = ["<h2>Sites</h2>"]
    last = next((r for r in reversed(run.rounds) if r["round"] > 0), None)
    if last is None:
        parts.append("<p>No site has trained yet.</p>")
    else:
        counts = _part(last, "clients")
        if counts:
            parts.append(f"<p>Round {escape(str(last['round']))}: " + ", ".join(
                f"{escape(key)} {escape(fmt(value))}" for key, value in counts.items()) + "</p>")
        train = {e["node"]: e for e in _client_entries(last, "train-per-client")}
        evaluate = {e["node"]: e for e in _client_entries(last, "evaluate-per-client")}
        dropped = {e["node"]: e for e in _part(last, "dropped", list)
                   if isinstance(e, dict) and _is_int(e.get("node"))}
        local = run.local_quality.removeprefix("eval-")
        rows = [[clients.get(node, f"node {node}"), str(node),
                 fmt(train.get(node, {}).get("num-examples")),
                 fmt(train.get(node, {}).get("train-loss")),
                 fmt(evaluate.get(node, {}).get("num-examples")),
                 fmt(evaluate.get(node, {}).get(run.local_quality)),
                 fmt(dropped[node].get("reason")) if node in dropped else "—"]
                for node in sorted({*train, *evaluate, *dropped})]
        if rows:
            parts.append(html_table(["site", "node", "training rows", "train loss",
                                     run.site_rows, f"local {local}", "dropped"], rows))
    checks = data_check_totals(run)
    if checks:
        rows = [[name, fmt(checks[name])] for name in
                ("sites", "rows", "empty", "duplicates", "too-long", "unknown-labels", "dropped")
                if name in checks]
        parts.append("<h3>Data checks (counts the sites reported)</h3>"
                     + html_table(["check", "rows"], rows))
    return "\n".join(parts)


def data_check_totals(run: Run) -> dict:
    """The data checks' totals: the finished run's, else the last round's so far."""
    if isinstance(run.summary.get("data-checks"), dict):
        return run.summary["data-checks"]
    return next((r["data-checks"] for r in reversed(run.rounds)
                 if isinstance(r.get("data-checks"), dict)), {})


def personal_section(run: Run) -> str:
    """Under personal-head or beside local-only training (`fedlora simulate --local-only`): how
    the sites fare on their own rows with each model, in the last round they were evaluated:
    worst, median, best and mean site."""
    heads = {"eval-accuracy": "global model", **PERSONAL_METRICS}
    evaluated = [r for r in run.rounds if any(
        isinstance(e, dict) and "eval-accuracy" in e
        for e in _part(r, "evaluate-per-client", list))]
    personal = [r for r in evaluated if any(
        isinstance(e, dict) and "eval-personal-accuracy" in e
        for e in _part(r, "evaluate-per-client", list))]
    last = (personal or (evaluated if run.local_only else []) or [None])[-1]
    if last is None:
        return ""
    columns = {name: [v for e in _part(last, "evaluate-per-client", list) if isinstance(e, dict)
                      and (v := _number(e.get(key))) is not None]
               for key, name in heads.items()}
    columns[LOCAL_ONLY_TRAINING] = [v for s in run.local_only or []
                                    if (v := _number(s.get("accuracy"))) is not None]
    rows = [[name, str(len(values)), fmt(min(values)), fmt(statistics.median(values)),
             fmt(max(values)), fmt(statistics.fmean(values))]
            for name, values in columns.items() if values]
    return (f"<h2>Sites by model on their own {run.site_rows} (round {last['round']})</h2>\n"
            + html_table(["model", "sites", "worst", "median", "best", "mean"], rows))


def config_section(run: Run) -> str:
    rows = [[key, value if isinstance(value, str) and value else json.dumps(value)]
            for key, value in run.config.items()]
    return "<h2>Configuration</h2>\n" + html_table(["key", "value"], rows, css_class="config")


def _dropped(record: dict, clients: dict[int, str]) -> str:
    reasons = []
    for entry in _part(record, "dropped", list):
        if isinstance(entry, dict):
            node = entry.get("node")
            who = clients.get(node) if _is_int(node) else None
            reasons.append(f"{who or f'node {fmt(node)}'}: {fmt(entry.get('reason'))}")
    return "; ".join(reasons) or "—"


def html_table(headers: list[str], rows: list[list], css_class: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>\n"
                   for row in rows)
    attribute = f' class="{escape(css_class)}"' if css_class else ""
    return f"<table{attribute}>\n<tr>{head}</tr>\n{body}</table>"


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def escape(text: str) -> str:
    return html.escape(text, quote=True)


# -- the report ------------------------------------------------------------------------------


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write <run_dir>/plots/*.png and the self-contained HTML page (default
    <run_dir>/report.html, or `out`); return the page's path."""
    run = read_run(run_dir)
    page_path = Path(out) if out is not None else run.path / "report.html"
    if page_path.is_dir():
        raise FedLoraError(f"report: --out {page_path} is a directory, not a file")
    clients = client_names(run.rounds)
    plots = [(plot, render_png(plot)) for plot in build_plots(run, clients)]
    for plot, png in plots:
        atomic_write_bytes(run.path / "plots" / f"{plot.name}.png", png)
    atomic_write_text(page_path, render_page(run, plots, clients))
    return page_path
