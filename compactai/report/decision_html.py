"""The decision report as one self-contained HTML page (no scripts, no external resources)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>compactai decision: cloud or local for {{ d.model }}</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0} td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;vertical-align:top}
td:first-child,th:first-child{text-align:left} .muted{color:#666;font-size:.85rem} .best{background:#e8f5e9;font-weight:600}
td.text{text-align:left;max-width:28rem}
</style></head><body>
<h1>Cloud or local: {{ d.model }}</h1>
<p id="verdict">Cheapest at {{ fmt(d.requests_per_month) }} requests/month (peak {{ fmt(d.peak_qps) }} QPS):
<strong>{{ d.cheapest }}</strong>. Local break-even: {{ fmt(d.break_even.requests_per_day) }} requests/day.</p>
<p class="muted">Figures: {{ d.figures_source }}. Assumptions below are inputs, not measurements; nothing was fetched live.</p>

<h2>Side by side</h2>
<table id="sides"><tr><th>figure</th>{% for s in d.sides %}<th>{{ s.where }}: {{ s.model }} model</th>{% endfor %}</tr>
{% for label, key in rows %}<tr><td>{{ label }}</td>{% for s in d.sides %}<td class="{{ 'best' if key == 'cost_per_month' and d.cheapest == s.where ~ ':' ~ s.model else '' }}">{{ fmt(s[key]) }}</td>{% endfor %}</tr>
{% endfor %}
<tr><td>energy method</td>{% for s in d.sides %}<td>{{ s.energy_method }}</td>{% endfor %}</tr>
<tr><td>what data leaves the device</td>{% for s in d.sides %}<td class="text">{{ s.data_leaving_device }}</td>{% endfor %}</tr>
<tr><td>how updates reach the model</td>{% for s in d.sides %}<td class="text">{{ s.update_path }}</td>{% endfor %}</tr>
</table>

<h2>How each figure was computed</h2>
<table id="formulas"><tr><th>side</th><th>latency</th><th>units</th><th>cost per month</th><th>energy (estimated)</th></tr>
{% for s in d.sides %}<tr><td>{{ s.where }}: {{ s.model }}</td><td class="text">{{ s.latency_formula }}</td><td class="text">{{ s.units_formula }}</td>
<td class="text">{{ s.cost_formula }}</td><td class="text">{{ s.energy_formula }}</td></tr>{% endfor %}</table>
<p id="break-even">Break-even: {{ fmt(d.break_even.requests_per_month) }} requests/month = {{ d.break_even.formula }}. {{ d.break_even.meaning }}</p>
{% if d.roofline %}<h2>Roofline</h2><p id="roofline">{{ d.roofline }}</p>{% endif %}

<h2>Assumptions</h2>
<table id="assumptions"><tr><th>name</th><th>value</th><th>unit</th><th>default</th><th>meaning</th></tr>
{% for a in d.assumptions %}<tr><td>{{ a.name }}</td><td>{{ fmt(a.value) }}</td><td>{{ a.unit }}</td><td>{{ fmt(a.default) }}</td><td class="text">{{ a.meaning }}</td></tr>{% endfor %}</table>
<p class="muted">compactai report --decision · {{ d.created }}</p>
</body></html>
"""

ROWS = [
    ("latency p90 incl. network (ms)", "latency_p90_ms"),
    ("throughput needed at peak (QPS)", "needed_qps"),
    ("throughput per unit (inferences/s)", "throughput_per_unit"),
    ("units needed", "units"),
    ("throughput available (QPS)", "available_qps"),
    ("cost per month (USD)", "cost_per_month"),
    ("cost per million inferences (USD)", "cost_per_million"),
    ("energy per inference (mJ, estimated)", "energy_mj"),
    ("quality", "quality"),
]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def render_decision(decision: dict[str, Any]) -> str:
    env = Environment(autoescape=select_autoescape(default=True))
    return env.from_string(TEMPLATE).render(d=decision, rows=ROWS, fmt=_fmt)


def write_decision(decision: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_decision(decision), encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["render_decision", "write_decision"]
