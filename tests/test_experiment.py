"""``sga experiment``: the grid, the statistics, and one real end-to-end run on a very small world.

The end-to-end run uses every real stage: ``sga world``, ``sga label`` with the bundled teacher on a local
Ray instance, ``sga pretrain`` (student.train) and ``sga finetune`` in two spawned worker processes.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import pytest
import torch

from shards.labels import iter_label_shard
from student.experiment.config import (
    TASKS,
    ExperimentConfig,
    FinetuneRecipe,
    PretrainRecipe,
    teacher_signature,
)
from student.experiment.labelsets import label_shards, labelled_keys
from student.experiment.plan import EIGHTH, FULL, build_plan
from student.experiment.report import findings, paired, values
from student.experiment.runner import run_experiment
from student.experiment.stages import cell_path

torch.set_num_threads(1)


def small_config(**overrides) -> ExperimentConfig:
    fields = dict(name="test", world_samples=48, task_samples=40, samples_per_shard=16, seeds=2,
                  encoders=("two",), ablations=("sga_token",), jobs=2,
                  pretrain=PretrainRecipe(epochs=1.0, batch_size=16),
                  finetune=FinetuneRecipe(epochs=dict.fromkeys(TASKS, 1), fractions=(0.5, 1.0)))
    return ExperimentConfig(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------------ grid
def test_full_grid_has_every_table():
    cfg = ExperimentConfig.full()
    cells = [c for u in build_plan(cfg) for c in u.cells]
    key = {(c.spec.variant, c.spec.encoder, c.spec.data, c.task, c.fraction) for c in cells}
    seeds = {c.spec.seed for c in cells}
    assert seeds == {0, 1, 2}
    for enc in ("two", "single"):
        for data in (FULL, EIGHTH):
            for variant in ("baseline", "sga"):
                assert {(variant, enc, data, t, 1.0) for t in cfg.tasks} <= key
    for variant in cfg.ablations:
        assert {(variant, "two", EIGHTH, t, 1.0) for t in cfg.tasks} <= key
    for frac in (0.125, 0.25, 0.5):
        assert ("sga", "two", FULL, "vqa", frac) in key and ("baseline", "two", EIGHTH, "refexp", frac) in key
        assert ("sga", "single", FULL, "vqa", frac) not in key
    assert {("sga_gt", "two", d, "vcr_qa", 1.0) for d in (FULL, EIGHTH)} <= key
    # 2 encoders x 2 data x 2 variants + 2 no-pretraining + 5 ablations + 2 ground-truth, x 3 seeds.
    assert len(build_plan(cfg)) == (8 + 2 + 5 + 2) * 3
    ids = [c.cell_id(cfg) for c in cells]
    assert len(set(ids)) == len(ids)


def test_ids_change_exactly_with_their_settings():
    cfg = ExperimentConfig.quick()
    ids = {c.cell_id(cfg) for u in build_plan(cfg) for c in u.cells}
    assert ids == {c.cell_id(cfg) for u in build_plan(ExperimentConfig.quick()) for c in u.cells}
    # More jobs or another name change nothing a result depends on.
    same = dataclasses.replace(cfg, jobs=1, name="other")
    assert ids == {c.cell_id(same) for u in build_plan(same) for c in u.cells}
    recipe = dataclasses.replace(cfg.finetune, lr={**cfg.finetune.lr, "vqa": 1.0})
    lr = dataclasses.replace(cfg, finetune=recipe)
    changed = {c.cell_id(lr) for u in build_plan(lr) for c in u.cells}
    assert {i for i in changed if "-vqa-" in i}.isdisjoint(ids)
    assert {i for i in changed if "-vqa-" not in i} <= ids
    world = dataclasses.replace(cfg, world_seed=1)
    assert ids.isdisjoint(c.cell_id(world) for u in build_plan(world) for c in u.cells)


# ------------------------------------------------------------------------------------------ statistics
def _row(variant, data, task, seed, test, encoder="two", fraction=1.0):
    return {"variant": variant, "encoder": encoder, "data": data, "task": task, "seed": seed,
            "fraction": fraction, "test": test}


def test_paired_gain_and_its_t_test():
    a, b = {0: 50.0, 1: 60.0, 2: 55.0}, {0: 52.0, 1: 61.0, 2: 58.0, 3: 99.0}
    d = paired(a, b)
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    from scipy.stats import ttest_rel

    assert d["p"] == pytest.approx(ttest_rel([52, 61, 58], [50, 60, 55]).pvalue)
    single = paired({0: 1.0}, {0: 3.0})
    assert single["mean"] == 2.0 and math.isnan(single["p"])
    assert paired({0: 1.0}, {1: 1.0}) is None


def test_findings_say_when_the_claim_fails():
    cfg = small_config(tasks=("refexp", "vqa"))
    rows = []
    for seed in range(2):
        for data, gain in ((FULL, 0.05), (EIGHTH, -0.02)):
            for task in cfg.tasks:
                rows += [_row("baseline", data, task, seed, 0.5 + 0.01 * seed),
                         _row("sga", data, task, seed, 0.5 + 0.01 * seed + gain)]
    gains = [{"encoder": "two", "data": data, "task": t,
              **paired(values(rows, variant="baseline", data=data, task=t),
                       values(rows, variant="sga", data=data, task=t))}
             for data in (FULL, EIGHTH) for t in cfg.tasks]
    text = " ".join(findings(gains, {}, [], rows, cfg))
    assert "in 2 of 4" in text and "'improves every task' does not hold" in text
    assert "with 1/8: -2.00" in text and "scarce' does not hold" in text



def test_findings_name_the_largest_efficiency_gain_when_gains_tie():
    cfg = small_config(tasks=("refexp", "vqa"))
    # Two cells whose refexp gains tie: the one named must come from the gain, not from comparing cells.
    efficiency = [{"data": data, "fraction": fraction, "refexp": 3.0, "vqa": vqa, "average": (3.0 + vqa) / 2}
                  for data, fraction, vqa in ((FULL, 0.5, 1.0), (EIGHTH, 1.0, 2.0))]
    text = " ".join(findings([], {}, efficiency, [], cfg))
    assert "largest average gain is +2.50 points (pretraining 1/8, fine-tuning share 1)" in text
    assert "largest single gain is +3.00 on" in text

# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    # The runner signs the teacher's weights into every id; sign here too to find the cells it wrote.
    cfg = small_config(teacher_signature=teacher_signature("tiny"))
    out, work = str(root / "results"), str(root / "work")
    summary = run_experiment(cfg, out, work, show_progress=False)
    return {"cfg": cfg, "out": out, "work": work, "summary": summary}


def test_end_to_end_writes_every_cell_and_the_report(run):
    cfg, out = run["cfg"], run["out"]
    expected = sum(len(u.cells) for u in build_plan(cfg))
    assert run["summary"]["cells"] == run["summary"]["cells_expected"] == expected
    with open(os.path.join(out, "cells.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == expected
    assert all(0.0 <= float(r["test"]) <= 1.0 and int(r["n_test"]) > 0 for r in rows)
    with open(os.path.join(out, "RESULTS.md")) as f:
        text = f.read()
    for heading in ("Main results", "Ablations", "Data efficiency", "Pseudo-label quality",
                    "What the numbers say", "Compute (measured)"):
        assert heading in text
    for png in ("main.png", "efficiency.png", "ablation.png", "label_quality.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    assert run["summary"]["train_cpu_s"] > 0


def test_label_sets_subset_and_ground_truth(run):
    record_dir = [d for d in os.listdir(run["work"]) if d.startswith("data-")]
    assert len(record_dir) == 1
    import json

    with open(os.path.join(run["work"], record_dir[0], "prepare.json")) as f:
        record = json.load(f)
    sets = record["labelsets"]
    full = labelled_keys(sets["pseudo"][FULL])
    eighth = labelled_keys(sets["pseudo"][EIGHTH])
    assert len(eighth) == round(len(full) / 8) and set(eighth) <= set(full)
    assert labelled_keys(sets["gt"][FULL]) == full
    assert sorted(labelled_keys(sets["gt"][EIGHTH])) == sorted(eighth)
    # Ground-truth M scored against the truth is perfect; the pseudo labels' score at the label job's
    # default threshold is exactly what `sga label --gt` reported.
    assert record["quality"]["gt"][0]["precision"] == 1.0 and record["quality"]["gt"][0]["recall"] == 1.0
    default = next(q for q in record["quality"]["pseudo"] if q["threshold"] == run["cfg"].score_threshold)
    for key in ("precision", "recall"):
        assert default[key] == pytest.approx(record["label_summary"][key])
    assert default["tp"] > 0, "the bundled teacher found no true region-phrase pair in the test world"
    shard = label_shards(sets["gt"][FULL])[0]
    assert any(len(rec.phrases) for rec in iter_label_shard(sets["gt"][FULL], shard))


def test_rerun_redoes_only_missing_cells_with_identical_results(run):
    cfg, work = run["cfg"], run["work"]
    cells = [c for u in build_plan(cfg) for c in u.cells if c.spec.variant == "sga" and c.task == "vqa"]
    target = cell_path(work, cells[0].cell_id(cfg))
    import json

    with open(target) as f:
        before = json.load(f)
    os.remove(target)
    others = {p: os.path.getmtime(p) for p in (cell_path(work, c.cell_id(cfg)) for u in build_plan(cfg)
                                               for c in u.cells) if os.path.exists(p)}
    summary = run_experiment(cfg, run["out"], work, show_progress=False)
    assert summary["cells"] == run["summary"]["cells"]
    with open(target) as f:
        after = json.load(f)
    assert {k: v for k, v in after.items() if not k.endswith("_s")} == \
        {k: v for k, v in before.items() if not k.endswith("_s")}
    assert all(os.path.getmtime(p) == t for p, t in others.items())
    # The report's wall time covers both invocations of this grid.
    both = run["summary"]["wall_s"] + summary["wall_s"]
    assert summary["wall_s_all_invocations"] == pytest.approx(both, abs=0.2)
    with open(os.path.join(run["out"], "RESULTS.md")) as f:
        assert "over 2 invocation(s) of this grid" in f.read()
