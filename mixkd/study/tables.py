"""The report's tables: teacher -> student rows, one column per cell (:class:`mixkd.results.Cell`), mean
+- std over seeds, best per row in bold; the per-method analysis tables."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from mixkd.results import DEFAULT_AUGMENT, Cell, augment_label, natural
from mixkd.study.spec import mix_label

# The analysis tables in the paper-style layout: (summary_row key, better: max / min / None).
ANALYSIS_TABLES = [("ece", "min"), ("entropy", None), ("agreement", "max"), ("pgd_8", "max")]


def seed_stats(values: list[float]) -> tuple[float, float, int] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _cell(stats: tuple[float, float, int] | None, n_max: int, bold: bool = False, digits: int = 2) -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 or n_max > 1 else f"{mean:.{digits}f}"
    text = f"**{text}**" if bold else text
    return text + (f" (n={n})" if n < n_max else "")


def teacher_name(row: dict[str, Any]) -> str:
    """'resnet56 (plain)', 'resnet56 (mixup-a0.2)': the label of the row's context (:class:`mixkd.results.Context`)."""
    return row["context"].teacher_label


def pair_key(row: dict[str, Any]) -> tuple:
    return row["teacher_mix"] != "plain", natural(row["teacher_model"]), row["teacher_mix"], natural(row["model"])


