"""``mixkd study report DIR``: ``results.csv``, ``report.md`` (with PNG figures) and ``claims.json`` from a
study folder: the assembly of the rows (:mod:`mixkd.study.rows`), tables (:mod:`mixkd.study.tables`),
figures (:mod:`mixkd.study.figures`) and claims (:mod:`mixkd.claims`).

* the paper-style table: rows teacher -> student pairs, columns the distillation methods, cells
  mean +- std over seeds, best per row in bold, teacher and student-alone accuracy beside (partial
  mixup with ``mix.sampling: reference`` in columns of its own, "(reference sampling)");
* heatmaps of student top-1 over (teacher, student), one panel per temperature (the Mix-T figure);
* top-1 against temperature, and against mix fraction (0 = no mixing, 1 = full mixup), when swept;
* the study's claims with their verdicts (``claims.json``: every comparison), with the study file's
  ``claims: {noise, margin}`` when it gives them; ``claims-table.csv``: the finished students as a
  results table, for ``mixkd claims`` (e.g. with another ``--noise``);
* where runs were analyzed (``analysis.json``, see :mod:`mixkd.analysis`): per-method means of the
  analysis metrics, the same table's layout for ECE, entropy, agreement with the teacher and PGD
  accuracy at 8/255, robustness curves per method, and a t-SNE montage (teacher | student alone |
  KD | ...) of one teacher -> student pair (the study file's ``analysis.tsne_pair``, else the pair
  with the most analyzed methods).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import yaml

from mixkd.claims import (
    DEFAULT_MARGIN,
    UNMEASURED_HINT,
    ClaimResult,
    Comparison,
    check,
    claims_json,
    claims_markdown,
    format_claims,
    plan,
    schedule_note,
)
from mixkd.errors import MixkdError, ReadOnlyStorage
from mixkd.files import atomic_write_text
from mixkd.registry import load_plugin
from mixkd.results import write_csv as results_table
from mixkd.run_folder import ANALYSIS_NAME
from mixkd.study.figures import (
    METRICS,
    plot_claim_intervals,
    plot_fraction_curves,
    plot_heatmaps,
    plot_robustness,
    plot_temperature_curves,
    plot_tsne_montage,
    tsne_pair,
)
from mixkd.study.folder import STATE_NAME, STUDY_COPY
from mixkd.study.rows import collect, planned_results, results_of, write_csv
from mixkd.study.spec import Study
from mixkd.study.tables import (
    analysis_tables,
    analyzed,
    method_summary_table,
    paper_table,
    policy_table,
    teacher_name,
)
from mixkd.tracking import log_files

OTHER_METRIC = {"top1": "best_top1", "best_top1": "top1"}  # reported beside the chosen one
OTHER_WHY = {"best_top1": "mdistiller's and most published KD figures are best-epoch",
             "top1": "the study and the released code report the last epoch"}
CLAIMS_TABLE = "claims-table.csv"  # the finished students as a results table: mixkd claims reads it
__all__ = ["claims_text", "collect", "paper_table", "study_claims", "write_html", "write_report"]
FIGURES = {"heatmap": "heatmap.png", "temperature": "top1-vs-temperature.png", "fraction": "top1-vs-fraction.png",
           "claims": "claims-intervals.png", "robustness": "analysis-robustness.png", "tsne": "analysis-tsne.png"}
HTML_NAME = "report.html"


def _analysis_section(out: Path, rows: list[dict[str, Any]], wanted_pair: tuple[str, str] | None) -> list[str]:
    runs = analyzed(rows)
    for key in ("robustness", "tsne"):
        (out / FIGURES[key]).unlink(missing_ok=True)
    if not runs:
        return []
    from mixkd.analysis import load_analysis

    first = load_analysis(out / runs[0]["id"])
    subset = (f"{first.get('num_images')} of the {first.get('num_test_images')} test images"
              if first.get("num_images") != first.get("num_test_images") else "every test image")
    rob = first.get("robustness", {})
    eps = ", ".join(f"{e:g}" for e in rob.get("eps_255", []) if e)
    lines = ["## Analyses", "",
             f"`mixkd analyze` of {len(runs)} runs ({subset} for the metrics and attacks; each run's "
             f"`{ANALYSIS_NAME}` and PNGs are in its directory, and the main metrics in `results.csv`). "
             f"ECE: 15 equal-width confidence bins; entropy in nats; agreement: top-1 agreement with the "
             f"teacher; robust accuracy: L-inf attacks in pixel space, FGSM and PGD-{rob.get('pgd_steps', 10)} "
             f"(step eps/4, random start) at eps = {eps} /255.", "",
             "### Per method", "",
             "Means over every analyzed run of a method (all its teacher → student pairs and seeds); top-1 here is "
             "on the analyzed test images.", "",
             method_summary_table(out, rows), ""]
    tables = analysis_tables(rows)
    if tables:
        lines += ["The next tables have the layout of the teacher → student table: mean ± std over seeds, best "
                  "method per row in **bold**, the teacher and the student alone beside.", ""]
    for title, table in tables:
        lines += [f"### {title}", "", table, ""]
    title = "Robustness curves per method"
    if plot_robustness(out, rows, out / FIGURES["robustness"]):
        lines += [f"### {title}", "", "Accuracy under attack against epsilon, averaged over each method's analyzed "
                  "runs (all pairs and seeds).", "", f"![{title}]({FIGURES['robustness']})", ""]
    pair = tsne_pair(rows, wanted_pair)
    titles = plot_tsne_montage(out, rows, pair, out / FIGURES["tsne"]) if pair else []
    if titles:
        teacher = next(teacher_name(r) for r in runs if r["teacher"] == pair[0])
        title = f"t-SNE of penultimate features: {teacher} → {pair[1]}"
        lines += [f"### {title}", "", f"Panels: {' | '.join(titles)}. The same test images in every panel "
                  "(up to 100 per class for the first 10 classes), colours fixed per class.", "",
                  f"![{title}]({FIGURES['tsne']})", ""]
    failed = [r for r in rows if r["analysis"] in ("failed", "unreadable")]
    if failed:
        lines += ["### Analyses that failed", "", "Their runs' results stand; `mixkd study run` again retries them.", ""]
        lines += [f"- `{r['id']}`: {r['analysis_error']}" for r in failed]
        lines.append("")
    return lines


def _wanted_pair(spec: dict[str, Any]) -> tuple[str, str] | None:
    pair = (spec.get("analysis") or {}).get("tsne_pair") if isinstance(spec.get("analysis"), dict) else None
    if isinstance(pair, dict) and pair.get("teacher") and pair.get("student"):
        return str(pair["teacher"]), str(pair["student"])
    return None


def claims_text(out: str | Path, metric: str = "top1", details: bool = True) -> str:
    """The claims of a study folder as plain text (what ``mixkd study run`` and ``mixkd demo`` print last):
    verdicts, intervals, seed counts, and what the runs' schedule can say. Without ``details`` (the
    demo): each part's verdict without its comparisons, and in words why a comparison of single runs
    is inconclusive however large its difference."""
    out = Path(out)
    spec = yaml.safe_load((out / STUDY_COPY).read_text()) or {} if (out / STUDY_COPY).exists() else {}
    rows = collect(out)
    claims, noise, margin = study_claims(rows, spec, metric)
    head = "claims (details: report.md, claims.json):" if details else \
        "claims (each comparison, with its interval: report.md, claims.json):"
    text = format_claims(claims, details, metric=metric)
    unmeasured = [c for claim in claims for c in claim.comparisons if c.interval.se is None]
    if not details and unmeasured:
        text = text.removesuffix("\n" + UNMEASURED_HINT) + "\n" + why_inconclusive(unmeasured, margin, out)
    return head + "\n" + text + "\n" + schedule_note(results_of(rows, metric))


def why_inconclusive(unmeasured: list[Comparison], margin: float, out: Path) -> str:
    """Why comparisons of one run a side are inconclusive, in words, with the largest difference among
    them as the example (a verdict of 'inconclusive' beside -40 points reads as a contradiction)."""
    c = max(unmeasured, key=lambda c: abs(c.interval.difference))
    n = len(unmeasured)
    return (f"why inconclusive: {f'each of these {n} comparisons has' if n > 1 else 'this comparison has'} a side "
            f"that measures no spread (one run, or runs all equal), so no interval can be drawn, and no difference, "
            f"however large ({c.statement}: {c.interval.difference:+.2f} points), can be told from chance. "
            f"A comparison is decided only when its 95% interval clears 0 (or -{margin:g} points, the margin of "
            f"an 'at least as well'): run 3 seeds or more, of longer runs, or assume a per-run spread (mixkd claims "
            f"{out / CLAIMS_TABLE} --noise SIGMA).")


def claims_plan(study: Study) -> str:
    """What ``mixkd study plan`` says of the claims: per claim, whether the study can decide it and the
    smallest difference it detects at its seed counts (see :func:`mixkd.claims.plan`)."""
    noise, margin = claims_settings(yaml.safe_load(study.text) or {})
    return "\n".join(plan(planned_results(study), noise=noise, margin=margin))


def claims_settings(spec: dict[str, Any]) -> tuple[float | None, float]:
    """(noise, margin) of a study file's ``claims:`` mapping (defaults: no assumed sigma, margin 0.5)."""
    settings = spec.get("claims") or {}
    return settings.get("noise"), settings.get("margin", DEFAULT_MARGIN)


