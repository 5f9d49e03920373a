"""The report's figures (matplotlib, Agg backend, PNG): main results, data efficiency, ablations, labels."""

from __future__ import annotations

import io
from statistics import mean, stdev
from typing import Any

from shards import fs

from .config import ExperimentConfig
from .plan import EIGHTH, FULL

SHORT = {"refexp": "refexp", "vqa": "VQA", "vcr_qa": "Q→A", "vcr_qar": "QA→R"}


def _stats(rows: list[dict], **match: Any) -> tuple[float, float]:
    v = [100 * r["test"] for r in rows if all(r.get(k) == x for k, x in match.items())]
    if not v:
        return float("nan"), 0.0
    return mean(v), (stdev(v) if len(v) > 1 else 0.0)


def _save(fig, out: str, name: str) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    fs.write_bytes(fs.join(out, name), buf.getvalue())
    return name


def write_plots(out: str, rows: list[dict], record: dict[str, Any], cfg: ExperimentConfig) -> list[str]:
    """Write the PNGs into ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # Main results: per task, baseline vs grounding for every (encoder, data) group.
    groups = [(e, d) for e in cfg.encoders for d in (FULL, EIGHTH)]
    fig, axes = plt.subplots(1, len(cfg.tasks), figsize=(3.2 * len(cfg.tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], cfg.tasks):
        for k, (variant, colour) in enumerate((("baseline", "#9a9a9a"), ("sga", "#2b6cb0"))):
            stats = [_stats(rows, variant=variant, encoder=e, data=d, task=task, fraction=1.0)
                     for e, d in groups]
            xs = [i + 0.38 * (k - 0.5) for i in range(len(groups))]
            ax.bar(xs, [s[0] for s in stats], 0.36, yerr=[s[1] for s in stats], color=colour, capsize=2,
                   label=variant)
        ax.set_xticks(range(len(groups)), [f"{e}\n{'1/8' if d == EIGHTH else 'full'}" for e, d in groups],
                      fontsize=7)
        ax.set_title(SHORT[task])
        ax.set_ylabel("test %")
    axes[0][0].legend(fontsize=7)
    names.append(_save(fig, out, "main.png"))
    plt.close(fig)

    # Data efficiency: gain vs fine-tuning share, one line per pretraining data.
    fig, axes = plt.subplots(1, len(cfg.tasks), figsize=(3.2 * len(cfg.tasks), 3.0), squeeze=False)
    enc = cfg.focus_encoder
    for ax, task in zip(axes[0], cfg.tasks):
        for data, style in ((FULL, "-o"), (EIGHTH, "--s")):
            gains = [_stats(rows, variant="sga", encoder=enc, data=data, task=task, fraction=f)[0]
                     - _stats(rows, variant="baseline", encoder=enc, data=data, task=task, fraction=f)[0]
                     for f in cfg.finetune.fractions]
            label = f"pretrain {'1/8' if data == EIGHTH else 'full'}"
            ax.plot(cfg.finetune.fractions, gains, style, label=label)
        ax.axhline(0, color="k", lw=0.6)
        fractions = cfg.finetune.fractions
        # Explicit limits: a panel whose cells are all missing still gets a valid log axis.
        ax.set_xlim(min(fractions) / 1.5, max(fractions) * 1.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_xlabel("fine-tuning share")
        ax.set_title(SHORT[task])
        ax.set_ylabel("Δ test (points)")
    axes[0][0].legend(fontsize=7)
    names.append(_save(fig, out, "efficiency.png"))
    plt.close(fig)

    # Ablations: task average per variant.
    variants = [v for v in ("baseline", "baseline_spe", "sga_token", "sga_nospe", "sga_l1", "sga_l5", "sga")
                if v in ("baseline", "sga") or v in cfg.ablations]
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    avgs = []
    for v in variants:
        per_task = [_stats(rows, variant=v, encoder=enc, data=EIGHTH, task=t, fraction=1.0)[0]
                    for t in cfg.tasks]
        avgs.append(mean(per_task))
    ax.bar(range(len(variants)), avgs, color="#2b6cb0")
    ax.set_xticks(range(len(variants)), variants, fontsize=7, rotation=20)
    ax.set_ylabel("task-average test %")
    ax.set_title(f"ablations ({enc}-stream, 1/8 pretraining)")
    names.append(_save(fig, out, "ablation.png"))
    plt.close(fig)

    # Label quality: precision and recall of M vs the teacher-score threshold.
    quality = record["quality"]["pseudo"]
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    ts = [q["threshold"] for q in quality]
    for key, style in (("precision", "-o"), ("recall", "-s")):
        ax.plot(ts, [float("nan") if q[key] is None else 100 * q[key] for q in quality], style, label=key)
    ax.axvline(cfg.score_threshold, color="k", lw=0.6, ls=":")
    ax.set_xlabel("teacher score threshold")
    ax.set_ylabel("%")
    ax.set_title("pseudo-label M vs ground truth")
    ax.legend(fontsize=7)
    names.append(_save(fig, out, "label_quality.png"))
    plt.close(fig)
    return names
