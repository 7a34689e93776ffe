"""Two candidates of the board side by side, item by item: why one ranks above the other.

:func:`item_rows` pairs two reports' lm-eval samples of a task by item (``task/doc_id``; a group's items under their
subtask): the prompt, both responses, both filtered answers (a multiple-choice item's: the choice of highest
log-likelihood, what ``acc`` scores), the target and both item scores (the reports' ``item_scores``, which the
board's paired bootstrap compares); items where the two differ (in score or answer) first, then by doc id. Only
reports that measured the task the same way (:func:`gauntlet.eval.protocol.task_differences`; or an endpoint's the
board ranks beside weights, ``served_alike``) are compared item by item; otherwise the page says how they differ.
:func:`render_compare_page`: both rows' scores with 95% intervals and the paired difference per task, a table of
items per task, the arena battles between the two (arena.py's ``Battle``; none yet, the arena is not on the board).
Model and data text is escaped; the style is the board's (html.py). ``publish.write_board`` writes one page per pair
of neighbouring ranked rows. No Prefect, no MLflow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from html import escape
from itertools import pairwise
from pathlib import Path

from pydantic import BaseModel

from gauntlet.eval.protocol import served_alike, task_differences
from gauntlet.eval.records import answer_of
from gauntlet.eval.scores import evaluated_tasks
from gauntlet.eval.stats import paired_difference
from gauntlet.hashing import sha256_json
from gauntlet.leaderboard.arena import Battle
from gauntlet.leaderboard.board import BoardRow, Leaderboard
from gauntlet.leaderboard.html import CSS, PALETTE, SORT_JS
from gauntlet.refs import EvalReport, MetricLookupError

MAX_ITEMS = 300      # item rows shown per task (differing ones first); the counts cover every item
MAX_TEXT = 4000      # characters of one prompt or response shown
COMPARE_DIR = "compare"

PAGE_CSS = CSS + """
td.item { text-align: left; white-space: pre-wrap; max-width: 360px; vertical-align: top; font-size: 12px; }
td.item code, td.item pre { white-space: pre-wrap; margin: 0; }
tr.differs td { background: #fff8e1; }
#scores td.text { white-space: normal; max-width: 520px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
details summary { cursor: pointer; }
"""


class ItemRow(BaseModel):
    task: str                       # the task the item belongs to (a group's subtask)
    doc_id: str
    prompt: str = ""                # what the model was given (a multiple-choice item's context)
    response_a: str = ""            # the generation, or each choice's log-likelihood
    response_b: str = ""
    answer_a: str = ""              # the filtered answer, or the choice picked
    answer_b: str = ""
    target: str = ""
    score_a: float | None = None    # the report's item score under the task's metric
    score_b: float | None = None
    differs: bool = False           # scored or answered differently

    @property
    def key(self) -> str:
        return f"{self.task}/{self.doc_id}"


class NotComparable(ValueError):
    """Two reports whose measurements of a task differ: their items are not compared one by one."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("; ".join(reasons))


def _order(key: str) -> tuple[str, int, int | str]:
    task, _, doc = key.rpartition("/")
    return (task, 0, int(doc)) if doc.isdigit() else (task, 1, doc)


def read_samples(path: str | Path) -> dict[str, dict[str, dict]]:
    """lm-eval's per-item rows as the evaluate stage writes them (``eval/scoring.write_task_files``: one JSON line
    per item and filter, the report's task name in ``task``): ``task/doc_id`` -> filter -> row, of the first repeat.
    Empty when the file is not here or holds no lm-eval rows (the judge's and the safety tasks' own records)."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[str, dict[str, dict]] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "doc_id" not in row or "filter" not in row or row.get("repeat", 0):
            continue
        out.setdefault(f"{row.get('task')}/{row['doc_id']}", {})[str(row["filter"])] = row
    return out


def _arguments(row: dict) -> list[list]:
    """An item's requests as lists (lm-eval's CLI writes ``{"gen_args_0": {"arg_0": …}}``, Gauntlet lists)."""
    args = row.get("arguments") or []
    if isinstance(args, dict):
        def num(k: str) -> int:
            return int(k.rpartition("_")[2]) if k.rpartition("_")[2].isdigit() else 0
        args = [[v[k] for k in sorted(v, key=num)] if isinstance(v, dict) else [v]
                for v in (args[k] for k in sorted(args, key=num))]
    return [list(a) if isinstance(a, (list, tuple)) else [a] for a in args]


def _first_text(x: object) -> str:
    return _first_text(x[0]) if isinstance(x, (list, tuple)) and x else "" if x is None or x == [] else str(x)


def _choice_lls(row: dict) -> list[float] | None:
    """A multiple-choice item's log-likelihood per choice (``filtered_resps`` = [[ll, is_greedy], …]), else None."""
    filtered = row.get("filtered_resps")
    if not isinstance(filtered, list) or not filtered or not all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], (int, float)) and isinstance(x[1], bool)
            for x in filtered):
        return None
    return [float(x[0]) for x in filtered]


