"""Turn finished cells into ``RESULTS.md`` (tables laid out like the paper's), CSVs and plots.

Numbers are test-split metrics in percent, mean ± sample standard deviation over seeds. A gain Δ is the
per-seed paired difference (same seed: same initialisation draw, fine-tuning order and data share)
``sga − baseline``, with a two-sided paired t-test p-value where there are at least two seeds. The prose
under "What the numbers say" is generated from the same numbers by fixed rules, so it cannot drift from
the tables.
"""

from __future__ import annotations

import csv
import io
import math
from statistics import mean, stdev
from typing import Any

from shards import fs

from .config import ExperimentConfig
from .plan import EIGHTH, FULL, NO_DATA, Unit
from .plots import write_plots
from .stages import pretrain_timing

TASK_NAMES = {"refexp": "RefCOCO+-style refexp", "vqa": "VQA", "vcr_qa": "VCR Q→A", "vcr_qar": "VCR QA→R"}
ENCODER_NAMES = {"two": "two-stream (ViLBERT-like)", "single": "single-stream (VL-BERT-like)"}
DATA_NAMES = {FULL: "full", EIGHTH: "1/8", NO_DATA: "none"}
VARIANT_NAMES = {"none": "no pretraining", "baseline": "baseline (no grounding loss)",
                 "sga": "+ grounding (phrase, SPE, λ=20)", "baseline_spe": "baseline + SPE",
                 "sga_token": "+ grounding (token, SPE, λ=20)",
                 "sga_nospe": "+ grounding (phrase, no SPE, λ=20)",
                 "sga_l1": "+ grounding (phrase, SPE, λ=1)", "sga_l5": "+ grounding (phrase, SPE, λ=5)",
                 "sga_gt": "+ grounding on ground-truth M"}
CSV_FIELDS = ("variant", "encoder", "data", "labels", "seed", "task", "fraction", "metric", "val", "test",
              "n_test", "train_items", "steps", "wall_s", "cpu_s", "cell_id")


def collect_rows(units: list[Unit], cfg: ExperimentConfig, work: str) -> list[dict[str, Any]]:
    """Result rows of the plan's finished cells (cells of other settings in WORK are ignored)."""
    rows = []
    for unit in units:
        for cell in unit.cells:
            uri = fs.join(work, "cells", f"{cell.cell_id(cfg)}.json")
            if fs.exists(uri):
                rows.append(fs.read_json(uri))
    return rows


# ----------------------------------------------------------------------------------------- statistics
def values(rows: list[dict], **match: Any) -> dict[int, float]:
    """``{seed: test metric in percent}`` of the rows matching every ``field=value``."""
    return {r["seed"]: 100.0 * r["test"] for r in rows if all(r.get(k) == v for k, v in match.items())}


