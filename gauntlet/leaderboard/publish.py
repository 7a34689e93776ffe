"""Publication: ``leaderboard.json`` (the data), ``leaderboard.md`` and the self-contained ``leaderboard.html``
with a per-item page per pair of neighbouring ranked rows (``compare/``, leaderboard/compare_page.py), and the flat
rows of the Prefect table artifact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.eval.report import load_report
from gauntlet.files import write_json, write_text
from gauntlet.leaderboard.arena import Battle
from gauntlet.leaderboard.board import MEASURES, Leaderboard, short_night
from gauntlet.leaderboard.compare_page import COMPARE_DIR, compare_links, compare_pairs, render_compare_page
from gauntlet.leaderboard.html import render_html
from gauntlet.project import in_project
from gauntlet.refs import EvalReport
from gauntlet.state import gauntlet_home


def publish_dir(spec: LeaderboardSpec) -> Path:
    if spec.publish.dir:
        return in_project(spec.publish.dir)
    return gauntlet_home() / "leaderboard" / spec.name


def _fmt(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def one_line(text: str | None) -> str:
    """A reason on one line (tables cannot hold a traceback's line breaks)."""
    return " ".join((text or "").split()).replace("|", "/")


RANK_NOTE = ("Scores in brackets: 95% intervals (paired bootstrap over the items). A rank range such as `2–3`: "
             "a paired test cannot tell the row apart from its neighbours at 95%, so its place is anywhere in the "
             "range; `=`: tied at the displayed precision (speed keys).")


def render_markdown(board: Leaderboard) -> str:
    suites = list(board.suites)
    costs = any(r.cost_usd is not None for r in board.rows)   # endpoints with a price
    head = (["rank", "model", "objective", "variant", "average"] + [f"suite {s}" for s in suites] + board.tasks
            + [MEASURES[m][0] for m in board.measures] + ["Δ avg", "tokens/s", "TTFT ms", "peak GB", "size GB"]
            + (["cost $"] if costs else []))
    lines = [f"# {board.title}", "",
             f"- night: {short_night(board.night)} UTC"
             + (f" (previous: {short_night(board.previous_night)})" if board.previous_night else ""),
             f"- ranked by **{board.rank_key}** ({'higher' if board.higher_is_better else 'lower'} is better); "
             "scores normalised: random baseline = 0, perfect = 100",
             f"- protocol `{board.protocol_id}`" if board.protocol_id else "- no model was scored",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in board.rows:
        if r.status != "ranked":
            continue
        delta = _fmt(r.delta_average, signed=True) if r.delta_average is not None else (r.delta_note or "—")
        average = _fmt(r.average) + ("" if r.ci_low is None else f" ({r.ci_low:.1f}–{r.ci_high:.1f})")
        cells = ([r.rank_text, r.candidate, r.objective or "—", r.variant, average]
                 + [_fmt(r.suites.get(s)) for s in suites]
                 + [_fmt(r.normalized.get(t)) + ("" if not (iv := r.intervals.get(t)) else
                                                 f" ({iv[0]:.0f}–{iv[1]:.0f})")
                    for t in board.tasks]
                 + [r.measures[m].text(MEASURES[m][1]) if m in r.measures else "—" for m in board.measures]
                 + [delta, _fmt(r.tokens_per_s), _fmt(r.first_token_latency_ms), _fmt(r.peak_memory_gb, 3),
                    _fmt(r.size_on_disk_gb, 4)] + ([_fmt(r.cost_usd, 4)] if costs else []))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", RANK_NOTE]
    unscored = [r for r in board.ranked() if r.rank is None]
    lines += [f"- {r.candidate} / {r.variant}: {one_line(r.reason)}" for r in unscored]
    others = [r for r in board.rows if r.status != "ranked"]
    if others:
        lines += ["", "## Not ranked", "", "| model | objective | variant | status | reason |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.candidate} | {r.objective or '—'} | {r.variant} | {r.status} | {one_line(r.reason)} |"
                  for r in others]
    lines += ["", "## Random baselines", ""]
    lines += [f"- {t} ({board.task_metrics[t]}): {b['value']:.4f} — {b['source']}" for t, b in board.baselines.items()]
    return "\n".join(lines + where_jobs_ran(board)) + "\n"


def where_jobs_ran(board: Leaderboard) -> list[str]:
    """The night's jobs by host and GPU, and how busy each GPU worker was."""
    jobs = [r for r in board.rows if r.worker]
    if not jobs:
        return []
    lines = ["", "## Where each job ran", "", "| model | variant | host | worker | GPU | wall s | GPU s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.candidate} | {r.variant} | {r.host} | {r.worker} | {r.gpu} | {_fmt(r.wall_s)} | {_fmt(r.gpu_s)} |"
              for r in jobs]
    lines += ["", f"## GPU workers (the night: {_fmt(board.wall_s)} s)", "", "| worker | GPU | jobs | GPU s | busy |",
              "|---|---|---|---|---|"]
    lines += [f"| {w.worker} | {w.gpu} | {w.jobs} | {_fmt(w.gpu_s)} | "
              f"{'—' if w.busy is None else f'{w.busy:.0%}'} |" for w in board.workers]
    return lines


def write_board(board: Leaderboard, out_dir: Path, reports: Mapping[str, EvalReport] | None = None,
                battles: Sequence[Battle] | None = None) -> dict[str, str]:
    """Write leaderboard.json, leaderboard.md and the self-contained leaderboard.html (each ranked row linked to its
    per-item page, written into ``compare/``: :func:`write_compare_pages`); returns the three files' paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "leaderboard.json", "md": out_dir / "leaderboard.md",
             "html": out_dir / "leaderboard.html"}
    board = board.model_copy(update={"files": {k: str(v) for k, v in files.items()}})
    # each written whole (a temporary file renamed over the old one): a reader or a killed run never
    # leaves a half-written board where the last good one was
    write_text(files["md"], render_markdown(board))
    write_compare_pages(board, out_dir, reports, battles)
    write_text(files["html"], render_html(board, compare_links(board)))
    write_json(files["json"], board.model_dump(mode="json"))
    return board.files


def write_compare_pages(board: Leaderboard, out_dir: Path, reports: Mapping[str, EvalReport] | None = None,
                        battles: Sequence[Battle] | None = None) -> list[Path]:
    """One page per ranked row and the row ranked just above it (the top row's: with the second), so N - 1 pages
    for N rows; reports by row key, else read from each row's report_path (a page says which it could not read);
    pages of rows no longer ranked are removed. Returns the pages written."""
    known = dict(reports or {})
    for r in board.ranked():
        if r.key not in known and r.report_path and Path(r.report_path).is_file():
            try:
                known[r.key] = load_report(r.report_path)
            except (OSError, ValueError):
                continue   # the page says the report is not readable here
    written = []
    for a, b, rel in compare_pairs(board):
        html = render_compare_page(a, b, known, battles, metrics=board.task_metrics)
        written.append(write_text(out_dir / rel, html))
    for stale in (out_dir / COMPARE_DIR).glob("*.html"):
        if stale not in written:
            stale.unlink(missing_ok=True)
    return written


def table_rows(board: Leaderboard) -> list[dict[str, Any]]:
    """One flat dict per row, for the Prefect table artifact."""
    out = []
    for r in board.rows:
        row: dict[str, Any] = {"rank": r.rank if r.rank is not None else "", "model": r.candidate,
                               "objective": r.objective or "—", "variant": r.variant, "status": r.status,
                               "average": None if r.average is None else round(r.average, 2)}
        row.update({t: None if (v := r.normalized.get(t)) is None else round(v, 2) for t in board.tasks})
        row.update({m: None if m not in r.measures else round(r.measures[m].value, 4) for m in board.measures})
        row.update({"delta": None if r.delta_average is None else round(r.delta_average, 2),
                    "tokens_per_s": r.tokens_per_s, "peak_memory_gb": r.peak_memory_gb,
                    "size_on_disk_gb": r.size_on_disk_gb, "cost_usd": r.cost_usd,
                    "reason": r.reason or r.delta_note or ""})
        out.append(row)
    return out
