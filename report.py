"""One page that shows a run: its config and machine, the curves of its metrics, and its episodes turn by turn with
each step's credit (StepPO, arXiv 2604.18401).

    python report.py runs/steppo        # -> runs/steppo/report.html (train.py writes it after each evaluation and at the end)

The page is one self-contained HTML file (data, style and script inline; a Content-Security-Policy forbids every
network request), so it opens from a laptop's disk. It reads <out>/run.json, metrics.jsonl and episodes.jsonl
(docs/metrics.md explains their fields). Episode browser (it opens on the latest training iteration): pick an iteration (training or evaluation), filter by
outcome and task, read an episode as a conversation (the system prompt folded), each action coloured by its advantage
(blue: credited, red: blamed) with its numbers (V, return, ratio, clipped, log-probs, cut) beside it; below it, the
episode's task group side by side (a credit map of any group of any iteration).
"""
import json
import os
import sys

CURVES = [("eval_success_rate", "success_rate"), ("mean_return",), ("invalid_rate", "cut_rate"), ("clipfrac",),
          ("approx_kl", "kl_ref"), ("entropy",), ("value_loss",), ("explained_var",), ("grad_norm", "critic_grad_norm"),
          ("engine_kl",), ("wall_s",),
          ("peak_rss_mib", "gpu_peak_mib")]


