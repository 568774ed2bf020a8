"""Write leaderboard.md, leaderboard.csv and a static index.html (images embedded)."""

from __future__ import annotations

import base64
import csv
import html
import io
import shutil
from pathlib import Path

from setok_eval.io import atomic_write_text
from setok_eval.leaderboard.compare import Cell, FamilyTable, Run


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def _value(cell: Cell) -> str:
    text = fmt(cell.value)
    if cell.ci95:
        text += f" [{fmt(cell.ci95[0])}, {fmt(cell.ci95[1])}]"
    return text


def _delta(cell: Cell | None) -> str:
    if cell is None or cell.delta is None:
        return ""
    text = f"{cell.delta:+.4g}"
    if cell.delta_ci95:
        text += f" [{cell.delta_ci95[0]:+.3g}, {cell.delta_ci95[1]:+.3g}]"
    if cell.p_value is not None:
        text += f" p={cell.p_value:.3g}"
    return text


def _arrow(hib: bool | None) -> str:
    return {True: " ↑", False: " ↓", None: ""}[hib]


def markdown(
    tables: list[FamilyTable],
    runs: list[Run],
    baseline: Run,
    notes: list[str],
    figures: dict[str, str],
) -> str:
    lines = [
        "# Leaderboard",
        "",
        f"Baseline: **{baseline.name}**. Cells: value [95% CI]; "
        "Δ: run − baseline [95% paired bootstrap CI], p from exact McNemar (0/1 scores) or "
        "paired bootstrap. Best value per column in bold.",
        "",
    ]
    lines += [f"> note: {n}" for n in notes]
    for table in tables:
        lines += ["", f"## {table.family}", ""]
        header = ["run"]
        for c in table.columns:
            header += [f"{c.task}/{c.metric}{_arrow(c.higher_is_better)}", "Δ"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for run in runs:
            row = [run.name + (" (baseline)" if run is baseline else "")]
            for c in table.columns:
                cell = table.cells.get((run.name, c.task, c.metric))
                value = (
                    "" if cell is None else (f"**{_value(cell)}**" if cell.best else _value(cell))
                )
                row += [value, _delta(cell)]
            lines.append("| " + " | ".join(row) + " |")
    for title, rel in figures.items():
        lines += ["", f"## {title}", "", f"![{title}]({rel})"]
    return "\n".join(lines) + "\n"


def csv_text(tables: list[FamilyTable], runs: list[Run], baseline: Run) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "family",
            "task",
            "metric",
            "run",
            "is_baseline",
            "value",
            "ci_lo",
            "ci_hi",
            "n",
            "delta",
            "delta_lo",
            "delta_hi",
            "p_value",
            "test",
            "is_best",
            "higher_is_better",
        ]
    )
    for table in tables:
        for c in table.columns:
            for run in runs:
                cell = table.cells.get((run.name, c.task, c.metric))
                if cell is None:
                    continue
                ci = cell.ci95 or [None, None]
                dci = cell.delta_ci95 or (None, None)
                writer.writerow(
                    [
                        table.family,
                        c.task,
                        c.metric,
                        run.name,
                        run is baseline,
                        cell.value,
                        ci[0],
                        ci[1],
                        cell.n,
                        cell.delta,
                        dci[0],
                        dci[1],
                        cell.p_value,
                        cell.test,
                        cell.best,
                        c.higher_is_better,
                    ]
                )
    return buf.getvalue()


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 24px}
th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.baseline td{background:#f3f6fb}
td.delta{color:#555}
img{max-width:900px;display:block;margin:8px 0}
.overlays img{display:inline-block;width:200px;margin:4px}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = 0;
  imgs.forEach(function (im) {
    var loaded = im.complete && im.naturalWidth > 0;
    im.setAttribute('data-loaded', loaded ? '1' : '0');
    if (loaded) ok += 1;
  });
  document.getElementById('image-status').textContent = 'images loaded: ' + ok + '/' + imgs.length;
});
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def html_page(
    tables: list[FamilyTable],
    runs: list[Run],
    baseline: Run,
    notes: list[str],
    figures: dict[str, Path],
    overlays: dict[str, list[Path]],
) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>SeTok leaderboard</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        "<h1>Leaderboard</h1>",
        f"<p>Baseline: <b>{e(baseline.name)}</b>. Cells: value [95% CI]; Δ: run − baseline "
        "[95% paired bootstrap CI], p from exact McNemar (0/1 scores) or paired bootstrap. "
        "Best value per column in bold.</p>",
        "<p id='image-status'>images loaded: pending</p>",
    ]
    parts += [f"<p class='note'>note: {e(n)}</p>" for n in notes]
    for table in tables:
        parts.append(
            f"<h2>{e(table.family)}</h2><table data-family='{e(table.family)}'><tr><th>run</th>"
        )
        for c in table.columns:
            parts.append(
                f"<th>{e(c.task)}/{e(c.metric)}{_arrow(c.higher_is_better)}</th><th>Δ</th>"
            )
        parts.append("</tr>")
        for run in runs:
            cls = " class='baseline'" if run is baseline else ""
            parts.append(f"<tr{cls}><td>{e(run.name)}</td>")
            for c in table.columns:
                cell = table.cells.get((run.name, c.task, c.metric))
                value = "" if cell is None else e(_value(cell))
                if cell is not None and cell.best:
                    value = f"<b>{value}</b>"
                parts.append(f"<td>{value}</td><td class='delta'>{e(_delta(cell))}</td>")
            parts.append("</tr>")
        parts.append("</table>")
    for title, path in figures.items():
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='{_data_uri(path)}'>")
    if overlays:
        parts.append("<h2>Token overlays</h2>")
        for run_name, paths in overlays.items():
            parts.append(f"<h3>{e(run_name)}</h3><div class='overlays'>")
            parts += [f"<img alt='{e(p.stem)}' src='{_data_uri(p)}'>" for p in paths]
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def copy_overlays(runs: list[Run], out_dir: Path, per_run: int = 4) -> dict[str, list[Path]]:
    """Copy a few token overlays of each run beside the report."""
    found: dict[str, list[Path]] = {}
    for run in runs:
        src = sorted((run.eval_dir / "overlays").glob("*/*.png"))[:per_run]
        if not src:
            continue
        dest_dir = out_dir / "overlays" / run.name
        dest_dir.mkdir(parents=True, exist_ok=True)
        found[run.name] = []
        for p in src:
            dest = dest_dir / f"{p.parent.name}_{p.name}"
            shutil.copyfile(p, dest)
            found[run.name].append(dest)
    return found


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)
