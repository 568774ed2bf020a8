"""`launch.py report EXP_DIR`: a paper-analysis experiment's rows as the paper's table.

Reads every row of the experiment's latest launch (`study` rows: `config.yaml`,
`launch_meta.json`, `eval/results.json`, `row.json`) and writes, under `EXP_DIR/report/`,
table.md, table.csv, index.html (plots embedded) and the PNGs: scores with 95% bootstrap
intervals (higher is better) and costs (lower is better) in separate panels, the seed-score
histograms (Figure 7b) and the fixed-k overlays of every row in one grid (Figure 7c).

The columns, the baseline row and the paper's figures come from the rows' own config
(`stage.params.report`, in the exp file). Every score is compared with the baseline row on
the same documents: exact McNemar for 0/1 scores, the paired bootstrap otherwise
(`setok_eval.stats.paired_compare`); p >= 0.05 is printed as "n.s.". Reference rows
(question-only answers: the train split's majority answer per question type; a uniformly
random answer among the type's train answers, its expected score) are scored on the same
documents where a column is VQA accuracy.

`ReportJob` is what runs after an array: a SLURM job with an afterany dependency, or a local
process that waits for the array's lanes to exit.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPORT_DIR = "report"
ALPHA = 0.05
TOKENS = "tokens"


@dataclass
class Row:
    """One row of the table: a trained run, or a reference (blind, random answer)."""

    name: str
    overrides: list[str]
    run_dir: Path | None
    results: dict[str, Any] | None = None
    row: dict[str, Any] | None = None
    status: str = "COMPLETED"
    reference: bool = False
    states: dict[str, tuple[list[str], np.ndarray, str]] = field(default_factory=dict)


@dataclass
class Cell:
    text: str
    value: float | None = None
    ci: tuple[float, float] | None = None
    n: int | None = None
    delta: float | None = None
    p: float | None = None
    test: str | None = None


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def collect_rows(exp_dir: Path) -> tuple[list[Row], dict[str, Any]]:
    """The rows of the newest launch and the report spec of their config."""
    from setok_experiments.job import read_status
    from setok_experiments.record import read_record

    launches = read_record(exp_dir).get("launches", [])
    # The rows of the newest launch (another budget's rows share the exp dir, not the table).
    jobs = sorted(launches[-1]["jobs"], key=lambda j: j["index"]) if launches else []
    if not jobs:
        raise FileNotFoundError(f"{exp_dir}: no launched rows (launch_record.json has no jobs)")
    rows: list[Row] = []
    spec: dict[str, Any] | None = None
    for job in jobs:
        run_dir = Path(job["run_dir"])
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        params = cfg["stage"]["params"]
        if cfg["stage"]["name"] != "study" or "report" not in params:
            raise ValueError(f"{run_dir}: not a study row (stage.name {cfg['stage']['name']!r})")
        spec = spec or {**params["report"], "_budget": params.get("budget", {}), "_cfg": cfg}
        status = (read_status(run_dir) or {}).get("state", "NOT STARTED")
        row = Row(job["name"], list(job.get("overrides", [])), run_dir, status=str(status))
        results = run_dir / "eval" / "results.json"
        if results.is_file() and (run_dir / "row.json").is_file():
            from setok_eval.results import read_results

            row.results = read_results(results)
            row.row = _load_json(run_dir / "row.json")
        rows.append(row)
    assert spec is not None
    return rows, spec


# ---------------------------------------------------------------- reference rows
def _docs(run_dir: Path, task: str) -> dict[str, dict[str, Any]]:
    path = run_dir / "eval_data" / "data" / "eval" / f"{task}.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return {str(d["id"]): d for d in (json.loads(x) for x in lines if x)}


def reference_rows(rows: list[Row], spec: Mapping[str, Any]) -> list[Row]:
    """Controls scored on the rows' own documents: for VQA accuracy, blind (train majority per
    question type, `setok_eval.controls`) and a random answer; for POPE, "yes" every time."""
    done = [r for r in rows if r.results is not None and r.run_dir is not None]
    if not done:
        return []
    first = done[0]
    refs: dict[str, dict[str, tuple[list[str], np.ndarray, str]]] = {}
    for col in spec["columns"]:
        task, metric = col.get("task"), col.get("metric")
        got = None if task is None else _item_states(first, task, metric)
        if got is None:
            continue
        if metric == "vqa_accuracy":
            for name, scores in _vqa_controls(first, task, got[0], spec).items():
                refs.setdefault(name, {})[f"{task}/{metric}"] = (got[0], scores, "mean")
        elif str(metric).startswith("pope_"):
            from setok_eval.metrics.pope import pope_confusion

            docs = _docs(first.run_dir, task)  # type: ignore[arg-type]
            labels = [docs[i]["label"] for i in got[0]]
            states = pope_confusion(["yes"] * len(labels), labels)
            refs.setdefault("always yes", {})[f"{task}/{metric}"] = (got[0], states, got[2])
    out = []
    for name, states in refs.items():
        row = Row(name, [], first.run_dir, reference=True)  # run_dir: where its documents are
        row.states = states
        out.append(row)
    return out


def _vqa_controls(
    first: Row, task: str, ids: list[str], spec: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Per-document scores of the blind and random-answer controls (empty without a card)."""
    from setok_eval.controls import blind_scores, majority_answers
    from setok_eval.metrics.vqa import vqa_accuracy

    docs = _docs(first.run_dir, task)  # type: ignore[arg-type]
    card = _load_json(Path(spec["_cfg"]["data"]["shard_dir"]) / "dataset_card.json")
    if card is None:
        return {}
    answers = card["splits"]["train"]["vqa_answers"]
    blind_by_id = blind_scores([docs[i] for i in ids], majority_answers(answers))
    rand = []
    for i in ids:
        options = sorted(answers.get(docs[i]["question_type"], {})) or [""]
        rand.append(float(np.mean([vqa_accuracy(a, docs[i]["answers"]) for a in options])))
    return {
        "blind (question only)": np.asarray([blind_by_id[i] for i in ids])[:, None],
        "random answer": np.asarray(rand)[:, None],
    }


