"""Render results.json of an optimize run into one self-contained HTML page."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape

from compactai.report.figures import latency_svg, pareto_svg, waterfall_svg
from compactai.results import describe

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>compactai report: {{ r.model.name }}</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0} td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
td:first-child,th:first-child{text-align:left} .ok{color:#1a7f37;font-weight:600} .bad{color:#b42318;font-weight:600}
pre{background:#f6f8fa;padding:.75rem;overflow:auto;font-size:.85rem} figure{margin:0} svg{max-width:100%;height:auto}
.muted{color:#666;font-size:.85rem}
</style></head><body>
<h1>compactai optimize: {{ r.model.name }} <span class="muted">({{ r.model.kind }})</span></h1>
<p id="verdict" class="{{ 'ok' if r.chosen else 'bad' }}">{{ r.selection.explanation }}</p>
<p class="muted">Budget: <code>{{ r.budget.text }}</code> · metric {{ r.task.metric }} (selection on the {{ r.task.selection_split }} split, confirmed on {{ r.task.test_split }}) ·
{{ r.search.trials_finished }} trials in {{ '%.0f' % r.search.seconds }} s (stopped by {{ r.search.stopped_by }}) · {{ r.environment.cpu.model }}, {{ r.baseline.threads }} threads.</p>

<h2>Original vs chosen</h2>
<table id="comparison"><tr><th>figure</th><th>original</th><th>chosen</th><th>change</th></tr>
{% for label, key, better in rows %}<tr><td>{{ label }}</td><td>{{ fmt(r.baseline.get(key)) }}</td>
<td>{{ fmt(chosen_fig.get(key)) if chosen_fig else '-' }}</td><td>{{ change(r.baseline.get(key), chosen_fig.get(key) if chosen_fig else None, better) }}</td></tr>
{% endfor %}</table>
<p class="muted">All figures measured on this machine with ONNX Runtime (CPU provider). Energy: {{ r.baseline.energy_method }} ({{ r.baseline.energy_formula }}).
Test-split quality: original {{ fmt(r.task.baseline_test) }}{% if chosen_fig %}, chosen {{ fmt(chosen_fig.test_quality.value) }}{% endif %}.</p>
{% if r.selection.checks %}<table id="budget-checks"><tr><th>constraint</th><th>measured</th><th>verdict</th></tr>
{% for c in r.selection.checks %}<tr><td>{{ c.constraint }}</td><td>{{ fmt(c.actual) }}</td><td class="{{ 'ok' if c.ok else 'bad' }}">{{ c.text }}</td></tr>{% endfor %}</table>{% endif %}

<h2>Pareto front</h2><figure id="pareto-plot">{{ pareto | safe }}</figure>
<h2>Per-technique contribution</h2><figure id="waterfall-plot">{{ waterfall | safe }}</figure>
{% if r.waterfall %}<table id="waterfall-table"><tr><th>after step</th><th>quality</th><th>p90 ms</th><th>size MB</th><th>params</th><th>MACs</th></tr>
{% for s in r.waterfall %}<tr><td>{{ s.step }}</td><td>{{ fmt(s.quality) }}</td><td>{{ fmt(s.latency_p90_ms) }}</td><td>{{ fmt(s.size_mb) }}</td><td>{{ fmt(s.params) }}</td><td>{{ fmt(s.macs) }}</td></tr>{% endfor %}</table>{% endif %}
{% if r.split %}<h2>Where to split it</h2>
<p id="split-choice">On {{ fmt(r.split.network.bandwidth_mbps) }} Mbit/s with a {{ fmt(r.split.network.rtt_ms) }} ms RTT (server {{ fmt(r.split.network.server_speedup) }}x this machine, {{ fmt(r.split.network.server_overhead_ms) }} ms per request), the slicing cost model chooses <b>{{ r.split.choice.cut }}</b>: {{ fmt(r.split.choice.end_to_end_ms) }} ms end-to-end predicted (head {{ fmt(r.split.choice.head_ms) }} + transfer {{ fmt(r.split.choice.transfer_ms) }} + server {{ fmt(r.split.choice.overhead_ms) }} + tail {{ fmt(r.split.choice.tail_ms) }}).
By bandwidth: {% for bw, c in r.split.choice_by_bandwidth.items() %}{{ bw }} Mbit/s: {{ c.cut }} ({{ fmt(c.end_to_end_ms) }} ms){% if not loop.last %}; {% endif %}{% endfor %}. {{ r.split.how }}.</p>{% endif %}
{% if r.runtime_choice %}<h2>Runtime choice</h2>
{% set rc = r.runtime_choice %}<p id="runtime-choice-verdict">{% if rc['for'] %}For {{ rc['for'] }}. {% endif %}{% if rc.winner %}Winner: <b>{{ rc.winner.label }}</b> ({{ rc.winner.made_by }}){% if rc.winner.runtime != 'onnxruntime' %}, written to <code>{{ rc.winner.path }}</code>; model.onnx stays the ONNX Runtime pipeline result{% endif %}.{% else %}{{ rc.note }}.{% endif %}
{% if rc.candidates %}Every candidate judged against the quality floor {{ fmt(rc.quality_floor_validation) }} on the validation split{% for c in rc.constraints[1:] %} and {{ c }}{% endfor %}, timed in {{ rc.rounds }} interleaved rounds; the fastest at batch 1 on {{ rc.runtimes | join(', ') }} wins{% if rc.not_rechecked %} (not measured again: {{ rc.not_rechecked | join(', ') }}){% endif %}. Float ancestor for each runtime's own int8: {{ rc.float_ancestor }}.{% endif %}</p>
{% if rc.candidates %}<table id="runtime-choice"><tr><th>runtime</th><th>candidate</th><th>precision</th><th>size MB</th><th>quality (val)</th><th>quality (test)</th><th>p50 ms @1</th><th>p90 ms @1</th><th>items/s @batch</th><th>status</th></tr>
{% for c in rc.candidates %}<tr><td>{{ c.runtime }}</td><td style="text-align:left">{{ c.label }}<br><span class="muted">{{ c.made_by }}</span></td><td>{{ c.precision }}</td>
<td>{{ fmt(c.size_bytes / 1e6) if c.size_bytes else '-' }}</td><td>{{ fmt(c.quality_validation) }}</td><td>{{ fmt((c.quality or {}).get('value')) }}</td>
<td>{{ fmt(c.latency_p50_ms) }}</td><td>{{ fmt(c.latency_p90_ms) }}</td><td>{{ fmt(c.throughput_items_per_s) }}{% if c.throughput_batch %} @{{ c.throughput_batch }}{% endif %}</td>
<td class="{{ 'bad' if c.error or not c.meets_floor or c.meets_budget == false else 'ok' }}">{% if c.error %}failed: {{ c.error }}{% elif not c.meets_floor %}below the quality floor{% elif c.meets_budget == false %}misses the budget: {{ c.budget_misses | join('; ') }}{% elif c.contender == false %}reference (not a requested runtime){% elif rc.winner and rc.winner.label == c.label %}winner{% else %}ok{% endif %}</td></tr>{% endfor %}</table>{% endif %}{% endif %}
<h2>Latency distribution</h2><figure id="latency-plot">{{ latency | safe }}</figure>

<h2>Recipe to reproduce</h2>
<pre id="recipe">{{ recipe_json }}</pre>
<pre>{{ command }}</pre>

{% set fid = r.search.get('fidelity') %}{% if fid and fid.schedule %}<h2>Fidelity schedule</h2>
<p class="muted">Training trials ran in rungs of epochs (successive halving: the best 1/{{ fid.reduction_factor }} at a rung continued from their checkpoint, the rest were stopped and are listed as pruned: {{ fid.pruned }}).</p>
<table id="fidelity-schedule"><tr><th>epochs</th><th>candidates trained to this rung</th></tr>
{% for row in fid.schedule %}<tr><td>{{ row.epochs }}</td><td>{{ row.candidates }}</td></tr>{% endfor %}</table>{% endif %}

<h2>All trials</h2>
<table id="trials"><tr><th>#</th><th>pipeline</th><th>status</th><th>quality</th><th>p90 ms</th><th>size MB</th><th>budget</th><th>seconds</th></tr>
{% for t in r.trials %}<tr><td>{{ t.number }}</td><td style="text-align:left">{{ label(t.recipe) }}</td>
<td class="{{ 'ok' if t.status == 'ok' else 'bad' }}">{{ t.status }}{% if t.fidelity %} ({{ t.fidelity.epochs }} epochs){% endif %}{% if t.error %}: {{ t.error }}{% endif %}</td>
<td>{{ fmt(t.figures.get('quality')) }}</td><td>{{ fmt(t.figures.get('latency_p90_ms')) }}</td><td>{{ fmt(t.figures.get('size_mb')) }}</td>
<td class="{{ 'ok' if t.feasible else 'bad' }}">{{ 'within' if t.feasible else ('-' if t.status != 'ok' else 'outside') }}</td><td>{{ '%.1f' % t.seconds }}</td></tr>{% endfor %}</table>
<p class="muted">compactai {{ r.environment.versions.get('compactai', '') }} · onnxruntime {{ r.environment.versions.get('onnxruntime', '') }} · torch {{ r.environment.versions.get('torch', '') }} · seed {{ r.seed }} · created {{ r.created }}</p>
</body></html>
"""