def study_claims(rows: list[dict[str, Any]], spec: dict[str, Any],
                 metric: str = "top1") -> tuple[list[ClaimResult], float | None, float]:
    """The claims on a study folder's rows, with the study file's ``claims:`` settings; and those settings."""
    noise, margin = claims_settings(spec)
    return check(results_of(rows, metric), noise=noise, margin=margin, metric=metric), noise, margin


# ---- the report -------------------------------------------------------------------------------

def _load_recorded_plugins(out: Path) -> None:
    """Load the plugins the study folder's state records, where their files are still there (a report
    of a study moved without them labels their methods by name)."""
    try:
        state = json.loads((out / STATE_NAME).read_text())
    except (OSError, ValueError):
        return
    for plugin in state.get("plugins") or [] if isinstance(state, dict) else []:
        if isinstance(plugin, dict) and Path(str(plugin.get("path"))).is_file():
            try:
                load_plugin(str(plugin["path"]))
            except MixkdError:  # another file registering that name is loaded already: its labels serve
                pass


def write_report(out: str | Path, metric: str = "top1") -> Path:
    """Write ``results.csv``, ``report.md`` and its figures into study folder ``out``; returns report.md."""
    out = Path(out)
    if metric not in METRICS:
        raise MixkdError(f"unknown metric '{metric}'; use one of: {', '.join(METRICS)}")
    if not out.is_dir():
        raise MixkdError(f"study folder not found: {out}")
    _load_recorded_plugins(out)  # their methods' labels and titles in the tables
    rows = collect(out)
    if not rows and (out / STUDY_COPY).is_file():  # a study stopped before any of its runs began
        raise MixkdError(f"no run of the study in {out} has begun yet, so there is nothing to report: continue the "
                         f"study (the same 'mixkd study run' command) and report once runs have finished "
                         f"(mixkd study status {out} says where it stands)")
    if not rows:
        raise MixkdError(f"no runs found in {out}; is it a study folder (mixkd study run FILE --out {out})?")
    try:
        return _write_report(out, rows, metric)
    except ReadOnlyStorage as e:  # the report has no --out: it goes into the study folder
        raise MixkdError(f"{str(e).split('; ')[0]}; 'mixkd study report' writes into the study folder, and {out} is "
                         "on a read-only file system: copy the folder to writable storage and report the copy") from None


