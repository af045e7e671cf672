"""`fedlora dashboard`: the page in a real headless Chromium (driven over its DevTools protocol)
on finished runs and on a federation that is writing its rounds; what it refuses over HTTP."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.dashboard import Dashboard, dashboard_state
from server.outputs import is_run_directory
from server.report import fmt
from tests.test_report import C0_BLUE, FINAL_ACCURACY, chromium, make_run, pixels_near

pytestmark = pytest.mark.usefixtures("task_identity")


class Browser:
    """Headless Chromium, one page, driven over the DevTools protocol."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 2400) -> None:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        for line in self.process.stderr:
            if found := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(found.group(1))
                break
        assert port, "Chromium did not start its DevTools endpoint"
        # Chromium keeps writing to stderr: drain it, or it blocks on a full pipe.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            page = next(t for t in json.load(reply) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.calls = 0

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events come in between; the reply carries the call's id
            reply = json.loads(self.socket.recv(timeout=30))
            if reply.get("id") == self.calls:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.2)
        raise AssertionError(f"not true within {timeout} s: {expression}\npage: "
                             + str(self.evaluate("document.body.innerText"))[:2000])

    def screenshot(self, path: Path) -> np.ndarray:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(png)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def browser(tmp_path):
    opened = Browser(tmp_path / "profile")
    yield opened
    opened.close()


def run_text(index: int, part: str) -> str:
    return f"(document.querySelector('#run-{index} {part}')?.textContent || '')"


def test_finished_runs_side_by_side_with_their_final_accuracy_rounds_and_plots(tmp_path,
                                                                               browser):
    done = make_run(tmp_path / "fedprox", dp_sgd=True)
    failed = make_run(tmp_path / "crashed <b>&2", rounds=1, summary={
        "status": "failed", "error": "RuntimeError: site 2 sent <b>NaN</b>"})
    config = json.loads((done / "config.json").read_text())
    (done / "config.json").write_text(json.dumps({**config, "dp-target-epsilon": 2.0}))
    with (done / "metrics.jsonl").open("a") as metrics:  # a copy of the run still under way
        metrics.write('{"round": 4, "server": {"accur')
    before = [files_under(done), files_under(failed)]
    dashboard = Dashboard([done, failed], port=0)
    dashboard.start()
    try:
        browser.call("Page.navigate", url=dashboard.url)
        browser.wait_for("document.querySelectorAll('#run-0 .main-svg').length > 0")

        assert browser.evaluate(run_text(0, ".progress")) == "round 3 of 3"  # the whole rounds
        assert browser.evaluate(run_text(0, ".status")) == "completed"
        summary = browser.evaluate(run_text(0, ".part.summary"))
        assert "final (round 3)" in summary and fmt(FINAL_ACCURACY) in summary
        # The failed run beside it: its status, its round and its error, as text (escaped).
        assert browser.evaluate(run_text(1, ".status")) == "failed"
        assert browser.evaluate(run_text(1, ".progress")) == "round 1 of 3"
        assert "RuntimeError: site 2 sent <b>NaN</b>" in browser.evaluate(
            run_text(1, ".part.summary"))
        compared = browser.evaluate("document.getElementById('compare-table').innerText")
        assert "fedprox" in compared and "crashed <b>&2" in compared
        legend = browser.evaluate("[...document.querySelectorAll('#compare-plot .legendtext')]"
                                  ".map(e => e.textContent)")
        assert legend == ["fedprox (fedprox)", "crashed <b>&2 (fedprox)"]  # text, not markup
        # Each of the report's plots is drawn, one Plotly chart a panel, the budget line with ε.
        state = dashboard_state(dashboard.paths)
        panels = sum(len(plot["panels"]) for plot in state["runs"][0]["plots"])
        assert browser.evaluate("document.querySelectorAll('#run-0 .js-plotly-plot').length") \
            == panels
        names = browser.evaluate("[...document.querySelectorAll('#run-0 figure')].map(f => f.id)")
        assert names == [f"run-0-{plot['name']}" for plot in state["runs"][0]["plots"]]
        epsilon = state["runs"][0]["plots"][-1]
        assert epsilon["name"] == "epsilon" and names[-1] == "run-0-epsilon"
        budget = epsilon["panels"][0]["series"][-1]  # spent against the budget the run set
        assert budget["dashed"] and budget["values"] == [2.0, 2.0, 2.0]
        image = browser.screenshot(tmp_path / "finished.png")
        assert pixels_near(image, C0_BLUE) > 2000  # the lines were drawn, not only text
    finally:
        dashboard.stop()
    assert [files_under(done), files_under(failed)] == before  # it never changes a run