def read_jsonl(path) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write(out: str) -> str:
    """Write <out>/report.html from the run folder's records; returns its path."""
    run = {}
    if os.path.exists(os.path.join(out, "run.json")):
        with open(os.path.join(out, "run.json")) as f:
            run = json.load(f)["starts"][-1]
    data = {"name": os.path.basename(os.path.normpath(out)), "run": run, "curves": CURVES,
            "metrics": read_jsonl(os.path.join(out, "metrics.jsonl")),
            "episodes": read_jsonl(os.path.join(out, "episodes.jsonl"))}
    blob = json.dumps(data, allow_nan=False).replace("</", "<\\/")  # nothing in the data can close the script tag
    path = os.path.join(out, "report.html")
    with open(path + ".tmp", "w") as f:
        f.write(PAGE.replace("__DATA__", blob))
    os.replace(path + ".tmp", path)
    return path


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>StepPO run</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.chart { border: 1px solid #ddd; padding: 4px; } .chart text { font-size: 10px; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; }
tr.ep { cursor: pointer; } tr.ep:hover, tr.sel { background: #eef; }
.turn { margin: 6px 0; padding: 6px 8px; border-radius: 4px; white-space: pre-wrap; }
.obs { background: #f4f4f4; } .act { border: 1px solid #ccc; }
.nums { font: 12px monospace; color: #555; }
.group { display: flex; gap: 8px; align-items: flex-start; overflow-x: auto; }
.col { min-width: 180px; max-width: 260px; } .cell { font-size: 12px; margin: 3px 0; padding: 4px; border-radius: 3px; }
#errors { color: #b00; }
</style></head><body>
<script type="application/json" id="data">__DATA__</script>
<div id="errors"></div>
<h1 id="title"></h1><div id="machine"></div>
<details><summary>config and command</summary><pre id="config"></pre></details>
<h2>Curves</h2><div class="grid" id="curves"></div>
<h2>Episodes</h2>
<div>iteration <select id="iter"></select> outcome <select id="outcome"><option>all</option><option>won</option>
<option>lost</option><option>error</option><option>cut</option></select> task <input id="task" size="12" placeholder="task id">
<span id="count"></span></div>
<table id="list"><thead><tr><th>task</th><th>seed</th><th>outcome</th><th>reward</th><th>end</th><th>turns</th></tr></thead>
<tbody></tbody></table>
<div id="episode"></div>
<script>
window.onerror = (m) => { document.getElementById("errors").textContent += "script error: " + m + "\n"; };
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, text = "") => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text !== "") e.textContent = text; return e; };
const fmt = (x) => x === null || x === undefined ? "-" :
  (typeof x === "number" && !Number.isInteger(x) ? +x.toPrecision(4) : String(x));
function credit(a) {  // advantage -> background: blue credited, red blamed, white none
  if (a === null || a === undefined) return "#fff";
  const s = Math.min(Math.abs(a) / 2, 1) * 0.6;
  return a >= 0 ? `rgba(40,90,220,${s})` : `rgba(220,50,40,${s})`;
}
// header
const R = D.run, C = R.config || {};
$("title").textContent = `Run ${D.name}: ${C.estimator || ""} / ${C.loss || ""} on ${C.env || ""}, model ${C.model || ""}`;
$("machine").textContent = `${R.cpu || ""}${R.gpu ? ", " + R.gpu : ""}; Python ${R.python || ""}; torch ${(R.versions || {}).torch || ""}` +
  `; started ${R.started || ""}; commit ${R.git ? R.git.commit.slice(0, 10) : "-"}`;
$("config").textContent = (R.command || []).join(" ") + "\n\n" + Object.entries(C).map(([k, v]) => `${k}: ${v}`).join("\n");
// curves: one small chart per group of keys
for (const keys of D.curves) {
  const series = keys.map((k) => D.metrics.filter((r) => typeof r[k] === "number").map((r) => [r.iter, r[k]]));
  const pts = series.flat(); if (!pts.length) continue;
  const W = 260, H = 130, P = 28, xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
  const X = (x) => P + (W - P - 6) * (x - x0) / ((x1 - x0) || 1), Y = (y) => H - 16 - (H - 38) * (y - y0) / ((y1 - y0) || 1);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  [["width", W], ["height", H], ["class", "chart"]].forEach(([k, v]) => svg.setAttribute(k, v));
  const colours = ["#2554c7", "#d2691e"];
  svg.innerHTML = keys.map((k, i) => `<text x="${P + 110 * i}" y="10" fill="${colours[i]}">${k}</text>`).join("") +
    `<text x="2" y="${Y(y1) + 4}">${fmt(y1)}</text>` +
    `<text x="2" y="${Y(y0)}">${fmt(y0)}</text><text x="${P}" y="${H - 2}">${x0}</text><text x="${W - 30}" y="${H - 2}">${x1}</text>`;
  series.forEach((s, i) => { const pl = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    pl.setAttribute("points", s.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "));
    pl.setAttribute("fill", "none"); pl.setAttribute("stroke", colours[i]); svg.appendChild(pl); });
  $("curves").appendChild(svg);
}
// episode browser
const key = (e) => `${e.split} ${e.iter}`;
const iters = [...new Set(D.episodes.map(key))];
iters.forEach((k) => $("iter").appendChild(el("option", {value: k}, k)));
const lastTrain = iters.filter((k) => k.startsWith("train ")).pop();  // open on the latest iteration with credit
if (lastTrain) $("iter").value = lastTrain;
const outcome = (e) => e.end === "env_error" ? "error" : (e.success ? "won" : "lost");
function shown() {
  const it = $("iter").value, o = $("outcome").value, task = $("task").value.trim();
  return D.episodes.filter((e) => key(e) === it && (o === "all" || o === outcome(e) ||
    (o === "cut" && (e.end !== "terminated" || e.steps.some((s) => s.cut)))) && (!task || String(e.task_id).includes(task)));
}
function list() {
  const body = $("list").querySelector("tbody"); body.innerHTML = "";
  const eps = shown(); $("count").textContent = ` ${eps.length} episodes`;
  eps.forEach((e) => { const tr = el("tr", {class: "ep"});
    [e.task_id, e.seed, outcome(e), fmt(e.total_reward), e.end, e.turns].forEach((v) => tr.appendChild(el("td", {}, fmt(v))));
    tr.onclick = () => { body.querySelectorAll("tr").forEach((r) => r.classList.remove("sel")); tr.classList.add("sel"); show(e); };
    body.appendChild(tr); });
  if (eps.length) body.querySelector("tr").onclick(); else $("episode").innerHTML = "";
}
function show(e) {
  const box = $("episode"); box.innerHTML = "";
  box.appendChild(el("h2", {}, `Task ${e.task_id} (seed ${e.seed}), ${e.split} iteration ${e.iter}: ${outcome(e)}, ` +
    `reward ${fmt(e.total_reward)}, ended: ${e.end}${e.score !== null ? ", score " + fmt(e.score) : ""}`));
  if (e.error) box.appendChild(el("div", {class: "turn obs"}, "env error: " + e.error));
  const sys = el("details"); sys.appendChild(el("summary", {}, "system prompt"));
  sys.appendChild(el("div", {class: "turn obs"}, (R.env || {}).system_prompt || "(not recorded)")); box.appendChild(sys);
  e.steps.forEach((s, t) => {
    box.appendChild(el("div", {class: "turn obs"}, `[${t}] ${s.observation}`));
    const a = el("div", {class: "turn act", style: `background:${credit(s.advantage)}`}, s.action);
    a.appendChild(el("div", {class: "nums"}, `reward ${fmt(s.reward)} | V ${fmt(s.value)} | A ${fmt(s.advantage)} | ` +
      `return ${fmt(s.return)} | ratio ${fmt(s.ratio)} clipped ${fmt(s.clipped)} | logp trainer ${fmt(s.logprob)} ` +
      `engine ${fmt(s.engine_logprob)} kl ${fmt(s.engine_kl)} | ${s.tokens} tokens${s.cut ? " CUT" : ""}${s.invalid ? " INVALID" : ""}`));
    box.appendChild(a); });
  const group = D.episodes.filter((g) => key(g) === key(e) && g.task_id === e.task_id);
  box.appendChild(el("h2", {}, `Its task group (${group.length} episodes): the credit of each step`));
  const row = el("div", {class: "group"});
  group.forEach((g) => { const col = el("div", {class: "col"});
    col.appendChild(el("b", {}, `seed ${g.seed}: ${outcome(g)}, reward ${fmt(g.total_reward)}`));
    g.steps.forEach((s, t) => col.appendChild(el("div", {class: "cell", style: `background:${credit(s.advantage)}`},
      `[${t}] ${s.action.slice(0, 80)} (r ${fmt(s.reward)}, A ${fmt(s.advantage)}, V ${fmt(s.value)})`)));
    row.appendChild(col); });
  box.appendChild(row);
}
["iter", "outcome", "task"].forEach((id) => $(id).addEventListener("input", list));
list();
</script></body></html>
"""


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        raise SystemExit("usage: python report.py RUN_DIR (a train.py --out folder)")
    print(write(sys.argv[1]))
