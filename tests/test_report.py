"""`fedlora report`: the HTML page and the PNG plots of run directories built by hand."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import FedLoraError
from server.report import read_run, sites_plot, write_report

# Sorted, these are client 1, 2, 3; written out of order on purpose.
NODES = [9_100_000_000_000_000_003, 1_224_110_483_190_152_785, 5_000_000_000_000_000_002]
CLIENT_1 = 1_224_110_483_190_152_785
FINAL_ACCURACY = 0.625
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
C0_BLUE, C1_ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def _server(task: str, r: int) -> dict:
    loss = 3.5 - 0.8 * r
    if task == "causal-lm":
        return {"loss": loss, "perplexity": float(np.exp(loss)), "num-examples": 200}
    accuracy = [0.05, 0.3, 0.5, FINAL_ACCURACY][r]
    return {"accuracy": accuracy, "macro-f1": accuracy * 0.8, "loss": loss,
            "eval-seconds": 7.9, "num-examples": 1000}


def _round(task: str, r: int, dp_sgd: bool, client_dp: bool) -> dict:
    record = {"round": r, "server": _server(task, r), "train": {}, "train-per-client": [],
              "evaluate": {}, "evaluate-per-client": [], "bytes-down": 0, "bytes-up": 0,
              "bytes-down-per-client": 0, "bytes-up-per-client": 0, "clients": {},
              "dropped": [], "seconds": 12.5}
    if r == 0:
        return record
    local = "eval-loss" if task == "causal-lm" else "eval-accuracy"
    for i, node in enumerate(NODES):
        train = {"node": node, "train-loss": 4.0 - 0.5 * r - 0.2 * i, "num-examples": 900,
                 "train-seconds": 20.1, "train-started-at": 1795524988.6}
        if dp_sgd:
            train["dp-epsilon"] = 0.4 * r + 0.05 * i
        record["train-per-client"].append(train)
        evaluation = {"node": node, "eval-loss": 4.3 - 0.3 * r - 0.1 * i, "num-examples": 100.0,
                      "eval-seconds": 1.4}
        if task == "causal-lm":
            evaluation["eval-perplexity"] = float(np.exp(evaluation["eval-loss"]))
        else:
            evaluation.update({"eval-accuracy": 0.1 * r + 0.05 * i, "eval-macro-f1": 0.01 * r})
        record["evaluate-per-client"].append(evaluation)
    record.update({"train": {"train-loss": 3.9 - 0.5 * r}, "evaluate": {local: 0.1 * r},
                   "bytes-down": 3374912, "bytes-up": 1680196,
                   "bytes-down-per-client": 1124970.7, "bytes-up-per-client": 560065.3,
                   "clients": {"train-clients-sampled": 3, "train-clients-aggregated": 3,
                               "evaluate-clients-sampled": 3},
                   "seconds": 116.1})
    if client_dp:
        record["client-dp"] = {"epsilon": 1.5 * r, "delta": 1e-5, "releases": r}
    return record


def make_run(path: Path, task: str = "classification", rounds: int = 3, dp_sgd: bool = False,
             client_dp: bool = False, summary: dict | None = None) -> Path:
    path.mkdir(parents=True)
    config = {"task": task, "model": "tiny-llama" if task == "causal-lm" else "default",
              "strategy": "fedprox", "num-clients": 3, "num-rounds": 3, "learning-rate": 0.005,
              "dp-noise-multiplier": 1.1 if dp_sgd else 0.0,
              "client-dp-noise-multiplier": 0.8 if client_dp else 0.0,
              "data": "/data/<b>banks</b> & co", "labels": ""}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    records = [_round(task, r, dp_sgd, client_dp) for r in range(rounds + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is None:
        summary = {"status": "completed", "rounds": rounds, "final": records[-1]["server"],
                   "initial": records[0]["server"], "seconds": 40.5}
    (path / "summary.json").write_text(json.dumps(summary))
    if task == "classification":
        (path / "labels.json").write_text(json.dumps(["card_lost", "refund", "top_up"]))
    return path


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data, validate=True) for data in DATA_URI.findall(page)]


def assert_real_plot(png: bytes) -> None:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 400
    # Text, axes and lines drawn, anti-aliased: many colours, not one.
    assert distinct_colours(image) > 20


def distinct_colours(image: np.ndarray) -> int:
    rgb = image.astype(np.uint32)
    return len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))


def page_text(page: str) -> str:
    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts = []

        def handle_data(self, data):
            self.parts.append(data)

    parser = Text()
    parser.feed(page)
    return " ".join(parser.parts)


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    for external in ('src="http', "src='http", 'href="http', "url(", "@import", "<script",
                     "<link", "<iframe", "<object", "javascript:"):
        assert external not in lowered, external


def test_classification_run_with_dp_sgd_has_every_plot_embedded_and_alone(tmp_path):
    run = make_run(tmp_path / "run", dp_sgd=True)

    page_path = write_report(run)

    assert page_path == run / "report.html"
    page = page_path.read_text()
    assert_self_contained(page)
    pngs = embedded_pngs(page)
    assert page.count("data:image/png;base64,") == len(pngs) == 6
    for png in pngs:
        assert_real_plot(png)
    expected = ["bytes.png", "clients_accuracy.png", "clients_train_loss.png", "epsilon.png",
                "server.png", "sites.png"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == expected  # no temporary files
    for name in expected:
        assert_real_plot((run / "plots" / name).read_bytes())
    assert sorted(pngs) == sorted((run / "plots" / name).read_bytes() for name in expected)


def test_page_shows_header_summary_config_and_names_each_client(tmp_path):
    run = make_run(tmp_path / "run", dp_sgd=True)

    text = page_text(write_report(run).read_text())

    assert str(run.resolve()) in text
    for shown in ("completed", "default", "fedprox", "Summary", "Rounds", "Configuration",
                  str(FINAL_ACCURACY), "40.5 s", "0.005", "1.1", "num-clients",
                  "client-dp-noise-multiplier", "/data/<b>banks</b> & co"):
        assert shown in text, shown
    # Labels follow the sorted node ids; the caption says which node each label is.
    assert f"client 1 = node {CLIENT_1}" in text
    assert f"client 3 = node {max(NODES)}" in text


def test_the_summary_names_the_best_round_the_head_and_the_sites_data_checks(tmp_path):
    summary = {"status": "completed", "rounds": 3, "seconds": 40.5,
               "selection-metric": "accuracy", "best-round": 2,
               "best": {"accuracy": 0.4321},
               "data-checks": {"sites": 3, "rows": 900, "empty": 7, "duplicates": 11,
                               "too-long": 2, "unknown-labels": 0, "dropped": 7},
               "head": {"mode": "fit", "pooling": "mean"}}
    page = write_report(make_run(tmp_path / "run", summary=summary)).read_text()
    text = " ".join(page_text(page).split())
    assert "Best round: 2 (accuracy 0.4321)" in text
    assert "Data checks" in text and "duplicates 11" in text and "sites 3" in text
    assert "Head: fit (reads mean-pooled features)" in text


def test_every_text_is_escaped(tmp_path):
    run = make_run(tmp_path / "run", summary={
        "status": "failed", "error": 'ValueError: <script>alert("x")</script>', "seconds": 3.0})

    page = write_report(run).read_text()

    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;banks&lt;/b&gt; &amp; co" in page


def test_causal_lm_run_plots_perplexity_and_local_loss_without_epsilon(tmp_path):
    run = make_run(tmp_path / "run", task="causal-lm")

    page = write_report(run).read_text()

    assert_self_contained(page)
    assert len(embedded_pngs(page)) == 5
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "bytes.png", "clients_loss.png", "clients_train_loss.png", "server.png", "sites.png"]
    text = page_text(page)
    assert "server perplexity" in text and "local loss (mean)" in text
    assert "accuracy" not in text and "ε" not in text


def test_the_sites_plot_shows_the_worst_and_the_median_site_of_each_round(tmp_path):
    run = read_run(make_run(tmp_path / "run", task="causal-lm"))

    worst, median = sites_plot(run).panels[0].series

    # Each round's three sites have eval-loss 4.3 - 0.3 r - 0.1 i: the worst is the highest.
    assert worst.rounds == median.rounds == [1, 2, 3]
    assert worst.values == pytest.approx([4.3 - 0.3 * r for r in (1, 2, 3)])
    assert median.values == pytest.approx([4.2 - 0.3 * r for r in (1, 2, 3)])


def test_the_sites_plot_names_the_rows_the_sites_scored(tmp_path):
    import dataclasses

    run = read_run(make_run(tmp_path / "run"))
    assert sites_plot(run).title == "Sites on their own validation rows: worst and median"
    dealt = dataclasses.replace(run, config={**run.config, "site-eval-rows": "test"})
    assert sites_plot(dealt).title == \
        "Sites on their own share of the test split: worst and median"


def test_client_level_dp_gets_an_epsilon_plot(tmp_path):
    run = make_run(tmp_path / "run", client_dp=True)

    page = write_report(run).read_text()

    assert len(embedded_pngs(page)) == 6
    assert (run / "plots" / "epsilon.png").is_file()
    assert "4.5" in page_text(page)  # round 3's ε


def test_failed_run_with_only_round_zero_shows_the_error_and_the_server_plot(tmp_path):
    run = make_run(tmp_path / "run", rounds=0, summary={
        "status": "failed", "error": "RuntimeError: CUDA out of memory",
        "traceback": "Traceback (most recent call last):\n  boom", "seconds": 9.0})

    page = write_report(run).read_text()

    pngs = embedded_pngs(page)
    assert len(pngs) == 1
    assert_real_plot(pngs[0])
    assert [p.name for p in (run / "plots").iterdir()] == ["server.png"]
    text = page_text(page)
    for shown in ("failed", "RuntimeError: CUDA out of memory", "most recent call last",
                  "last recorded (round 0)", "0 reported"):
        assert shown in text, shown


def test_out_puts_the_page_elsewhere(tmp_path):
    run = make_run(tmp_path / "run")

    page_path = write_report(str(run), out=tmp_path / "pages" / "mine.html")

    assert page_path == tmp_path / "pages" / "mine.html"
    assert len(embedded_pngs(page_path.read_text())) == 5
    assert not (run / "report.html").exists()
    assert (run / "plots" / "server.png").is_file()


@pytest.mark.parametrize("breakage, expected", [
    ("missing", "does not exist"),
    ("no-metrics", "is not a run directory (no metrics.jsonl)"),
    ("no-config", "is not a run directory (no config.json)"),
    ("bad-line", "metrics.jsonl line 3 is not valid JSON"),
    ("not-a-round", "metrics.jsonl line 2 is not a round record"),
    ("bad-summary", "summary.json is not valid JSON"),
    ("config-list", "config.json is not a JSON object"),
    ("local-only-list", "local_only.json is not what `fedlora simulate --local-only` writes "
                        "(no list of sites under 'sites')"),
])
def test_bad_input_raises_one_line_naming_the_problem(tmp_path, breakage, expected):
    run = make_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    if breakage == "missing":
        shutil.rmtree(run)
    elif breakage == "no-metrics":
        (run / "metrics.jsonl").unlink()
    elif breakage == "no-config":
        (run / "config.json").unlink()
    elif breakage == "bad-line":
        lines[2] = lines[2][:40]
    elif breakage == "not-a-round":
        lines[1] = json.dumps({"server": {}})
    elif breakage == "bad-summary":
        (run / "summary.json").write_text('{"status": ')
    elif breakage == "config-list":
        (run / "config.json").write_text("[1, 2]")
    elif breakage == "local-only-list":
        (run / "local_only.json").write_text('[{"accuracy": 0.5}]')
    if breakage in ("bad-line", "not-a-round"):
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    with pytest.raises(FedLoraError) as raised:
        write_report(run)

    message = str(raised.value)
    assert message.startswith("report: ") and expected in message and "\n" not in message
    assert not (run / "report.html").exists()


# -- in a browser --------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if Path("/usr/bin/chromium-headless-shell").is_file():
        return "/usr/bin/chromium-headless-shell"
    if os.environ.get("CI") == "true":
        pytest.fail("no Chromium binary found; CI installs one")
    pytest.skip("no Chromium binary found (chromium-headless-shell or chromium)")


def pixels_near(image: np.ndarray, color: tuple[int, int, int], tolerance: int = 40) -> int:
    distance = np.abs(image.astype(np.int16) - np.array(color, dtype=np.int16)).max(axis=-1)
    return int((distance <= tolerance).sum())


def test_chromium_renders_the_plots(tmp_path):
    browser = chromium()
    page_path = write_report(make_run(tmp_path / "run", dp_sgd=True))
    shot = tmp_path / "shot.png"

    subprocess.run([browser, "--no-sandbox", "--headless", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,4000",
                    f"--screenshot={shot}", page_path.resolve().as_uri()],
                   check=True, capture_output=True, timeout=60, cwd=tmp_path)

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (4000, 1280)
    assert distinct_colours(image) > 500  # not a blank or text-only page
    # The plot lines' colours, only in the images: the images were decoded and drawn.
    assert pixels_near(image, C0_BLUE) > 2000
    assert pixels_near(image, C1_ORANGE) > 1000


def test_personal_heads_get_their_sites_in_the_plot_and_a_table_of_the_last_round(tmp_path):
    path = make_run(tmp_path / "run")
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for record in records[1:]:
        for i, entry in enumerate(record["evaluate-per-client"]):
            entry["eval-personal-accuracy"] = entry["eval-accuracy"] + 0.2
            entry["eval-local-head-accuracy"] = 0.05 * i
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = read_run(path)

    labels = [s.label for s in sites_plot(run).panels[0].series]
    assert labels == ["worst site", "median site", "personal head, worst site",
                      "personal head, median site", "local-only head, worst site",
                      "local-only head, median site"]
    # `fedlora simulate --local-only`'s sites, each trained alone.
    (path / "local_only.json").write_text(json.dumps({"sites": [
        {"partition-id": i, "num-examples": 20, "accuracy": a}
        for i, a in enumerate((0.25, 0.45, 0.2))]}))
    page = Path(write_report(path)).read_text()
    table = page[page.index("Sites by model on their own validation rows (round 3)"):
                 page.index("Configuration")]
    cells = re.findall(r"<td>([^<]*)</td>", table)
    # Round 3's sites: global 0.3, 0.35, 0.4; personal 0.2 more; local-only 0, 0.05, 0.1.
    assert cells[:6] == ["global model", "3", "0.3", "0.35", "0.4", "0.35"]
    assert cells[6:12] == ["personal head", "3", "0.5", "0.55", "0.6", "0.55"]
    assert cells[13:16] == ["3", "0", "0.05"]
    assert cells[18:24] == ["local-only training (each site alone)", "3", "0.2", "0.25", "0.45",
                            "0.3"]


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="reads Linux's /proc/locks")
def test_a_running_run_whose_process_died_reads_as_interrupted(tmp_path):
    """summary.json still says running after a SIGKILL; the report and the dashboard (both
    through read_run) say interrupted once no process holds the run's lock, and the
    dashboard's signature of the run changes with it."""
    import signal
    import sys

    from server.dashboard import files_signature

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from common.config import FedLoraConfig\n"
         "from server.outputs import RunDirectory\n"
         f"RunDirectory.create(FedLoraConfig(out_dir={str(run_dir)!r}), None)\n"
         "print('ready', flush=True)\ntime.sleep(60)\n"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert read_run(run_dir, wait_for_rounds=True).status == "running"
        alive = files_signature([run_dir])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = read_run(run_dir, wait_for_rounds=True)
    assert run.summary["status"] == "running" and run.status == "interrupted"
    assert files_signature([run_dir]) != alive
    (run_dir / "metrics.jsonl").write_text(json.dumps(_round("classification", 0, False, False))
                                           + "\n")  # round 0, recorded before the kill
    page = Path(write_report(run_dir)).read_text()
    assert '<span class="status interrupted">interrupted</span>' in page
    assert "fedlora simulate --resume RUN_DIR</code>" in page

    # No telling, so as the summary says: a lock taken on another machine (a shared file
    # system) or before the last boot, or one that names nobody (an older run's).
    host, boot, pid = (run_dir / ".lock").read_text().rsplit(None, 2)
    for holder_line in (f"another-host {boot} {pid}", f"{host} another-boot {pid}", ""):
        (run_dir / ".lock").write_text(holder_line)
        assert read_run(run_dir, wait_for_rounds=True).status == "running"