ROWS = [
    ("quality (selection split)", "quality", "higher"),
    ("size on disk (MB)", "size_mb", "lower"),
    ("parameters", "params", "lower"),
    ("MACs (batch 1)", "macs", "lower"),
    ("latency p50 (ms)", "latency_p50_ms", "lower"),
    ("latency p90 (ms)", "latency_p90_ms", "lower"),
    ("throughput (items/s)", "throughput_items_per_s", "higher"),
    ("peak memory (MB)", "peak_memory_mb", "lower"),
    ("energy (mJ/inference)", "energy_mj", "lower"),
]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _change(before: Any, after: Any, better: str) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before or not after:
        return "-"
    if better == "lower":
        return f"{before / after:.2f}x smaller" if after <= before else f"{after / before:.2f}x larger"
    return f"{after / before:.3f}x"


def render_report(results: dict[str, Any]) -> str:
    env = Environment(autoescape=select_autoescape(default=True))
    template = env.from_string(TEMPLATE)
    chosen = results.get("chosen") or {}
    source = results.get("source", {})
    target = f"--example {source['example']}" if source.get("example") else source.get("path", "MODEL")
    min_q = [c for c in results["budget"]["constraints"] if c["key"] in ("quality", "quality_relative")]
    other = ",".join(f"{c['key']}{c['op']}{c['value']:g}" for c in results["budget"]["constraints"] if c not in min_q)
    command = f"compactai optimize {target} --budget \"{other}\""
    for c in min_q:
        command += f" --min-quality {'abs:' if c['key'] == 'quality' else ''}{c['value']:g}"
    command += f" --seed {results['seed']}"
    return template.render(
        r=results, rows=ROWS, chosen_fig=chosen.get("figures"), fmt=_fmt, change=_change, label=describe,
        pareto=pareto_svg(results), waterfall=waterfall_svg(results), latency=latency_svg(results),
        recipe_json=json.dumps({"pipeline": results.get("recipe", []), "budget": results["budget"]["text"],
                                "seed": results["seed"]}, indent=2),
        command=command,
    )


def write_report(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_report(results), encoding="utf-8")
    os.replace(tmp, path)
    return path