# ---------------------------------------------------------------- cells
def _item_states(row: Row, task: str, metric: str) -> tuple[list[str], np.ndarray, str] | None:
    key = f"{task}/{metric}"
    if key in row.states:
        return row.states[key]
    if row.results is None:
        return None
    from setok_eval.results import item_states

    entry = row.results["tasks"].get(task)
    return None if entry is None else item_states(entry, metric)


def _subset(
    row: Row, col: Mapping[str, Any], got: tuple[list[str], np.ndarray, str]
) -> tuple[list[str], np.ndarray, str]:
    """Keep the documents whose fields match the column's `subset` (e.g. question types)."""
    want = col.get("subset")
    if not want:
        return got
    docs = _docs(row.run_dir, col["task"])  # type: ignore[arg-type]
    keep = [k for k, i in enumerate(got[0]) if all(docs[i].get(f) in v for f, v in want.items())]
    return [got[0][k] for k in keep], got[1][keep], got[2]


def score_cell(
    row: Row, base: Row | None, col: Mapping[str, Any], n_resamples: int, seed: int
) -> Cell:
    """A score with its 95% bootstrap interval and the paired test against the baseline."""
    from setok_eval.stats import paired_compare, reduce_states, states_ci

    got = _item_states(row, col["task"], col["metric"])
    if got is None:
        return Cell("—")
    ids, states, reducer = _subset(row, col, got)
    if not ids:
        return Cell("—")
    value = reduce_states(states, reducer)
    stored = _stored_metric(row, col)
    if stored is not None and stored.get("ci95") and not col.get("subset"):
        # The eval's own value and interval (CIDEr-D resamples its corpus statistics).
        value, ci = float(stored["value"]), tuple(stored["ci95"])
    else:
        ci = states_ci(states, reducer, n_resamples=n_resamples, seed=seed)
    cell = Cell("", value, ci, len(ids))
    if base is not None and row is not base:
        b = _item_states(base, col["task"], col["metric"])
        if b is not None:
            b_ids, b_states, b_red = _subset(base, col, b)
            index = {i: k for k, i in enumerate(b_ids)}
            pairs = [(k, index[i]) for k, i in enumerate(ids) if i in index]
            if pairs and b_red == reducer:
                ia = np.array([p[1] for p in pairs])
                ib = np.array([p[0] for p in pairs])
                res = paired_compare(
                    b_states[ia], states[ib], reducer, n_resamples=n_resamples, seed=seed
                )
                cell.delta, cell.p, cell.test = res.delta, res.p_value, res.method
    cell.text = _score_text(cell)
    return cell