def fmt(vals: dict[int, float] | list[float]) -> str:
    v = list(vals.values()) if isinstance(vals, dict) else list(vals)
    if not v:
        return "–"
    return f"{mean(v):.1f} ± {stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, float] | None:
    """``b − a`` over the seeds both have: mean, std, n and the paired t-test p (NaN below 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [b[s] - a[s] for s in seeds]
    sd = stdev(diffs) if len(diffs) > 1 else float("nan")
    p = float("nan")
    if len(diffs) > 1:
        from scipy.stats import ttest_rel

        if sd <= 1e-9 * max(1.0, abs(mean(diffs))):
            # Identical differences: the t statistic is infinite (or undefined when they are all 0).
            p = 1.0 if mean(diffs) == 0 else 0.0
        else:
            p = float(ttest_rel([b[s] for s in seeds], [a[s] for s in seeds]).pvalue)
    return {"mean": mean(diffs), "std": sd, "n": len(diffs), "p": p}


def fmt_delta(d: dict[str, float] | None) -> str:
    if d is None:
        return "–"
    text = f"{d['mean']:+.1f}"
    if not math.isnan(d["std"]):
        text += f" ± {d['std']:.1f}"
    if not math.isnan(d["p"]):
        text += f" (p={d['p']:.2f})"
    return text


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


# ------------------------------------------------------------------------------------------- tables
def main_table(rows: list[dict], cfg: ExperimentConfig) -> tuple[list[str], list[dict]]:
    """Paper Table 1: per encoder and pretraining data, baseline vs + grounding and the gain."""
    header = ["Model", "Pretraining data", "Method", *[TASK_NAMES[t] for t in cfg.tasks]]
    body, gains = [], []
    for enc in cfg.encoders:
        for data in (FULL, EIGHTH):
            base = {t: values(rows, variant="baseline", encoder=enc, data=data, task=t, fraction=1.0)
                    for t in cfg.tasks}
            sga = {t: values(rows, variant="sga", encoder=enc, data=data, task=t, fraction=1.0)
                   for t in cfg.tasks}
            body.append([ENCODER_NAMES[enc], DATA_NAMES[data], VARIANT_NAMES["baseline"],
                         *[fmt(base[t]) for t in cfg.tasks]])
            body.append(["", "", VARIANT_NAMES["sga"], *[fmt(sga[t]) for t in cfg.tasks]])
            deltas = {t: paired(base[t], sga[t]) for t in cfg.tasks}
            body.append(["", "", "**Δ**", *[f"**{fmt_delta(deltas[t])}**" for t in cfg.tasks]])
            gains += [{"encoder": enc, "data": data, "task": t, **deltas[t]} for t in cfg.tasks if deltas[t]]
        none = {t: values(rows, variant="none", encoder=enc, task=t, fraction=1.0) for t in cfg.tasks}
        body.append([ENCODER_NAMES[enc], "none", VARIANT_NAMES["none"], *[fmt(none[t]) for t in cfg.tasks]])
    return _table(header, body), gains


def ablation_table(rows: list[dict], cfg: ExperimentConfig) -> tuple[list[str], dict[str, float]]:
    """Paper's ablations on the focus encoder with 1/8 pretraining data: average over tasks per variant."""
    variants = ["baseline", *[v for v in ("baseline_spe", "sga_token", "sga_nospe") if v in cfg.ablations],
                "sga", *[v for v in ("sga_l1", "sga_l5") if v in cfg.ablations]]
    header = ["Variant", *[TASK_NAMES[t] for t in cfg.tasks], "Average"]
    body, averages = [], {}
    for v in variants:
        per_task = {t: values(rows, variant=v, encoder=cfg.focus_encoder, data=EIGHTH, task=t, fraction=1.0)
                    for t in cfg.tasks}
        seeds = set.intersection(*(set(p) for p in per_task.values())) if per_task else set()
        avg = {s: mean(per_task[t][s] for t in cfg.tasks) for s in seeds}
        if avg:
            averages[v] = mean(avg.values())
        body.append([VARIANT_NAMES[v], *[fmt(per_task[t]) for t in cfg.tasks], fmt(avg)])
    return _table(header, body), averages


def efficiency_table(rows: list[dict], cfg: ExperimentConfig) -> tuple[list[str], list[dict]]:
    """Gain of grounding over the baseline for every pretraining data x fine-tuning share."""
    header = ["Pretraining data", "Fine-tuning share", *[TASK_NAMES[t] for t in cfg.tasks], "Average Δ",
              "no pretraining (avg)", "baseline (avg)", "+ grounding (avg)"]
    body, cells = [], []
    enc = cfg.focus_encoder
    for data in (FULL, EIGHTH):
        for frac in cfg.finetune.fractions:
            deltas, per_variant = {}, {"none": [], "baseline": [], "sga": []}
            for t in cfg.tasks:
                base = values(rows, variant="baseline", encoder=enc, data=data, task=t, fraction=frac)
                sga = values(rows, variant="sga", encoder=enc, data=data, task=t, fraction=frac)
                deltas[t] = paired(base, sga)
                none = values(rows, variant="none", encoder=enc, task=t, fraction=frac)
                for name, vals in (("none", none), ("baseline", base), ("sga", sga)):
                    if vals:
                        per_variant[name].append(mean(vals.values()))
            known = [d["mean"] for d in deltas.values() if d]
            avg = mean(known) if len(known) == len(cfg.tasks) else float("nan")
            cells.append({"data": data, "fraction": frac, "average": avg,
                          **{t: (d["mean"] if d else float("nan")) for t, d in deltas.items()}})
            body.append([DATA_NAMES[data], f"{frac:g}", *[fmt_delta(deltas[t]) for t in cfg.tasks],
                         "–" if math.isnan(avg) else f"{avg:+.2f}",
                         *[f"{mean(per_variant[n]):.1f}" if len(per_variant[n]) == len(cfg.tasks) else "–"
                           for n in ("none", "baseline", "sga")]])
    return _table(header, body), cells


def gt_table(rows: list[dict], cfg: ExperimentConfig) -> list[str]:
    header = ["Pretraining data", "Labels (M)", *[TASK_NAMES[t] for t in cfg.tasks]]
    body = []
    for data in (FULL, EIGHTH):
        for variant, name in (("baseline", "none (baseline)"), ("sga", "teacher pseudo labels"),
                              ("sga_gt", "ground truth")):
            cells = [fmt(values(rows, variant=variant, encoder=cfg.focus_encoder, data=data, task=t,
                                fraction=1.0)) for t in cfg.tasks]
            body.append([DATA_NAMES[data], name, *cells])
    return _table(header, body)