def _texts(row: dict | None) -> tuple[str, str, str, str]:
    """(prompt, response, filtered answer, target) of one sample row."""
    if row is None:
        return "", "", "", ""
    args, target = _arguments(row), row.get("target")
    prompt = str(args[0][0]) if args and args[0] else ""
    lls = _choice_lls(row)
    if lls is not None and len(lls) == len(args):
        choices = [str(a[1]) if len(a) > 1 else "" for a in args]
        pick = max(range(len(lls)), key=lls.__getitem__)
        response = "\n".join(f"{c.strip() or repr(c)}: {ll:.2f}" for c, ll in zip(choices, lls, strict=True))
        t = str(target)
        return prompt, response, choices[pick], choices[int(t)] if t.isdigit() and int(t) < len(choices) else t
    return prompt, _first_text(row.get("resps")), _first_text(row.get("filtered_resps")), _first_text(target)


def _pick(rows: dict[str, dict] | None, filt: str) -> dict | None:
    return (rows.get(filt) or next(iter(rows.values()))) if rows else None


def task_metric(report: EvalReport, task: str, metric: str | None = None) -> str:
    """The metric's name in the report (``exact_match`` → ``exact_match,first-word``); default the task's own."""
    result = report.result(task)
    name = metric or (result.metric if result else "")
    try:
        return report.resolve(task, name).metric
    except MetricLookupError:
        return result.metric if result else name


def not_compared(a: EvalReport, b: EvalReport, task: str) -> list[str]:
    """Why two reports' items of ``task`` are not compared one by one (empty: they are)."""
    missing = [f"{r.model} ({r.variant}) has no result for {task}" for r in (a, b) if r.result(task) is None]
    if missing:
        return missing
    diffs = [] if served_alike(a, b) else task_differences(a, b, task)   # an endpoint the board ranks beside weights
    return [f"measured differently: {d}" for d in diffs[:4]] + ([f"(+{len(diffs) - 4} more)"] if len(diffs) > 4
                                                                  else [])


def item_rows(report_a: EvalReport, report_b: EvalReport, task: str, metric: str | None = None) -> list[ItemRow]:
    """Both reports' items of ``task`` paired by ``task/doc_id``, differing ones first (then by doc id).
    :class:`NotComparable` when the two did not measure the task the same way."""
    reasons = not_compared(report_a, report_b, task)
    if reasons:
        raise NotComparable(reasons)
    ra, rb = report_a.result(task), report_b.result(task)
    assert ra is not None and rb is not None   # not_compared says so otherwise
    metric = task_metric(report_a, task, metric)
    filt = metric.partition(",")[2] or "none"
    scores_a, scores_b = ra.item_scores.get(metric, {}), rb.item_scores.get(metric, {})
    samples_a, samples_b = read_samples(ra.samples_path), read_samples(rb.samples_path)
    rows = []
    for key in set(scores_a) | set(scores_b) | set(samples_a) | set(samples_b):
        sa, sb = _pick(samples_a.get(key), filt), _pick(samples_b.get(key), filt)
        prompt, resp_a, ans_a, target = _texts(sa)
        prompt_b, resp_b, ans_b, target_b = _texts(sb)
        score_a, score_b = scores_a.get(key), scores_b.get(key)
        answers_differ = ans_a != ans_b if _choice_lls(sa or {}) else (sa and sb and answer_of(sa) != answer_of(sb))
        task_name, _, doc = key.rpartition("/")
        rows.append(ItemRow(task=task_name, doc_id=doc, prompt=prompt or prompt_b, response_a=resp_a,
                            response_b=resp_b, answer_a=ans_a, answer_b=ans_b, target=target or target_b,
                            score_a=score_a, score_b=score_b, differs=score_a != score_b or bool(answers_differ)))
    return sorted(rows, key=lambda r: (not r.differs, _order(r.key)))


