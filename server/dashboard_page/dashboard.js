// The dashboard's page: asks api/state every POLL_MS and redraws what changed. The numbers and
// the tables come from the server (server/report.py, escaped there); this file only lays them out
// and draws the plots with Plotly.
"use strict";

const POLL_MS = 2000;
const MAX_LEGEND_ENTRIES = 20;
const PLOT_CONFIG = { responsive: true, displaylogo: false };
let etag = null;
let lastState = null;
// A plot keeps the size it was drawn at: redraw it when its box changes (a run added beside it).
const resizer = new ResizeObserver((entries) => {
  for (const entry of entries) if (entry.target.data) Plotly.Plots.resize(entry.target);
});

function element(tag, attributes = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

// Plotly reads a few HTML tags in trace names and titles: names from a run's files go in as text.
function plain(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function setConnection(ok, message) {
  const status = document.getElementById("connection");
  status.classList.toggle("lost", !ok);
  status.textContent = ok ? `updated ${new Date().toLocaleTimeString()}` : message;
}

function duration(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  const minutes = Math.round(seconds / 60);
  return minutes < 120 ? `${minutes} min` : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function etaText(run) {
  if (run.status !== "running") return "";
  if (run["finish-estimate"] === null) return "ETA after the first round";
  const left = run["finish-estimate"] - Date.now() / 1000;
  return left > 0 ? `ETA ${duration(left)}` : "ETA any moment";
}

function runArticle(index) {
  const id = `run-${index}`;
  let article = document.getElementById(id);
  if (article) return article;
  article = element("article", { id, class: "run", "data-run": String(index) });
  article.append(element("h2", { class: "name" }));
  const line = element("div", { class: "progress-line" });
  line.append(element("span", { class: "status" }), element("span", { class: "progress" }),
              element("span", { class: "eta" }));
  article.append(line);
  for (const part of ["header", "summary", "plots", "sites", "rounds", "personal"]) {
    article.append(element("div", { class: `part ${part} table-scroll` }));
  }
  const config = element("details", { class: "part-config" });
  config.append(element("summary", {}, "Configuration"), element("div", { class: "config table-scroll" }));
  article.append(config);
  document.getElementById("runs").append(article);
  return article;
}

function panelFigure(plot, panel, count) {
  const data = panel.series.map((series) => ({
    x: series.rounds, y: series.values, name: plain(series.label), type: "scatter",
    mode: series.dashed ? "lines" : "lines+markers",
    line: { dash: series.dashed ? "dash" : "solid" },
  }));
  const rounds = new Set(panel.series.flatMap((series) => series.rounds));
  const layout = {
    margin: { l: 60, r: 10, t: 10, b: 45 },
    xaxis: { title: { text: "round" }, dtick: rounds.size <= 12 ? 1 : undefined, tickformat: "d" },
    yaxis: { title: { text: plain(panel.ylabel) }, type: panel.log_y ? "log" : "linear",
             rangemode: panel.from_zero ? "tozero" : "normal" },
    showlegend: count > 1 && count <= MAX_LEGEND_ENTRIES,
    legend: { orientation: "h", y: -0.25, font: { size: 10 } },
    uirevision: plot.name, // zoom and hidden series survive the redraws
  };
  return { data, layout };
}

function drawPlots(container, index, plots) {
  const names = plots.map((plot) => plot.name).join(",");
  if (container.dataset.names !== names) { // a plot appeared (ε, personal heads): lay out anew
    for (const div of container.querySelectorAll(".panel")) Plotly.purge(div);
    container.replaceChildren(element("h3", {}, "Plots"));
    for (const plot of plots) {
      const figure = element("figure", { id: `run-${index}-${plot.name}` });
      figure.append(element("h3", {}, plot.title));
      const panels = element("div", { class: "panels" });
      plot.panels.forEach((_, k) => {
        const div = element("div", { class: "panel", "data-panel": String(k) });
        panels.append(div);
        resizer.observe(div);
      });
      figure.append(panels);
      if (plot.caption) figure.append(element("figcaption", {}, plot.caption));
      container.append(figure);
    }
    container.dataset.names = names;
  }
  for (const plot of plots) {
    const divs = container.querySelectorAll(`#run-${index}-${plot.name} .panel`);
    plot.panels.forEach((panel, k) => {
      const { data, layout } = panelFigure(plot, panel, panel.series.length);
      Plotly.react(divs[k], data, layout, PLOT_CONFIG);
    });
  }
  if (plots.length === 0) container.replaceChildren(element("p", {}, "Nothing to plot yet."));
}

function renderRun(run, index) {
  const article = runArticle(index);
  article.querySelector(".name").textContent = run.name;
  article.title = run.path;
  const status = article.querySelector(".status");
  status.className = `status ${run.status}`;
  status.textContent = run.status;
  article.querySelector(".progress").textContent = run.unreadable ? run.unreadable
    : run.round === null ? `no round yet of ${run.rounds}` : `round ${run.round} of ${run.rounds}`;
  article.querySelector(".eta").textContent = etaText(run);
  if (run.unreadable) return;
  for (const part of ["header", "summary", "sites", "rounds", "personal"]) {
    // HTML made by server/report.py, every value escaped there.
    article.querySelector(`.part.${part}`).innerHTML = run.sections[part];
  }
  article.querySelector(".config").innerHTML = run.sections.config;
  drawPlots(article.querySelector(".part.plots"), index, run.plots);
}

function renderCompare(state) {
  const section = document.getElementById("compare");
  section.hidden = state.runs.length < 2;
  if (section.hidden) return;
  document.getElementById("compare-table").innerHTML = state.compare;
  const data = state.runs.filter((run) => run.plots).map((run) => {
    const server = run.plots.find((plot) => plot.name === "server");
    const series = server ? server.panels[0].series[0] : { rounds: [], values: [] };
    return { x: series.rounds, y: series.values, name: plain(`${run.name} (${run.strategy})`),
             type: "scatter", mode: "lines+markers" };
  });
  const quality = state.runs.find((run) => run.quality)?.quality || "";
  const rounds = new Set(data.flatMap((series) => series.x));
  Plotly.react("compare-plot", data, {
    margin: { l: 60, r: 10, t: 10, b: 45 },
    xaxis: { title: { text: "round" }, dtick: rounds.size <= 12 ? 1 : undefined, tickformat: "d" },
    yaxis: { title: { text: plain(`server ${quality}`) } }, legend: { orientation: "h", y: -0.25 },
    uirevision: "compare",
  }, PLOT_CONFIG);
}

function render(state) {
  lastState = state;
  state.runs.forEach((_, index) => runArticle(index)); // every column first: plots fit them
  state.runs.forEach(renderRun);
  renderCompare(state);
}

async function poll() {
  try {
    const reply = await fetch("api/state", {
      headers: etag ? { "If-None-Match": etag } : {}, cache: "no-store", credentials: "same-origin",
    });
    if (reply.status === 200) {
      etag = reply.headers.get("ETag");
      render(await reply.json());
      setConnection(true);
    } else if (reply.status === 304) {
      setConnection(true);
    } else {
      setConnection(false, `the dashboard answered ${reply.status}: ${(await reply.text()).trim()}`);
    }
  } catch (err) {
    setConnection(false, `the dashboard cannot be reached (${err.message}); retrying`);
  }
  if (lastState) { // the ETA counts down between changes of the run
    lastState.runs.forEach((run, index) => {
      const eta = document.querySelector(`#run-${index} .eta`);
      if (eta) eta.textContent = etaText(run);
    });
  }
  setTimeout(poll, POLL_MS);
}

poll();