def _pct(value: float | None) -> str:
    """A share in percent; '–' where it is undefined (no predicted or no true positives)."""
    return "–" if value is None else f"{100 * value:.1f}"


def quality_table(record: dict[str, Any], cfg: ExperimentConfig) -> list[str]:
    header = ["Labels", "Score threshold", "Precision", "Recall", "Positive cells / sample"]
    body = []
    for name, rows in record["quality"].items():
        for q in rows:
            mark = " (default)" if name == "pseudo" and q["threshold"] == cfg.score_threshold else ""
            body.append(["teacher pseudo labels" if name == "pseudo" else "ground truth",
                         f"{q['threshold']:g}{mark}", _pct(q["precision"]), _pct(q["recall"]),
                         f"{q['positives_per_sample']:.2f}"])
    return _table(header, body)


# -------------------------------------------------------------------------------------------- prose
def findings(gains: list[dict], averages: dict[str, float], efficiency: list[dict],
             rows: list[dict], cfg: ExperimentConfig) -> list[str]:
    """Plain statements the numbers support, by fixed rules (no hand-written conclusions)."""
    out = []
    if gains:
        positive = sum(g["mean"] > 0 for g in gains)
        significant = [g for g in gains if not math.isnan(g["p"]) and g["p"] < 0.05]
        out.append(f"Grounding alignment beats the baseline in {positive} of {len(gains)} (model, data, "
                   f"task) cells of the main table; {sum(g['mean'] > 0 for g in significant)} gains and "
                   f"{sum(g['mean'] < 0 for g in significant)} losses are significant at p < 0.05 (paired "
                   f"t-test over {cfg.seeds} seeds). The claim 'improves every task' "
                   f"{'holds' if positive == len(gains) else 'does not hold'} here.")
        by_data = {d: [g["mean"] for g in gains if g["data"] == d] for d in (FULL, EIGHTH)}
        if by_data[FULL] and by_data[EIGHTH]:
            full, eighth = mean(by_data[FULL]), mean(by_data[EIGHTH])
            out.append(f"Mean gain with full pretraining data: {full:+.2f} points; with 1/8: {eighth:+.2f}. "
                       f"The claim 'larger gains when pretraining data is scarce' "
                       f"{'holds' if eighth > full else 'does not hold'} on average.")
        for task in cfg.tasks:
            task_gains = [g["mean"] for g in gains if g["task"] == task]
            if task_gains:
                out.append(f"{TASK_NAMES[task]}: mean gain {mean(task_gains):+.2f} points over "
                           f"{len(task_gains)} (model, data) settings.")
    if averages.get("sga") is not None:
        checks = [("sga_token", "phrase-level beats token-level grounding"),
                  ("sga_nospe", "SPE helps (phrase-level grounding with vs without SPE)")]
        for other, claim in checks:
            if other in averages:
                diff = averages["sga"] - averages[other]
                out.append(f"Ablation: '{claim}': {diff:+.2f} points on the task average "
                           f"({'holds' if diff > 0 else 'does not hold'}).")
        if {"baseline", "baseline_spe"} <= averages.keys():
            spe = averages["baseline_spe"] - averages["baseline"]
            gnd = averages["sga"] - averages["baseline_spe"]
            out.append(f"Of the {averages['sga'] - averages['baseline']:+.2f}-point task-average gain at 1/8 "
                       f"({cfg.focus_encoder}-stream), SPE alone (baseline + SPE) gives {spe:+.2f} and the "
                       f"grounding loss on top of SPE {gnd:+.2f}; the main table's Δ includes both, as the "
                       "paper's comparison does.")
        lams = {v: averages[v] for v in ("sga_l1", "sga_l5", "sga") if v in averages}
        if len(lams) > 1:
            best = max(lams, key=lams.get)
            lam = {"sga_l1": 1, "sga_l5": 5, "sga": 20}
            out.append(f"Best λ_gnd on the task average: {lam[best]} (paper: 20).")
    valid = [c for c in efficiency if not math.isnan(c["average"])]
    if valid:
        best = max(valid, key=lambda c: c["average"])
        # By the gain alone: equal gains would otherwise go on to compare the cells' dicts.
        top = max(((c[t], t, c) for c in valid for t in cfg.tasks if not math.isnan(c[t])),
                  key=lambda x: x[0], default=None)
        out.append(f"Data efficiency: the largest average gain is {best['average']:+.2f} points (pretraining "
                   f"{DATA_NAMES[best['data']]}, fine-tuning share {best['fraction']:g}); the largest single "
                   f"gain is {top[0]:+.2f} on {TASK_NAMES[top[1]]} (pretraining "
                   f"{DATA_NAMES[top[2]['data']]}, share {top[2]['fraction']:g}).")
    for data in (FULL, EIGHTH):
        pseudo = [r["test"] for r in rows if r["variant"] == "sga" and r["data"] == data
                  and r["fraction"] == 1.0 and r["encoder"] == cfg.focus_encoder]
        truth = [r["test"] for r in rows if r["variant"] == "sga_gt" and r["data"] == data]
        if pseudo and truth:
            diff = 100 * (mean(truth) - mean(pseudo))
            verdict = "teacher errors cost accuracy" if diff > 0 else "no cost of teacher errors is visible"
            out.append(f"Ground-truth M instead of pseudo labels ({DATA_NAMES[data]} data): {diff:+.2f} "
                       f"points on the task average ({verdict}).")
    return out