def _write_report(out: Path, rows: list[dict[str, Any]], metric: str) -> Path:
    write_csv(rows, out / "results.csv")
    name, description, spec = out.name, "", {}
    if (out / STUDY_COPY).exists():
        spec = yaml.safe_load((out / STUDY_COPY).read_text()) or {}
        name, description = spec.get("name", name), spec.get("description", "")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "blocked", "started", "new")}
    lines = [f"# Study {name}", ""] + ([description.strip(), ""] if description else [])
    lines += [f"{len(rows)} runs in `{out}`: {counts['done']} finished, {counts['failed']} failed, "
              f"{counts['blocked']} blocked, {counts['started'] + counts['new']} unfinished. Every run is in `results.csv`.", "",
              "## Teacher → student", "",
              f"Student {METRICS[metric]} (%), mean ± std over seeds (n = runs where fewer than the most); "
              "best method per row in **bold**; teacher and student-alone accuracy beside.", "",
              paper_table(rows, metric), ""]
    policies = policy_table(rows, metric)
    if policies is not None:
        lines += ["## Method × augmentation policy", "",
                  f"Student {METRICS[metric]} (%) by augmentation policy (`augment:`), mean ± std over seeds; best "
                  "policy per row in **bold**.", "", policies, ""]
    other = OTHER_METRIC[metric]
    if any(r["status"] == "done" and r["teacher"] is not None and r.get(other) is not None for r in rows):
        lines += [f"Beside it, the same runs' {METRICS[other]} ({OTHER_WHY[other]}):", "", paper_table(rows, other), ""]
    figures = [("heatmap", plot_heatmaps, "Student top-1 over (teacher, student), one panel per temperature"),
               ("temperature", plot_temperature_curves, "Student top-1 against temperature"),
               ("fraction", plot_fraction_curves, "Student top-1 against the mixed share of the batch")]
    for key, plot, title in figures:
        target = out / FIGURES[key]
        if plot(rows, metric, target):
            lines += [f"## {title}", "", f"![{title}]({FIGURES[key]})", ""]
        else:
            target.unlink(missing_ok=True)
    results_table(results_of(rows, metric), out / CLAIMS_TABLE)
    claims, noise, margin = study_claims(rows, spec, metric)
    data = claims_json(claims, noise, margin, metric)
    beside = None
    if results_of(rows, other) and len(results_of(rows, other)) == len(results_of(rows, metric)):
        beside = (METRICS[other], study_claims(rows, spec, other)[0])
        data["beside"] = {"metric": other, "metric_label": METRICS[other],
                          "claims": [{"claim": c.number, "verdict": c.verdict, "answer": c.answer} for c in beside[1]]}
    atomic_write_text(out / "claims.json", json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    lines += claims_markdown(claims, METRICS[metric], [schedule_note(results_of(rows, metric))], beside)
    if plot_claim_intervals(claims, out / FIGURES["claims"]):
        title = "Each comparison's difference and 95% interval"
        lines += [f"### {title}", "", f"![{title}]({FIGURES['claims']})", ""]
    else:
        (out / FIGURES["claims"]).unlink(missing_ok=True)
    lines += _analysis_section(out, rows, _wanted_pair(spec))
    unfinished = [r for r in rows if r["status"] != "done"]
    if unfinished:
        lines += ["## Unfinished runs", ""]
        lines += [f"- `{r['id']}`: {r['status']}" + (f": {r['error']}" if r["error"] else "") for r in unfinished]
        lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines))
    # a tracked study (--track): the report, tables, claims and figures as its parent run's artifacts
    log_files(out, [out / "report.md", out / "results.csv", out / "claims.json", out / CLAIMS_TABLE,
                    *(out / f for f in FIGURES.values())], warn=print,
              summary={f"runs_{k}": v for k, v in counts.items()})
    return out / "report.md"