def files_under(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


class GatedGrid:
    """An in-process federation's grid that holds round 2's training until `gate` is set."""

    def __init__(self, grid, gate: threading.Event) -> None:
        self.grid, self.gate = grid, gate

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.content["config"]["server-round"] == 2
               for m in messages):
            assert self.gate.wait(120), "the test never let round 2 start"
        return self.grid.send_and_receive(messages, timeout)


def test_a_round_appears_on_the_open_page_while_the_run_writes_it(banking_subset, tmp_path,
                                                                 browser):
    from common.config import FedLoraConfig
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=2,
                        num_rounds=2, local_steps=2, batch_size=8, max_train_examples=60,
                        max_eval_examples=40, lora_r=4, out_dir=str(tmp_path / "run"))
    gate, outcome = threading.Event(), {}

    def federate():
        try:
            outcome["run"] = run_federation(GatedGrid(InProcessGrid(cfg, 2), gate), cfg)
        except BaseException as err:  # reported by the test below
            outcome["error"] = err

    federation = threading.Thread(target=federate, daemon=True)
    federation.start()
    deadline = time.monotonic() + 120
    while not is_run_directory(cfg.out_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    dashboard = Dashboard([cfg.out_dir], port=0)
    dashboard.start()
    try:
        browser.call("Page.navigate", url=dashboard.url)
        browser.wait_for(f"{run_text(0, '.progress')} === 'round 1 of 2'", timeout=120)
        assert browser.evaluate(run_text(0, ".status")) == "running"
        assert browser.evaluate(run_text(0, ".eta")).startswith("ETA")
        browser.evaluate("window.openedOnce = true")  # gone if the page were reloaded
        gate.set()

        browser.wait_for(f"{run_text(0, '.progress')} === 'round 2 of 2' && "
                         f"{run_text(0, '.status')} === 'completed'", timeout=120)
        federation.join(60)
        assert "error" not in outcome, outcome.get("error")
        assert browser.evaluate("window.openedOnce") is True
        final = outcome["run"].read_summary()["final"]["accuracy"]
        assert fmt(final) in browser.evaluate(run_text(0, ".part.summary"))
        rounds = browser.evaluate(run_text(0, ".part.rounds"))
        assert all(fmt(r["server"]["accuracy"]) in rounds
                   for r in outcome["run"].read_rounds())
        image = browser.screenshot(tmp_path / "live.png")
        assert pixels_near(image, C0_BLUE) > 1000
    finally:
        gate.set()
        dashboard.stop()
        federation.join(60)


def test_a_half_written_last_line_is_left_out_without_an_error(tmp_path):
    run = make_run(tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"round": 4, "server": {"accur')  # a writer caught mid-line
    (run / "summary.json").write_text(json.dumps({"status": "running"}))

    state = dashboard_state([run])["runs"][0]
    assert state["status"] == "running" and state["round"] == 3
    assert "unreadable" not in state
    server = next(p for p in state["plots"] if p["name"] == "server")
    assert server["panels"][0]["series"][0]["rounds"] == [0, 1, 2, 3]


def test_the_eta_is_the_rounds_left_at_the_mean_training_round_from_the_last_record(tmp_path):
    run = make_run(tmp_path / "run", rounds=2, summary={"status": "running"})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records[2]["seconds"] = 100.0  # round 1: 116.1 s; round 0 (no training) does not count
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recorded = (run / "metrics.jsonl").stat().st_mtime

    state = dashboard_state([run])["runs"][0]
    assert state["round"] == 2 and state["rounds"] == 3
    assert state["finish-estimate"] == pytest.approx(recorded + 1 * (116.1 + 100.0) / 2)


# -- over HTTP ---------------------------------------------------------------------------------


def request(dashboard: Dashboard, path: str, headers: dict | None = None
            ) -> http.client.HTTPResponse:
    """A request with its path sent as written (`..` and all), as an attacker would."""
    connection = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    reply = connection.getresponse()
    reply.body = reply.read()
    connection.close()
    return reply


def test_another_address_needs_the_token_and_no_request_reads_outside_the_runs(tmp_path):
    run = make_run(tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("the other bank's data")
    (run / "notes.txt").write_text("inside the run, but not a file the dashboard shows")
    dashboard = Dashboard([run], host="0.0.0.0", port=0)
    dashboard.start()
    try:
        assert dashboard.token and f"?token={dashboard.token}" in dashboard.url
        for path in ("/", "/api/state", "/static/plotly.min.js"):
            refused = request(dashboard, path)
            assert refused.status == 401 and b"token" in refused.body, path
        assert request(dashboard, "/api/state",
                       {"Authorization": "Bearer not-the-token"}).status == 401

        # The link's token becomes a cookie; the cookie, or a bearer header, opens everything.
        opened = request(dashboard, f"/?token={dashboard.token}")
        assert opened.status == 303
        cookie = opened.getheader("set-cookie").split(";")[0]
        assert "HttpOnly" in opened.getheader("set-cookie")
        page = request(dashboard, "/", {"Cookie": cookie})
        assert page.status == 200 and b"static/dashboard.js" in page.body
        state = request(dashboard, "/api/state", {"Authorization": f"Bearer {dashboard.token}"})
        assert state.status == 200
        assert json.loads(state.body)["runs"][0]["latest"] == FINAL_ACCURACY

        allowed = {"Cookie": cookie}
        probes = ["/../secret.txt", "/static/../../secret.txt", "/static/..%2f..%2fsecret.txt",
                  "/static/%252e%252e/secret.txt", f"/{secret}", f"//{secret}",
                  f"/api/state?run={secret}", "/api/state?run=../secret.txt",
                  "/static/notes.txt", "/notes.txt", "/static/index.html", "/static/..\\x"]
        for path in probes:
            reply = request(dashboard, path, allowed)
            assert reply.status == 404, path
            assert b"other bank" not in reply.body and b"inside the run" not in reply.body
    finally:
        dashboard.stop()


def test_with_a_certificate_it_serves_https_and_its_token_cookie_is_https_only(tmp_path):
    import ssl

    from common.certs import write_ca_and_server_cert

    write_ca_and_server_cert(tmp_path / "certs", ["coordinator.example"])
    dashboard = Dashboard([make_run(tmp_path / "run")], host="0.0.0.0", port=0,
                          tls_cert=tmp_path / "certs/server.crt",
                          tls_key=tmp_path / "certs/server.key")
    dashboard.start()
    try:
        assert dashboard.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(tmp_path / "certs/ca.crt"))
        connection = http.client.HTTPSConnection("127.0.0.1", dashboard.port, timeout=10,
                                                 context=trusted)  # verified: in its SANs
        connection.request("GET", f"/?token={dashboard.token}")
        reply = connection.getresponse()
        assert reply.status == 303 and "Secure" in reply.getheader("set-cookie")
        reply.read()
        connection.request("GET", "/api/state",
                           headers={"Authorization": f"Bearer {dashboard.token}"})
        reply = connection.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["runs"][0]["status"] == \
            "completed"
        connection.close()
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            request(dashboard, "/api/state")  # plain HTTP gets no answer from it
    finally:
        dashboard.stop()


def test_loopback_needs_no_token_but_a_loopback_host_name(tmp_path):
    dashboard = Dashboard([make_run(tmp_path / "run")], port=0)
    dashboard.start()
    try:
        assert dashboard.token is None
        assert request(dashboard, "/api/state").status == 200
        # A page elsewhere whose name resolves to 127.0.0.1 (DNS rebinding) is not answered.
        assert request(dashboard, "/api/state", {"Host": "attacker.example"}).status == 400
    finally:
        dashboard.stop()


def test_bad_input_gets_one_line(tmp_path, capsys):
    from simulations.cli import main

    run = make_run(tmp_path / "run")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a run")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n")
    cases = [([str(plain)], "is not a run directory (no metrics.jsonl)"),
             ([str(run), "--tls-cert", str(tmp_path / "cert.pem")], "go together"),
             ([str(run), "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key",
               str(tmp_path / "cert.pem")], "are not a PEM certificate and its key"),
             ([str(run), "--tls-cert", str(tmp_path / "none.pem"), "--tls-key",
               str(tmp_path / "cert.pem")], "--tls-cert " + str(tmp_path / "none.pem")),
             ([str(tmp_path / "missing")], "does not exist"),
             ([str(run), str(run)], "a run directory is named twice"),
             ([str(run), "--port", str(port)], f"port {port} on 127.0.0.1 is in use"),
             ([str(run), "--port", "70000"], "--port 70000 is not a port"),
             ([str(run), "--host", "no-such-host.invalid"], "is not an address of this machine")]
    try:
        for args, expected in cases:
            assert main(["dashboard", *args]) == 2, args
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("fedlora: error: dashboard: ")
            assert expected in lines[0], lines[0]
    finally:
        taken.close()