# ------------------------------------------------------------------------------------------- output
def _csv(rows: list[dict], fields) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue().encode()


def timing(rows: list[dict], record: dict[str, Any], units: list[Unit], cfg: ExperimentConfig,
           work: str) -> dict[str, float]:
    pre = [pretrain_timing(work, u.spec, cfg) for u in units if u.spec.labels is not None]
    pre = [p for p in pre if p]
    t = record["timings"]
    return {"world_wall_s": t["world_s"], "label_wall_s": t["label_s"], "derive_wall_s": t["derive_s"],
            "pretrain_cpu_s": sum(p["cpu_s"] for p in pre), "pretrain_runs": len(pre),
            "finetune_cpu_s": sum(r["cpu_s"] for r in rows), "finetune_cells": len(rows)}


def write_report(cfg: ExperimentConfig, out: str, rows: list[dict], record: dict[str, Any],
                 units: list[Unit], work: str, history: list[dict]) -> dict[str, Any]:
    """Write ``OUT/RESULTS.md``, ``OUT/cells.csv``, ``OUT/label_quality.csv`` and ``OUT/*.png``."""
    from .markdown import render

    expected = sum(len(u.cells) for u in units)
    main, gains = main_table(rows, cfg)
    ablation, averages = ablation_table(rows, cfg)
    efficiency, eff_cells = efficiency_table(rows, cfg)
    times = timing(rows, record, units, cfg, work)
    sections = {"main": main, "ablation": ablation, "efficiency": efficiency, "gt": gt_table(rows, cfg),
                "quality": quality_table(record, cfg),
                "findings": findings(gains, averages, eff_cells, rows, cfg)}
    plots = write_plots(out, rows, record, cfg)
    text = render(cfg, record, sections, times, plots, len(rows), expected, history)
    fs.write_bytes(fs.join(out, "RESULTS.md"), text.encode())
    ordered = sorted(rows, key=lambda r: tuple(str(r[k]) for k in ("variant", "encoder", "data", "task",
                                                                    "fraction", "seed")))
    fs.write_bytes(fs.join(out, "cells.csv"), _csv(ordered, CSV_FIELDS))
    quality_rows = [{"labels": name, **q} for name, qs in record["quality"].items() for q in qs]
    fs.write_bytes(fs.join(out, "label_quality.csv"),
                   _csv(quality_rows, ("labels", "threshold", "precision", "recall", "tp", "fp", "fn",
                                       "positives_per_sample")))
    fs.write_bytes(fs.join(out, "gains.csv"),
                   _csv(gains, ("encoder", "data", "task", "mean", "std", "n", "p")))
    total_cpu = times["pretrain_cpu_s"] + times["finetune_cpu_s"]
    return {"out": out, "cells": len(rows), "cells_expected": expected, "wall_s": history[-1]["wall_s"],
            "wall_s_all_invocations": round(sum(h["wall_s"] for h in history), 1),
            "pretrain_cpu_s": round(times["pretrain_cpu_s"], 1),
            "finetune_cpu_s": round(times["finetune_cpu_s"], 1), "train_cpu_s": round(total_cpu, 1),
            "label_precision": record["label_summary"].get("precision"),
            "label_recall": record["label_summary"].get("recall"),
            "mean_gain": round(mean(g["mean"] for g in gains), 3) if gains else None,
            "findings": sections["findings"]}