def _slugs(rows: Sequence[BoardRow]) -> dict[str, str]:
    plain = {r.key: re.sub(r"[^A-Za-z0-9._-]+", "-", f"{r.candidate}-{r.variant}").strip("-") or "row" for r in rows}
    taken = list(plain.values())
    return {k: s if taken.count(s) == 1 else f"{s}-{sha256_json(k)[:6]}" for k, s in plain.items()}


def compare_pairs(board: Leaderboard) -> list[tuple[BoardRow, BoardRow, str]]:
    """(upper, lower, page path relative to the board) of each ranked row and the one ranked just above it: the
    top row's page is the one with the second. One page per neighbouring pair: linear in the rows."""
    ranked = board.ranked()
    slugs = _slugs(ranked)
    return [(a, b, f"{COMPARE_DIR}/{slugs[a.key]}--{slugs[b.key]}.html") for a, b in pairwise(ranked)]


def compare_links(board: Leaderboard) -> dict[str, tuple[str, str]]:
    """Row key -> (its page, the row it is compared with), for the board's table."""
    links: dict[str, tuple[str, str]] = {}
    for a, b, path in compare_pairs(board):
        links.setdefault(a.key, (path, f"{b.candidate} / {b.variant}"))
        links[b.key] = (path, f"{a.candidate} / {a.variant}")
    return links


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"… ({len(text) - MAX_TEXT} more characters)"


def _label(row: BoardRow) -> str:
    return f"{row.candidate} / {row.variant}"


def _swatch(i: int) -> str:   # the two rows' colours, the board's first two
    return f'<span class="swatch" style="background:{PALETTE[i]}"></span>'


