"""The leaderboard as one self-contained HTML file: no external CSS, JS, fonts or images.

* a sortable table (inline JS: click a header to sort, again to reverse; missing values sort last),
* an accuracy-vs-throughput scatter (inline SVG) with the Pareto front marked,
* each model's average over past nights (inline SVG lines, and a sparkline per table row),
* deltas against the previous night, the rows that were not ranked and why, the protocol and baselines.
"""

from __future__ import annotations

import json
from html import escape
from math import ceil, floor

from gauntlet.leaderboard.board import MEASURES, BoardRow, Leaderboard, Measure, pareto_front, short_night

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22")

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #555; margin: 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort="ascending"]::after { content: " \\25B2"; } th[aria-sort="descending"]::after { content: " \\25BC"; }
td.text, th.text { text-align: left; }
td.missing { color: #999; }
tr.unranked td { color: #777; }
.up { color: #1a7f37; } .down { color: #c62828; } .zero { color: #555; }
.tie { font-weight: bold; color: #8a5a00; }
.ci { color: #777; font-size: 11px; }
line.ci-bar { stroke: #555; stroke-width: 1.2; }
.note { color: #555; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
.axis line, .axis path { stroke: #888; } .grid { stroke: #eee; }
circle.pt { fill: #9aa5b1; stroke: #fff; stroke-width: 1; }
circle.pt.pareto { fill: #d62728; }
polyline.front { fill: none; stroke: #d62728; stroke-width: 1.5; stroke-dasharray: 5 3; }
polyline.trend { fill: none; stroke-width: 2; }
td.reason { text-align: left; white-space: normal; max-width: 640px; }
pre { background: #f7f7f9; padding: 8px; overflow-x: auto; font-size: 12px; }
"""

SORT_JS = """
(function () {
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, col) {
      th.addEventListener('click', function () {
        var ascending = th.getAttribute('aria-sort') !== 'ascending';
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
        var numeric = th.getAttribute('data-type') === 'num';
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
          var xMissing = x === null || x === '', yMissing = y === null || y === '';
          if (xMissing || yMissing) { return xMissing === yMissing ? 0 : (xMissing ? 1 : -1); }
          var c = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
          return ascending ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


def _num(x: float | None, digits: int = 1) -> tuple[str, str]:
    """(data-v, shown text) of a number cell."""
    if x is None:
        return "", "—"
    return repr(float(x)), f"{x:.{digits}f}"


def _cell(x: float | None, digits: int = 1) -> str:
    v, shown = _num(x, digits)
    css = ' class="missing"' if x is None else ""
    return f'<td data-v="{v}"{css}>{shown}</td>'


def _cell_ci(x: float | None, ci: tuple[float, float] | None) -> str:
    """A score with its 95% interval below it (sorting uses the score)."""
    if x is None or ci is None:
        return _cell(x)
    v, shown = _num(x)
    return (f'<td data-v="{v}" title="95% interval {ci[0]:.1f} to {ci[1]:.1f}">{shown}'
            f'<br><span class="ci">{ci[0]:.1f}–{ci[1]:.1f}</span></td>')


def _measure_cell(m: Measure | None, percent: bool) -> str:
    """A perplexity, safety rate or win rate with its 95% interval below it (rates in percent)."""
    if m is None:
        return _cell(None)
    k = 100.0 if percent else 1.0
    return _cell_ci(m.value * k, None if m.lo is None or m.hi is None else (m.lo * k, m.hi * k))


def _text(s: str, title: str | None = None) -> str:
    tip = f' title="{escape(title)}"' if title else ""
    return f'<td class="text" data-v="{escape(s)}"{tip}>{escape(s)}</td>'


def _objective_cell(r: BoardRow) -> str:
    """The training objective (sft, dpo, ...), or a grey — where it is unknown (sorting last)."""
    if r.objective is None:
        return '<td class="text missing" data-v="">—</td>'
    return _text(r.objective)


def _delta_cell(r: BoardRow) -> str:
    if r.delta_average is None:
        return f'<td class="missing" data-v="">{escape(r.delta_note or "—")}</td>'
    d = r.delta_average
    css = "up" if d > 0.005 else "down" if d < -0.005 else "zero"
    extra = f" ({escape(r.delta_note)})" if r.delta_note else ""
    return f'<td class="{css}" data-v="{d!r}">{d:+.1f}{extra}</td>'


def _sparkline(r: BoardRow, width: int = 90, height: int = 22) -> str:
    pts = [p.average for p in r.trend]
    if not pts:
        return '<td class="missing" data-v="">—</td>'
    lo, hi = min(pts), max(pts)
    span = (hi - lo) or 1.0
    step = width / max(1, len(pts) - 1)
    coords = [(2 + i * step * (width - 4) / width, height - 3 - (v - lo) / span * (height - 6)) for i, v in enumerate(pts)]
    title = escape(", ".join(f"{short_night(p.night)}: {p.average:.1f}" for p in r.trend))
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    last_x, last_y = coords[-1]
    return (f'<td data-v="{len(pts)}"><svg class="spark" width="{width}" height="{height}" role="img">'
            f"<title>{title}</title>"
            f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
            f'<circle cx="{last_x:.1f}" cy="{last_y:.1f}" r="2.5" fill="#1f77b4"/></svg></td>')


def ranking_table(board: Leaderboard, links: dict[str, tuple[str, str]] | None = None) -> str:
    """``links``: row key -> (its per-item page, the row it compares with), a last column when given."""
    suites = list(board.suites)
    costs = any(r.cost_usd is not None for r in board.rows)   # endpoints with a price
    heads = ([("Rank", "num"), ("Model", "text"), ("Objective", "text"), ("Variant", "text"), ("Average", "num")]
             + [(f"Suite {s}", "num") for s in suites]
             + [(f"{t} ({board.task_metrics[t]})", "num") for t in board.tasks]
             + [(MEASURES[m][0], "num") for m in board.measures]
             + [("Δ vs previous", "num"), ("Trend (nights)", "num"), ("tokens/s", "num"), ("TTFT ms", "num"),
                ("Peak memory GB", "num"), ("Size on disk GB", "num")] + ([("Cost $", "num")] if costs else [])
             + ([("Items", "text")] if links else []))
    thead = "".join(f'<th data-type="{kind}" class="{kind}">{escape(h)}</th>' for h, kind in heads)
    body = []
    for r in board.ranked():
        rank = ("" if r.rank is None else str(r.rank))
        rank_cell = (f'<td data-v="{rank}" class="tie" title="statistically indistinguishable from its neighbours">'
                     f'{escape(r.rank_text)}</td>' if r.tie else f'<td data-v="{rank}">{rank or "—"}</td>')
        average = (r.ci_low, r.ci_high) if r.ci_low is not None and r.ci_high is not None else None  # set together
        cells = ([rank_cell, _text(r.candidate, title=f"{r.source}" + (f" ({r.note})" if r.note else "")),
                  _objective_cell(r), _text(r.variant), _cell_ci(r.average, average)]
                 + [_cell(r.suites.get(s)) for s in suites]
                 + [_cell_ci(r.normalized.get(t), r.intervals.get(t)) for t in board.tasks]
                 + [_measure_cell(r.measures.get(m), MEASURES[m][1]) for m in board.measures]
                 + [_delta_cell(r), _sparkline(r), _cell(r.tokens_per_s), _cell(r.first_token_latency_ms),
                    _cell(r.peak_memory_gb, 3), _cell(r.size_on_disk_gb, 4)] + ([_cell(r.cost_usd, 4)] if costs else []))
        if links:
            href, other = links.get(r.key, ("", ""))
            cells.append(f'<td class="text" data-v="{escape(other)}"><a class="compare" href="{escape(href)}">'
                         f"vs {escape(other)}</a></td>" if href else '<td class="text missing" data-v="">—</td>')
        body.append(f'<tr data-key="{escape(r.key)}">' + "".join(cells) + "</tr>")
    return (f'<table id="board" class="sortable"><thead><tr>{thead}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


LABEL_CHAR_PX = 6.6  # a generous width of one character of an 11px sans-serif label


def scatter_svg(board: Leaderboard, width: int = 640, height: int = 380) -> str:
    pts = [(r.key, r.tokens_per_s, r.average, r) for r in board.ranked()
           if r.tokens_per_s is not None and r.average is not None]
    if not pts:
        return '<p class="note" id="scatter-empty">No ranked model has both an average and a throughput.</p>'
    front = pareto_front([(k, x, y) for k, x, y, _ in pts])
    left, right, top, bottom = 56, 24, 16, 44
    x_hi = max(x for _, x, _, _ in pts) * 1.15 or 1.0
    y_values = [y for _, _, y, _ in pts] + [v for *_, r in pts for v in (r.ci_low, r.ci_high) if v is not None]
    y_lo = max(0.0, floor(min(y_values) - 5))
    y_hi = min(100.0, ceil(max(y_values) + 5))
    if y_hi - y_lo < 10:
        y_hi = min(100.0, y_lo + 10)
        y_lo = min(y_lo, y_hi - 10)

    def sx(x: float) -> float:
        return left + x / x_hi * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<svg id="scatter" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="average score against tokens per second">']
    for t in _ticks(0, x_hi):
        parts.append(f'<line class="grid" x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{height - bottom}"/>'
                     f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t:.3g}</text>')
    for t in _ticks(y_lo, y_hi):
        parts.append(f'<line class="grid" x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.0f}</text>')
    parts.append(f'<g class="axis"><line x1="{left}" y1="{height - bottom}" x2="{width - right}" '
                 f'y2="{height - bottom}"/><line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/></g>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">'
                 "output tokens/s (batch 1)</text>")
    parts.append(f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" '
                 'text-anchor="middle">average score (0 = chance, 100 = perfect)</text>')
    front_pts = sorted((x, y) for k, x, y, _ in pts if k in front)
    if len(front_pts) > 1:
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in front_pts)
        parts.append(f'<polyline class="front" points="{line}"/>')
    for k, x, y, r in pts:
        on_front = k in front
        label = f"{r.candidate} / {r.variant}"
        bar = ("" if r.ci_low is None or r.ci_high is None else
               f'<line class="ci-bar" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(r.ci_low):.1f}" '
               f'y2="{sy(r.ci_high):.1f}"/>')
        interval = "" if r.ci_low is None else f" (95% interval {r.ci_low:.1f}–{r.ci_high:.1f}, rank {r.rank_text})"
        # Keep the label inside the plot: to the left of the point when it would run past the right edge.
        tx, anchor = sx(x) + 9, "start"
        if tx + LABEL_CHAR_PX * len(label) > width - 2:
            tx, anchor = sx(x) - 9, "end"
        ty = min(max(sy(y) - 7, top + 10), height - bottom - 4)
        parts.append(f'<g class="point" data-key="{escape(k)}">{bar}<circle class="pt{" pareto" if on_front else ""}" '
                     f'cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6"><title>{escape(label)}: average {y:.1f}{interval}, '
                     f'{x:.3g} tokens/s{" — on the Pareto front" if on_front else ""}</title></circle>'
                     f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}">{escape(label)}</text></g>')
    parts.append("</svg>")
    legend = ('<p class="note"><span style="color:#d62728">●</span> on the Pareto front (no other model is both '
              'faster and more accurate, dashed line); <span style="color:#9aa5b1">●</span> dominated.</p>')
    return "".join(parts) + legend


def trend_svg(board: Leaderboard, width: int = 640, height: int = 300) -> str:
    series = [r for r in board.rows if r.trend]
    if not series:
        return '<p class="note">No averages yet.</p>'
    nights = board.nights
    index = {n: i for i, n in enumerate(nights)}
    values = [p.average for r in series for p in r.trend]
    y_lo, y_hi = max(0.0, floor(min(values) - 5)), min(100.0, ceil(max(values) + 5))
    if y_hi - y_lo < 10:
        y_hi = min(100.0, y_lo + 10)
        y_lo = min(y_lo, y_hi - 10)
    left, right, top, bottom = 96, 200, 16, 70
    span = max(1, len(nights) - 1)

    def sx(i: int) -> float:
        return left + (i / span if len(nights) > 1 else 0.5) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<svg id="trend" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="average score per night">']
    for t in _ticks(y_lo, y_hi):
        parts.append(f'<line class="grid" x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.0f}</text>')
    for i, n in enumerate(nights):
        parts.append(f'<text x="{sx(i):.1f}" y="{height - bottom + 14}" text-anchor="end" '
                     f'transform="rotate(-30 {sx(i):.1f} {height - bottom + 14})">{escape(short_night(n))}</text>')
    for j, r in enumerate(series):
        colour = PALETTE[j % len(PALETTE)]
        coords = [(sx(index[p.night]), sy(p.average)) for p in r.trend if p.night in index]
        if len(coords) > 1:
            parts.append(f'<polyline class="trend" stroke="{colour}" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in coords]
        ly = top + 14 * j + 8
        parts.append(f'<rect x="{width - right + 12}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - right + 26}" y="{ly + 1}">{escape(r.candidate + " / " + r.variant)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def others_table(board: Leaderboard) -> str:
    rows = [r for r in board.rows if r.status != "ranked" or r.rank is None]
    if not rows:
        return '<p class="note">Every candidate was ranked.</p>'
    body = "".join(
        f'<tr class="{r.status}">{_text(r.candidate)}{_objective_cell(r)}{_text(r.variant)}{_text(r.status)}'
        f'<td class="reason">{escape(r.reason or "")}</td></tr>' for r in rows)
    return ('<table id="not-ranked" class="sortable"><thead><tr><th class="text" data-type="text">Model</th>'
            '<th class="text" data-type="text">Objective</th><th class="text" data-type="text">Variant</th>'
            '<th class="text" data-type="text">Status</th>'
            f'<th class="text" data-type="text">Reason</th></tr></thead><tbody>{body}</tbody></table>')


def render_html(board: Leaderboard, links: dict[str, tuple[str, str]] | None = None) -> str:
    direction = "higher" if board.higher_is_better else "lower"
    meta = (f"Night {escape(short_night(board.night))} UTC"
            + (f" · compared with {escape(short_night(board.previous_night))}" if board.previous_night
               else " · first night")
            + f" · ranked by <b>{escape(board.rank_key)}</b> ({direction} is better)"
            + (f" · protocol <code>{escape(board.protocol_id)}</code>" if board.protocol_id else ""))
    baselines = "".join(f"<li>{escape(t)} ({escape(board.task_metrics[t])}): {b['value']:.4f} — "
                        f"{escape(str(b['source']))}</li>" for t, b in board.baselines.items())
    ties = ('<p class="note"><span class="tie">2–3</span>: a rank range: a paired test over the items cannot tell '
            'the row apart from its neighbours at 95%, so it could hold any place in the range. Small grey numbers '
            'and the bars in the plot: 95% intervals.</p>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(board.title)}</title><style>{CSS}</style></head>
<body>
<h1>{escape(board.title)}</h1>
<p class="meta">{meta}</p>
<h2>Ranking</h2>
<p class="note">Scores are normalised per task: the random baseline is 0 and a perfect score 100 (below chance
counts as 0); the average is over all tasks. Click a column header to sort; missing values sort last.</p>
{ranking_table(board, links)}
{ties}
<h2>Accuracy against throughput</h2>
{scatter_svg(board)}
<h2>Average over past nights</h2>
{trend_svg(board)}
<h2>Not ranked</h2>
{others_table(board)}
<h2>Protocol and random baselines</h2>
<ul>{baselines}</ul>
<pre id="protocol">{escape(json.dumps(board.protocol, indent=2, sort_keys=True)) if board.protocol else "—"}</pre>
<p class="note">Versions: {escape(json.dumps(board.versions, sort_keys=True))}</p>
<script>{SORT_JS}</script>
</body></html>
"""
