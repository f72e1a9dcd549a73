"""The federated report: accuracy per round (centralised and federated), bytes per round and
per-client accuracy, from the ``federated`` section of results.json only."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape

from compactai.report.figures import _svg, plt

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>compactai federate: {{ r.model.name }}</title>
<style>body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1000px;color:#222;padding:0 1rem}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0} td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
td:first-child,th:first-child{text-align:left} h2{font-size:1.1rem;border-bottom:1px solid #ddd} svg{max-width:100%;height:auto}
.muted{color:#666;font-size:.85rem}</style></head><body>
<h1>compactai federate: {{ r.model.name }}</h1>
<p id="verdict">{{ f.summary }}</p>
<p class="muted">Strategy {{ f.config.strategy }} · {{ f.config.clients }} clients · {{ f.config.rounds }} rounds ·
partition {{ f.config.partition }} · local epochs {{ f.config.local_epochs }} · compression {{ f.config.compression }} ·
engine {{ f.engine }} · privacy: {{ privacy }} · seed {{ r.seed }}</p>
<h2>Accuracy per round</h2><figure id="rounds-plot">{{ figure | safe }}</figure>
<table id="rounds"><tr><th>round</th><th>centralised accuracy</th><th>centralised loss</th><th>federated accuracy</th>
<th>federated loss</th><th>clients trained</th><th>bytes down</th><th>bytes up</th></tr>
{% for e in f.rounds %}<tr><td>{{ e.round }}</td><td>{{ fmt((e.centralised or {}).accuracy) }}</td><td>{{ fmt((e.centralised or {}).loss) }}</td>
<td>{{ fmt((e.federated or {}).accuracy) }}</td><td>{{ fmt((e.federated or {}).loss) }}</td><td>{{ e.clients_trained or '-' }}</td>
<td>{{ '{:,}'.format(e.bytes_down) }}</td><td>{{ '{:,}'.format(e.bytes_up) }}</td></tr>{% endfor %}</table>
<p class="muted">Centralised: the global model on the task's validation split (round 0 = the starting model).
Federated: clients' held-out data, weighted by sample count. Test split: start {{ fmt(f.round0_test.accuracy) }},
final {{ fmt(f.test.accuracy) }}{% if f.clients_alone %}; clients trained alone (mean) {{ fmt(f.clients_alone.mean_accuracy) }}{% endif %}.</p>
<h2>Per-client accuracy (last round, held-out data)</h2>
<table id="clients"><tr><th>client</th><th>train samples</th><th>held-out samples</th><th>labels per class</th><th>accuracy</th><th>alone (test)</th></tr>
{% for c in f.clients %}<tr><td>{{ c.client }}</td><td>{{ c.train_samples }}</td><td>{{ c.holdout_samples }}</td>
<td>{{ c.labels | join(' ') }}</td><td>{{ fmt(c.accuracy) }}</td><td>{{ fmt(c.alone_accuracy) }}</td></tr>{% endfor %}</table>
</body></html>
"""


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else html.escape(str(value)))


def rounds_svg(federated: dict[str, Any]) -> str:
    """Centralised and federated accuracy against the round."""
    rounds = federated["rounds"]
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    central = [(e["round"], e["centralised"]["accuracy"]) for e in rounds if e.get("centralised")]
    fed = [(e["round"], e["federated"]["accuracy"]) for e in rounds if e.get("federated")]
    if central:
        ax.plot(*zip(*central), marker="o", label="centralised (validation split)")
    if fed:
        ax.plot(*zip(*fed), marker="s", label="federated (clients' held-out data)")
    alone = (federated.get("clients_alone") or {}).get("mean_accuracy")
    if alone is not None:
        ax.axhline(alone, color="#888888", linestyle=":", label="clients alone (mean, test)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{federated['config']['strategy']}, {federated['config']['partition']}")
    ax.legend(fontsize=8)
    return _svg(fig)


def render_federated_report(results: dict[str, Any]) -> str:
    federated = results["federated"]
    privacy = federated["privacy"]
    text = (f"DP ({privacy['side']}-side fixed clipping, clip {privacy['clipping_norm']}, noise multiplier "
            f"{privacy['noise_multiplier']})" if privacy["differential_privacy"] else "no differential privacy")
    env = Environment(autoescape=select_autoescape(default=True))
    return env.from_string(TEMPLATE).render(r=results, f=federated, fmt=_fmt, privacy=text,
                                            figure=rounds_svg(federated))


def write_federated_report(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_federated_report(results), encoding="utf-8")
    os.replace(tmp, path)
    return path