def _pair_table(rows: list[dict[str, Any]], value, teacher_value, better: str | None = "max",
                digits: int = 2) -> str | None:
    """Teacher -> student rows, method columns, cells mean +- std over seeds of ``value(row)`` (None:
    no value), best per row (``better``: max, min or None) in bold; the teacher (``teacher_value``
    of its students' rows) and the student alone beside. None when no distillation run has a value."""
    done = [r for r in rows if r["status"] == "done" and value(r) is not None]
    distill = [r for r in done if r["teacher"] is not None]
    if not distill:
        return None
    alone = defaultdict(list)
    for r in done:
        if r["method"] == "alone":
            alone[r["model"]].append(value(r))
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    teachers: dict[tuple, dict[str, float]] = defaultdict(dict)
    pairs: dict[tuple, tuple] = {}
    for r in distill:
        pair = (teacher_name(r), r["model"])
        pairs[pair] = pair_key(r)
        cells[pair][r["cell"]].append(value(r))
        teachers[pair][r["teacher"]] = teacher_value(r)
    columns = sorted({c for pair in cells.values() for c in pair}, key=Cell.sort_key)
    n_max = max(len(v) for pair in cells.values() for v in pair.values())
    lines = ["| teacher → student | teacher | student alone | " + " | ".join(c.label for c in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for pair in sorted(cells, key=pairs.get):
        stats = [seed_stats(cells[pair].get(c, [])) for c in columns]
        means = [s[0] for s in stats if s]
        best = (max if better == "max" else min)(means) if better and means else None
        row = [f"{pair[0]} → {pair[1]}", _cell(seed_stats(list(teachers[pair].values())), 1, digits=digits),
               _cell(seed_stats(alone.get(pair[1], [])), n_max, digits=digits)]
        row += [_cell(s, n_max, bold=s is not None and s[0] == best and len(columns) > 1, digits=digits) for s in stats]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paper_table(rows: list[dict[str, Any]], metric: str = "top1") -> str:
    """The markdown table: teacher -> student rows, method columns, best per row in bold."""
    table = _pair_table(rows, lambda r: r[metric], lambda r: r["teacher_top1"])
    return table if table is not None else "No distillation run has finished yet."


def policy_table(rows: list[dict[str, Any]], metric: str = "top1") -> str | None:
    """Method x augmentation policy (issue 28): a row per (teacher -> student, method), a column per
    policy (labels from the augmentation registry), cells mean +- std over seeds, best per row in bold.
    None unless the finished runs use more than one policy."""
    done = [r for r in rows if r["status"] == "done" and r.get(metric) is not None and r["role"] == "student"]
    policies = sorted({r["cell"].augment or "" for r in done})
    if len(policies) < 2:
        return None
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    keys: dict[tuple, tuple] = {}
    for r in done:
        base = replace(r["cell"], augment=None)
        pair = (teacher_name(r) if r["teacher"] is not None else "–", r["model"], base.label)
        keys[pair] = (pair_key(r) if r["teacher"] is not None else (False, natural(""), "", natural(r["model"])), base.sort_key())
        cells[pair][r["cell"].augment or ""].append(r[metric])
    n_max = max(len(v) for row in cells.values() for v in row.values())
    labels = [augment_label(p or DEFAULT_AUGMENT) for p in policies]
    lines = ["| teacher → student | method | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(policies)]
    for pair in sorted(cells, key=keys.get):
        stats = [seed_stats(cells[pair].get(p, [])) for p in policies]
        means = [st[0] for st in stats if st]
        best = max(means) if means else None
        row = [f"{pair[0]} → {pair[1]}", pair[2]]
        row += [_cell(st, n_max, bold=st is not None and st[0] == best) for st in stats]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def analyzed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "done" and r["analysis"] == "done"]


def method_label(row: dict[str, Any], long: bool = False) -> str:
    """'teacher (mixup)', 'student alone', 'KD T=4', ... (long: 'KD + partial mixup (T=4, f=0.1)'): the
    run's cell's label (:class:`mixkd.results.Cell`)."""
    if row["role"] == "teacher":
        return f"teacher ({mix_label({'method': row['mix_method'], 'fraction': row['mix_fraction'] or 1.0, 'alpha': row['mix_alpha'] or 1.0})})"
    return row["cell"].long_label if long else row["cell"].label


def method_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Analyzed runs per method label: teachers (by mixing), the student alone, then the table's columns."""
    def order(r: dict[str, Any]) -> tuple:
        if r["role"] == "teacher":
            return 0, r["mix_method"] != "none", method_label(r)
        if r["teacher"] is None:
            return 1, False, method_label(r)
        return 2, False, r["cell"].sort_key()

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(analyzed(rows), key=order):
        groups.setdefault(method_label(r), []).append(r)
    return groups


def method_summary_table(out: Path, rows: list[dict[str, Any]]) -> str:
    """Rows the methods, columns mixkd.analysis.TABLE_COLUMNS: means over every analyzed run of a method."""
    from mixkd.analysis import TABLE_COLUMNS, summarize

    lines = ["| method | runs | " + " | ".join(h.replace("|", "\\|") for _, h, _ in TABLE_COLUMNS) + " |",
             "|---|---|" + "---|" * len(TABLE_COLUMNS)]
    for label, group in method_groups(rows).items():
        mean = summarize([out / r["id"] for r in group])["mean"]
        cells = ["–" if mean.get(k) is None else f"{mean[k] * scale:.2f}" for k, _, scale in TABLE_COLUMNS]
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def analysis_tables(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, markdown) per metric of ANALYSIS_TABLES, in the paper-style table's layout."""
    from mixkd.analysis import TABLE_COLUMNS

    headers = {k: (h, scale) for k, h, scale in TABLE_COLUMNS}
    teachers = {r["id"]: r for r in rows if r["role"] == "teacher"}
    tables = []
    for key, better in ANALYSIS_TABLES:
        header, scale = headers.get(key, (key, 1.0))

        def value(r: dict[str, Any], key=key, scale=scale) -> float | None:
            return r[key] * scale if r["analysis"] == "done" and r[key] is not None else None

        def teacher_value(r: dict[str, Any], value=value) -> float | None:
            t = teachers.get(r["teacher"])
            return value(t) if t is not None and t["status"] == "done" else None

        table = _pair_table(rows, value, teacher_value, better, digits=3 if key == "entropy" else 2)
        if table is not None:
            tables.append((f"{header}" + {"min": ", lower is better", "max": ", higher is better"}.get(better, ""),
                           table))
    return tables