def _stored_metric(row: Row, col: Mapping[str, Any]) -> dict[str, Any] | None:
    if row.results is None:
        return None
    entry = row.results["tasks"].get(col["task"], {})
    return entry.get("metrics", {}).get(col["metric"])


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _score_text(cell: Cell) -> str:
    assert cell.value is not None and cell.ci is not None
    text = f"{_fmt(cell.value)} [{_fmt(cell.ci[0])}, {_fmt(cell.ci[1])}]"
    if cell.delta is not None and cell.p is not None:
        sig = f"p={cell.p:.2g}" if cell.p < ALPHA else f"n.s., p={cell.p:.2g}"
        text += f" ({cell.delta:+.3g}, {sig})"
    return text


def measure_cell(row: Row, col: Mapping[str, Any], dynamic: bool) -> Cell:
    """A measurement of row.json: the token count (mean*, range) or one number."""
    if row.row is None:
        return Cell("—")
    key = col["measure"]
    if key == TOKENS:
        r = row.row
        star = "*" if dynamic else ""
        return Cell(
            f"{r['tokens_mean']:.1f}{star} ({r['tokens_min']}–{r['tokens_max']})",
            float(r["tokens_mean"]),
        )
    value = row.row.get(key)
    if value is None:
        return Cell("—")
    return Cell(_fmt(float(value)), float(value))


# ---------------------------------------------------------------- table
@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[Row]
    cells: list[list[Cell]]
    paper: list[list[str]]
    paper_headers: list[str]
    base: Row | None
    notes: list[str]
    columns: list[Mapping[str, Any]] = field(default_factory=list)


def build_table(
    rows: list[Row], spec: Mapping[str, Any], n_resamples: int = 1000, seed: int = 0
) -> Table:
    """The paper's table: our columns, then the paper's figures for the same rows."""
    names = [r.name for r in rows]
    base_name = spec.get("baseline", names[0])
    base = next((r for r in rows if r.name == base_name), None)
    dynamic = set(spec.get("dynamic", []))
    all_rows = rows + reference_rows(rows, spec)
    cols = list(spec["columns"])
    cells = []
    for row in all_rows:
        line = []
        for col in cols:
            if "measure" in col:
                line.append(
                    Cell("") if row.reference else measure_cell(row, col, row.name in dynamic)
                )
            elif row.reference and f"{col['task']}/{col['metric']}" not in row.states:
                line.append(Cell(""))
            else:
                line.append(score_cell(row, base, col, n_resamples, seed))
        cells.append(line)
    paper_spec = spec.get("paper", {})
    paper_headers = [str(c["paper"]) for c in cols if c.get("paper")]
    paper = [[str(paper_spec.get(r.name, {}).get(h, "")) for h in paper_headers] for r in all_rows]
    budget = spec.get("_budget", {})
    caps = ", ".join(f"{k} <= {v}" for k, v in (budget.get("max_steps") or {}).items())
    notes = [
        f"Budget: {budget.get('name', 'default')} (steps: {caps or 'the recipe'}; "
        f"{budget.get('eval_limit') or 'all'} documents per task of a "
        f"{budget.get('test_images')}-image test split).",
        "Shared by all rows: the generated Shapes World (train and test split) and the eval "
        "documents; every row trains its own Stage I -> II -> III from scratch.",
    ]
    grids = sorted({int(r.row["grid_tokens"]) for r in rows if r.row and r.row.get("grid_tokens")})
    if grids:
        notes.append(
            f"Feature grid: {'/'.join(map(str, grids))} patch tokens per image (the paper: 576); "
            "a fixed or resampler row's k is its paper count x grid / 576 (at least 2)."
        )
    explain = {
        "blind (question only)": "blind (question only) answers the train split's majority "
        "answer of the question's type",
        "random answer": "random answer is the expected score of a uniform guess among the "
        "type's train answers",
        "always yes": "always yes answers 'yes' to every POPE probe (F1 0.667 on balanced probes)",
    }
    present = [explain[r.name] for r in all_rows if r.reference and r.name in explain]
    if present:
        notes.append("Reference rows on the same documents: " + "; ".join(present) + ".")
    if base is None or base.results is None:
        notes.append(
            f"The baseline row {base_name!r} has no scores in this launch ({', '.join(names)}): "
            "no differences or p-values."
        )
        base = None
    missing = [r for r in rows if r.results is None]
    if missing:
        notes.append(
            "Not finished (no scores yet): " + ", ".join(f"{r.name} ({r.status})" for r in missing)
        )
    headers = [str(c["name"]) + _arrow(c) for c in cols]
    return Table(
        str(spec.get("title", "")),
        headers,
        all_rows,
        cells,
        paper,
        paper_headers,
        base,
        notes,
        cols,
    )