# ---- the HTML page ----------------------------------------------------------------------------

HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
img { max-width: 100%; display: block; margin: 1em 0; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_html(out: str | Path) -> Path:
    """``report.html`` from the study folder's ``report.md`` (:func:`write_report` first): one file that
    holds everything, its figures embedded as data URIs, so it can be mailed or moved on its own."""
    import markdown

    out = Path(out)
    source = out / "report.md"
    if not source.is_file():
        raise MixkdError(f"{source} not found: write the report first (mixkd study report {out})")
    body = markdown.markdown(source.read_text(), extensions=["tables"], output_format="html")

    def embed(match: re.Match) -> str:
        name = html.unescape(match.group(1))
        figure = out / name
        if "/" in name or not figure.is_file():
            raise MixkdError(f"the report names a figure that is not in {out}: {name}; write the report again")
        return f'src="{_data_uri(figure)}"'

    body = re.sub(r'src="([^"]+)"', embed, body)
    title = re.search(r"<h1>(.*?)</h1>", body)
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{title.group(1) if title else 'mixkd study report'}</title>\n<style>{HTML_STYLE}</style>\n"
            f"</head>\n<body>\n{body}\n</body>\n</html>\n")
    atomic_write_text(out / HTML_NAME, page)
    return out / HTML_NAME
