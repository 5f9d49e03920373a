"""``sga experiment``: the paper's table in miniature, end to end on the synthetic world."""

from __future__ import annotations

from shards.cliutil import add_command

DESCRIPTION = """\
Regenerate the whole experiment into --out: build a synthetic world, label it with the bundled teacher
(`sga label`), pretrain tiny students (`sga pretrain`) without and with grounding alignment, single- and
two-stream, on all and on a random 1/8 of the pretraining set, fine-tune each on refexp, VQA and VCR
(`sga finetune`), and write RESULTS.md (tables laid out like the paper's, measured CPU time), CSVs and plots.
Also: ablations (token vs phrase level, SPE off, lambda_gnd in 1/5/20), data efficiency (fine-tuning on
1/8, 1/4, 1/2, all of each task), pseudo-label precision/recall and a run with ground-truth M.

Resumable: every finished fine-tuning is cached as WORK/cells/<id>.json (the id hashes every setting it
depends on) and pretraining resumes from its checkpoints; rerun the same command to continue.
The full run is sized for under 3 hours on 2 cores, --quick for under 15 minutes.
"""

EPILOG = """\
examples:
  sga experiment --quick                      # results/quick/RESULTS.md
  sga experiment --out results --seeds 3      # the full grid
"""


def register(subparsers) -> None:
    """Add ``sga experiment``."""
    p = add_command(subparsers, "experiment", _experiment, help="run the paper's experiment in miniature",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--quick", action="store_true", help="small world, 2 seeds, short schedules (< 15 min)")
    p.add_argument("--out", help="report folder (default: results, or results/quick with --quick)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default 3; 2 with --quick)")
    p.add_argument("--work", help="folder for the world, labels, checkpoints and cached cells "
                                  "(default $SGA_CACHE/experiment/<full|quick>)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one core each (default 2)")
    p.add_argument("--teacher", default="tiny", help="grounding teacher for the pseudo labels (default tiny)")


def _experiment(args) -> dict:
    from pipeline.defaults import cache_root
    from shards import fs
    from shards.errors import SgaError

    from .config import ExperimentConfig
    from .runner import run_experiment

    overrides = {"jobs": args.jobs, "teacher": args.teacher}
    if args.seeds is not None:
        if args.seeds < 1:
            raise SgaError("--seeds must be >= 1")
        overrides["seeds"] = args.seeds
    cfg = ExperimentConfig.quick(**overrides) if args.quick else ExperimentConfig.full(**overrides)
    out = args.out or ("results/quick" if args.quick else "results")
    work = args.work or fs.join(cache_root(), "experiment", cfg.name)
    return run_experiment(cfg, out, work, show_progress=not args.json)