def _arrow(col: Mapping[str, Any]) -> str:
    hib = col.get("higher_is_better")
    if "task" in col and hib is None:
        hib = col.get("metric") not in ("l1", "fid")
    return {True: " ↑", False: " ↓", None: ""}[hib]


def _label(row: Row, base: Row | None) -> str:
    if row.reference:
        return f"{row.name} (reference)"
    return f"{row.name} (baseline)" if row is base else row.name


def _n(row: Row, cells: list[Cell]) -> str:
    ns = sorted({c.n for c in cells if c.n is not None})
    return "/".join(str(n) for n in ns) if ns else "—"


def markdown(table: Table) -> str:
    lines = [f"# {table.title}", ""]
    lines += [f"- {n}" for n in table.notes]
    lines += [
        "- Scores: value [95% bootstrap CI] (difference to the baseline, p: exact McNemar for "
        "0/1 scores, paired bootstrap otherwise; n.s. = not significant at 0.05). "
        "↑ higher is better, ↓ lower is better; * = mean of a dynamic count.",
        "",
    ]
    head = ["row", "n", *table.headers, *[f"paper: {h}" for h in table.paper_headers]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row, cells, paper in zip(table.rows, table.cells, table.paper, strict=True):
        label = _label(row, table.base)
        label = f"**{label}**" if row is table.base else label
        vals = [label, _n(row, cells), *[c.text for c in cells], *paper]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in vals) + " |")
    lines += ["", "## Rows", "", "| row | overrides | state |", "|---|---|---|"]
    for row in table.rows:
        if not row.reference:
            lines.append(f"| {row.name} | `{' '.join(row.overrides) or '(none)'}` | {row.status} |")
    return "\n".join(lines) + "\n"


def csv_text(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["row", "reference", "baseline", "overrides", "column", "value", "ci_lo", "ci_hi", "n",
         "delta", "p_value", "test", "text", "paper"]
    )  # fmt: skip
    for row, cells, paper in zip(table.rows, table.cells, table.paper, strict=True):
        paper_by = dict(zip(table.paper_headers, paper, strict=True))
        for head, cell, col in zip(table.headers, cells, table.columns, strict=True):
            ci = cell.ci or (None, None)
            w.writerow(
                [row.name, row.reference, row is table.base, " ".join(row.overrides), head,
                 cell.value, ci[0], ci[1], cell.n, cell.delta, cell.p, cell.test, cell.text,
                 paper_by.get(str(col.get("paper", "")), "")]
            )  # fmt: skip
    return buf.getvalue()