def _num(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _score_cell(row: BoardRow, report: EvalReport | None, task: str, metric: str) -> str:
    """The board's normalised score and its 95% interval, and below it the raw score with the report's interval."""
    norm, iv = row.normalized.get(task), row.intervals.get(task)
    shown = _num(norm, 1) + ("" if not iv else f' <span class="ci">{iv[0]:.1f}–{iv[1]:.1f}</span>')
    try:
        s = report.resolve(task, metric) if report is not None else None
    except MetricLookupError:
        s = None
    raw = "" if s is None else (f"<br><span class=\"ci\">{escape(metric)} {s.value:.4f}"
                                + ("" if s.ci_low is None or s.ci_high is None else
                                   f" ({s.ci_low:.4f}–{s.ci_high:.4f})") + "</span>")
    return f'<td data-v="{"" if norm is None else repr(norm)}">{shown}{raw}</td>'


def _paired(a: EvalReport | None, b: EvalReport | None, task: str, metric: str) -> str:
    ra, rb = (a.result(task) if a else None), (b.result(task) if b else None)
    if ra is None or rb is None:
        return "—"
    try:
        return paired_difference(ra.item_scores.get(metric, {}), rb.item_scores.get(metric, {})).text()
    except ValueError:
        return "no paired items"


class _TaskView(BaseModel):
    task: str
    metric: str
    rows: list[ItemRow] = []
    reasons: list[str] = []         # why its items are not compared (empty: they are)

    @property
    def differing(self) -> int:
        return sum(r.differs for r in self.rows)


def _task_view(row_a: BoardRow, row_b: BoardRow, a: EvalReport | None, b: EvalReport | None, task: str,
               metric: str | None) -> _TaskView:
    if a is None or b is None:
        missing = [_label(r) for r, rep in ((row_a, a), (row_b, b)) if rep is None]
        return _TaskView(task=task, metric=metric or "", reasons=[f"the report of {m} is not readable here"
                                                                   for m in missing])
    name = task_metric(a, task, metric)
    try:
        return _TaskView(task=task, metric=name, rows=item_rows(a, b, task, name))
    except NotComparable as e:
        return _TaskView(task=task, metric=name, reasons=e.reasons)


def _scores_table(row_a: BoardRow, row_b: BoardRow, a: EvalReport | None, b: EvalReport | None,
                  views: list[_TaskView]) -> str:
    head = (f'<tr><th class="text" data-type="text">Task</th><th data-type="num">{_swatch(0)}{escape(_label(row_a))}'
            f'</th><th data-type="num">{_swatch(1)}{escape(_label(row_b))}</th><th class="text" data-type="text">'
            f'Paired difference {escape(row_a.candidate)} − {escape(row_b.candidate)} (raw score, points)</th>'
            '<th data-type="num">Items differing</th></tr>')
    def average(r: BoardRow) -> str:
        ci = "" if r.ci_low is None or r.ci_high is None else f' <span class="ci">{r.ci_low:.1f}–{r.ci_high:.1f}</span>'
        return (f'<td data-v="{"" if r.average is None else repr(r.average)}">{_num(r.average, 1)}{ci}'
                f'<br><span class="ci">rank {escape(r.rank_text)}</span></td>')
    body = [f'<tr data-task=""><td class="text">average</td>{average(row_a)}{average(row_b)}<td class="text">'
            '</td><td data-v=""></td></tr>']
    for v in views:
        count = "—" if v.reasons else f"{v.differing} of {len(v.rows)}"
        body.append(f'<tr data-task="{escape(v.task)}"><td class="text"><a href="#task-{escape(v.task)}">'
                    f'{escape(v.task)}</a></td>{_score_cell(row_a, a, v.task, v.metric)}'
                    f'{_score_cell(row_b, b, v.task, v.metric)}<td class="text">'
                    f'{escape(_paired(a, b, v.task, v.metric))}</td><td data-v="{v.differing}">{count}</td></tr>')
    return f'<table id="scores" class="sortable"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _text_cell(text: str, css: str = "item") -> str:
    return f'<td class="{css}" data-v="{escape(text[:200])}">{escape(_clip(text))}</td>'


def _item_tr(r: ItemRow) -> str:
    lines = [s.strip() for s in r.prompt.splitlines() if s.strip() and not s.lstrip().startswith("###")]
    summary = lines[-1][:80] if lines else r.prompt.strip()[:80] or "—"   # the item's own question, last
    prompt = (f'<td class="item prompt" data-v="{escape(r.prompt[:200])}"><details><summary>{escape(summary)}'
              f'</summary><pre>{escape(_clip(r.prompt))}</pre></details></td>')
    def score(x: float | None) -> str:
        return f'<td class="score" data-v="{"" if x is None else repr(x)}">{_num(x)}</td>'
    return (f'<tr class="item{" differs" if r.differs else ""}" data-key="{escape(r.key)}" '
            f'data-differs="{int(r.differs)}"><td class="text" data-v="{escape(r.key)}">{escape(r.key)}</td>{prompt}'
            f'{_text_cell(r.target, "item target")}{_text_cell(r.answer_a, "item answer-a")}{score(r.score_a)}'
            f'{_text_cell(r.answer_b, "item answer-b")}{score(r.score_b)}{_text_cell(r.response_a, "item response-a")}'
            f'{_text_cell(r.response_b, "item response-b")}</tr>')


def _task_section(row_a: BoardRow, row_b: BoardRow, v: _TaskView) -> str:
    title = f'<h2 id="task-{escape(v.task)}">{escape(v.task)} ({escape(v.metric)})</h2>'
    if v.reasons:
        return title + ('<p class="note not-compared">Not compared item by item: '
                        + escape("; ".join(v.reasons)) + ".</p>")
    better = sum(r.score_a is not None and r.score_b is not None and r.score_a > r.score_b for r in v.rows)
    worse = sum(r.score_a is not None and r.score_b is not None and r.score_a < r.score_b for r in v.rows)
    same = v.differing - better - worse
    note = (f'<p class="note"><b class="differing">{v.differing}</b> of {len(v.rows)} items differ: '
            f"{escape(row_a.candidate)} scores higher on {better}, {escape(row_b.candidate)} on {worse}; {same} "
            "answered differently (or scored on one side only) with no difference in score. Differing items come "
            "first (shaded), then the rest by doc id.</p>")
    if not v.rows:
        return title + '<p class="note">No items were scored (no per-item records in the reports).</p>'
    a, b = escape(row_a.candidate), escape(row_b.candidate)
    heads = [("Item", "text"), ("Prompt", "text"), ("Target", "text"), (f"{a} answer", "text"),
             (f"{a} score", "num"), (f"{b} answer", "text"), (f"{b} score", "num"), (f"{a} response", "text"),
             (f"{b} response", "text")]
    thead = "".join(f'<th class="{k}" data-type="{k}">{h}</th>' for h, k in heads)
    shown = v.rows[:MAX_ITEMS]
    more = ("" if len(v.rows) <= len(shown) else
            f'<p class="note">{len(v.rows) - len(shown)} more items not shown (all alike or beyond the first '
            f"{MAX_ITEMS}).</p>")
    return (f'{title}{note}<table class="items sortable" data-task="{escape(v.task)}"><thead><tr>{thead}</tr>'
            f'</thead><tbody>{"".join(_item_tr(r) for r in shown)}</tbody></table>{more}')


def _battles_section(row_a: BoardRow, row_b: BoardRow, battles: Sequence[Battle] | None) -> str:
    """The arena battles between the two, each outcome as ``row_a``'s (1 win, 0.5 tie, 0 loss; both orders)."""
    distinct = row_a.candidate != row_b.candidate
    ids_a = {row_a.key} | ({row_a.candidate} if distinct else set())
    ids_b = {row_b.key} | ({row_b.candidate} if distinct else set())
    mine = [(bt.item, bt.outcome, bt.len_a, bt.len_b) for bt in battles or []
            if bt.model_a in ids_a and bt.model_b in ids_b]
    mine += [(bt.item, 1.0 - bt.outcome, bt.len_b, bt.len_a) for bt in battles or []
             if bt.model_a in ids_b and bt.model_b in ids_a]
    if not mine:
        return '<h2>Arena battles</h2><p class="note" id="no-battles">No battles between these two yet.</p>'
    won, lost = sum(o > 0.5 for _, o, *_ in mine), sum(o < 0.5 for _, o, *_ in mine)
    a = escape(row_a.candidate)
    rows = "".join(f'<tr class="battle"><td class="text" data-v="{escape(i)}">{escape(i)}</td>'
                   f'<td data-v="{o!r}">{o:.2f}</td><td data-v="{la}">{la}</td><td data-v="{lb}">{lb}</td></tr>'
                   for i, o, la, lb in sorted(mine))
    return (f'<h2>Arena battles</h2><p class="note">{a} won {won}, lost {lost} and tied {len(mine) - won - lost} of '
            f"{len(mine)} battles (each judged in both orders; the outcome is {a}'s mean: 1 win, 0.5 tie, 0 loss).</p>"
            f'<table id="battles" class="sortable"><thead><tr><th class="text" data-type="text">Instruction</th>'
            f'<th data-type="num">Outcome for {a}</th><th data-type="num">{a} length</th>'
            f'<th data-type="num">{escape(row_b.candidate)} length</th></tr></thead><tbody>{rows}</tbody></table>')


def _tasks(row_a: BoardRow, row_b: BoardRow, reports: Sequence[EvalReport | None]) -> list[str]:
    listed = [*row_a.raw, *row_b.raw] + [t for r in reports if r is not None for t in evaluated_tasks(r)]
    return list(dict.fromkeys(listed))


def render_compare_page(row_a: BoardRow, row_b: BoardRow, reports: Mapping[str, EvalReport],
                        battles: Sequence[Battle] | None = None, metrics: Mapping[str, str] | None = None,
                        board_href: str = "../leaderboard.html") -> str:
    """The page comparing two board rows item by item (``reports`` by row key; ``metrics``: the board's metric per
    task, default each task's own; ``battles``: the arena's, any pairs, those of these two are shown)."""
    a, b = reports.get(row_a.key), reports.get(row_b.key)
    views = [_task_view(row_a, row_b, a, b, t, (metrics or {}).get(t)) for t in _tasks(row_a, row_b, [a, b])]
    title = f"{_label(row_a)} vs {_label(row_b)}"
    meta = (f'<a href="{escape(board_href)}">← the board</a> · {_swatch(0)}{escape(_label(row_a))} (rank '
            f"{escape(row_a.rank_text)}) against {_swatch(1)}{escape(_label(row_b))} (rank {escape(row_b.rank_text)})"
            + (f" · protocol <code>{escape(row_a.protocol_id)}</code>" if row_a.protocol_id else ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{PAGE_CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="meta">{meta}</p>
<h2>Scores</h2>
<p class="note">Per task: the board's normalised score (0 = chance, 100 = perfect) with its 95% interval, and below it
the raw score with the report's interval. The paired difference is over the items both answered (paired bootstrap):
it is what decides whether one row is ahead of the other.</p>
{_scores_table(row_a, row_b, a, b, views)}
{"".join(_task_section(row_a, row_b, v) for v in views)}
{_battles_section(row_a, row_b, battles)}
<script>{SORT_JS}</script>
</body></html>
"""