# ---------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    from setok_eval.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_panels(table: Table, cols: list[Mapping[str, Any]], out: Path) -> list[Path]:
    """One PNG of scores (higher is better, with 95% CIs) and one of costs (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = {"scores_higher_is_better.png": True, "costs_lower_is_better.png": False}
    for fname, want in groups.items():
        picked = [(k, c) for k, c in enumerate(cols) if _arrow(c).strip() == ("↑" if want else "↓")]
        if not picked:
            continue
        fig, axes = plt.subplots(
            1, len(picked), figsize=(3.2 * len(picked), 0.35 * len(table.rows) + 1.5), squeeze=False
        )
        for ax, (k, col) in zip(axes[0], picked, strict=True):
            labels, vals, errs = [], [], []
            for row, cells in zip(table.rows, table.cells, strict=True):
                c = cells[k]
                if c.value is None:
                    continue
                labels.append(row.name)
                vals.append(c.value)
                lo, hi = c.ci if c.ci else (c.value, c.value)
                errs.append((c.value - lo, hi - c.value))
            y = np.arange(len(vals))[::-1]
            kinds = {
                r.name: ("ref" if r.reference else "base" if r is table.base else "row")
                for r in table.rows
            }
            palette = {"ref": "tab:gray", "base": "tab:orange", "row": "tab:blue"}
            colors = [palette[kinds.get(lab, "row")] for lab in labels]
            ax.barh(y, vals, xerr=np.array(errs).T if errs else None, color=colors, capsize=2)
            ax.set_yticks(y, labels, fontsize=7)
            ax.set_title(str(col["name"]) + _arrow(col), fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle("higher is better" if want else "lower is better", fontsize=10, y=1.02)
        _save(fig, out / fname)
        written.append(out / fname)
    return written


def plot_seed_scores(rows: list[Row], out: Path) -> Path | None:
    """Figure 7b: the density-peak seed scores of the test images' features, per row."""
    series = [
        (r.name, np.asarray(r.row["seed_scores"]))
        for r in rows
        if r.row and r.row.get("seed_scores")
    ]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.8), squeeze=False)
    for ax, (name, s) in zip(axes[0], series, strict=True):
        ax.hist(s, bins=30, color="tab:blue")
        ax.set_title(f"{name} (std {s.std():.3g})", fontsize=9)
        ax.set_xlabel("seed score rho x delta", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("patches")
    path = out / "seed_scores.png"
    _save(fig, path)
    return path


def overlay_grid(rows: list[Row], out: Path) -> Path | None:
    """Figure 7c: every row's fixed-k overlays (same images) stacked, one labelled band each."""
    from PIL import Image, ImageDraw

    bands = []
    for r in rows:
        if r.row is None or not r.row.get("fixed_overlays") or r.run_dir is None:
            continue
        img = Image.open(r.run_dir / r.row["fixed_overlays"]).convert("RGB")
        scale = max(1, 256 // img.height)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        band = Image.new("RGB", (img.width, img.height + 16), "white")
        ImageDraw.Draw(band).text(
            (2, 2), f"{r.name}: k={r.row.get('fixed_clusters')}", fill="black"
        )
        band.paste(img, (0, 16))
        bands.append(band)
    if not bands:
        return None
    grid = Image.new("RGB", (max(b.width for b in bands), sum(b.height for b in bands)), "white")
    y = 0
    for b in bands:
        grid.paste(b, (0, y))
        y += b.height
    from setok_eval.overlays import save_png

    path = out / "fixed_overlays.png"
    save_png(path, np.asarray(grid))
    return path


# ---------------------------------------------------------------- html
_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;max-width:100%}
table{border-collapse:collapse;margin:8px 0 20px;table-layout:auto;width:100%}
th,td{border:1px solid #ccc;padding:3px 5px;font-size:12px;text-align:right;vertical-align:top}
th{background:#f4f4f4}
th:first-child,td:first-child{text-align:left}
td{overflow-wrap:anywhere}
tr.baseline td{background:#eef3fb;font-weight:600}
tr.reference td{color:#666;font-style:italic}
td.paper,th.paper{background:#fbf7ee;color:#6a5a2a}
.ns{color:#888}
.ovr{display:block;font-size:10px;color:#777;font-weight:400;font-family:monospace}
img{max-width:100%;display:block;margin:8px 0}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  var fits = document.documentElement.scrollWidth <= window.innerWidth;
  var s = document.getElementById('render-status');
  s.setAttribute('data-images', ok + '/' + imgs.length);
  s.setAttribute('data-fits', fits ? 'yes' : 'no');
  s.textContent = 'images ' + ok + '/' + imgs.length + (fits ? '' : ' · table wider than the page');
});
"""


def _uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def html_page(table: Table, figures: Sequence[tuple[str, Path]]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(table.title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script>",
        f"</head><body><h1>{e(table.title)}</h1>",
    ]
    parts += [f"<p>{e(n)}</p>" for n in table.notes]
    parts.append(
        "<p>Scores: value [95% bootstrap CI] (difference to the baseline row, p: exact McNemar "
        "for 0/1 scores, paired bootstrap otherwise; <span class='ns'>n.s.</span> = not "
        "significant at 0.05). ↑ higher is better, ↓ lower is better; * = mean of a dynamic "
        "count. Paper columns: the paper's own figures for the same row (its datasets).</p>"
    )
    parts.append("<table><tr><th>row</th><th>n</th>")
    parts += [f"<th>{e(h)}</th>" for h in table.headers]
    parts += [f"<th class='paper'>paper: {e(h)}</th>" for h in table.paper_headers]
    parts.append("</tr>")
    for row, cells, paper in zip(table.rows, table.cells, table.paper, strict=True):
        cls = "reference" if row.reference else ("baseline" if row is table.base else "")
        ovr = f"<span class='ovr'>{e(' '.join(row.overrides))}</span>" if row.overrides else ""
        parts.append(f"<tr class='{cls}'><td>{e(_label(row, table.base))}{ovr}</td>")
        parts.append(f"<td>{e(_n(row, cells))}</td>")
        for c in cells:
            text = e(c.text).replace("n.s.", "<span class='ns'>n.s.</span>")
            parts.append(f"<td>{text}</td>")
        parts += [f"<td class='paper'>{e(p)}</td>" for p in paper]
        parts.append("</tr>")
    parts.append("</table><p id='render-status'>images: pending</p>")
    for title, path in figures:
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='{_uri(path)}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- entry points
def write_report(exp_dir: str | Path, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Path]:
    """Build the table of `exp_dir`'s rows and write it under `exp_dir/report/`."""
    from setok_eval.io import atomic_write_json, atomic_write_text

    exp = Path(exp_dir)
    rows, spec = collect_rows(exp)
    table = build_table(rows, spec, n_resamples=n_resamples, seed=seed)
    cols = table.columns
    out = exp / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    for path in plot_panels(table, cols, out):
        title = "Scores (higher is better)" if "higher" in path.name else "Costs (lower is better)"
        figures.append((title, path))
    trained = [r for r in rows if not r.reference]
    seed_png = plot_seed_scores(trained, out)
    if seed_png is not None:
        figures.append(("Density-peak seed scores per row (Figure 7b)", seed_png))
    grid_png = overlay_grid(trained, out)
    if grid_png is not None:
        figures.append(("The same test images, fixed-k clustering per row (Figure 7c)", grid_png))
    written = {"md": out / "table.md", "csv": out / "table.csv", "html": out / "index.html"}
    md = markdown(table)
    md += "".join(f"\n## {t}\n\n![{t}]({p.name})\n" for t, p in figures)
    atomic_write_text(written["md"], md)
    atomic_write_text(written["csv"], csv_text(table))
    atomic_write_text(written["html"], html_page(table, figures))
    atomic_write_json(
        out / "report.json",
        {"title": table.title, "rows": [r.name for r in table.rows],
         "finished": [r.name for r in rows if r.results is not None], "time": time.time()},
    )  # fmt: skip
    for _, p in figures:
        written[p.stem] = p
    return written


class ReportJob:
    """The report step after an array: waits for local lanes (pids) to exit, then writes."""

    def __call__(self, exp_dir: str, wait_pids: Sequence[int] = (), poll_s: float = 5.0) -> str:
        from setok_experiments.scheduler import pid_alive

        while any(pid_alive(int(p)) for p in wait_pids):
            time.sleep(poll_s)
        written = write_report(exp_dir)
        return str(written["html"])


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="launch.py report",
        description="Write a paper-analysis experiment's table (Markdown, CSV, HTML, PNGs) "
        "under EXP_DIR/report/ from the rows finished so far.",
    )
    parser.add_argument("path", type=Path, help="the experiment dir (<run_root>/<exp>)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(list(argv))
    from setok_experiments.record import find_exp_dir

    try:
        exp_dir = find_exp_dir(args.path)
        written = write_report(exp_dir, n_resamples=args.resamples)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def wants_report(plan: Any) -> bool:
    """True when the plan's rows are study rows (a paper analysis with a report)."""
    return bool(plan.jobs) and all(j.config.stage.name == "study" for j in plan.jobs)


def submit_report(plan: Any, kind: str, submissions: Sequence[Any], folder: Path) -> Any:
    """The report step after the array: a SLURM job with `afterany` on the array (it runs
    whatever became of the rows), or a local process that waits for the lanes' pids.
    Returns the submitit job (None for inline launches, reported at once)."""
    import submitit

    from setok_experiments.executors import _job_import_path, slurm_parameters

    if kind == "inline":
        written = write_report(plan.exp_dir)
        print(f"report: {written['html']}")
        return None
    _job_import_path()
    log_folder = str(folder / "report_%j")
    if kind == "slurm":
        arrays = sorted({str(s.job_id).split("_", 1)[0] for s in submissions})
        executor: Any = submitit.SlurmExecutor(folder=log_folder)
        params = slurm_parameters(plan.cluster, f"setok-{plan.exp}-report")
        params.update(nodes=1, ntasks_per_node=1, array_parallelism=1)
        params.pop("gpus_per_node", None)
        extra = dict(params.pop("additional_parameters", {}) or {})
        extra["dependency"] = "afterany:" + ":".join(arrays)
        params["additional_parameters"] = extra
        executor.update_parameters(**params)
        job = executor.submit(ReportJob(), str(plan.exp_dir))
    else:
        pids = sorted({int(s.job_id) for s in submissions if str(s.job_id).isdigit()})
        executor = submitit.LocalExecutor(folder=log_folder)
        executor.update_parameters(timeout_min=plan.launcher.timeout_min * max(1, len(plan.jobs)))
        job = executor.submit(ReportJob(), str(plan.exp_dir), pids)
    print(f"report job {job.job_id}: writes {plan.exp_dir / REPORT_DIR} when the array ends")
    return job
