"""Per-sample CPU cost of labelling with a full-size MDETR (ResNet-101 + RoBERTa-base, 800 px): the teacher's
forward pass against everything else, and how many CPU cores keep one GPU fed.

Random weights in the official layout (no released checkpoint offline), a small RoBERTa-style BPE standing in
for roberta-base's tokenizer files, MDETR's evaluation preprocessing (short side 800, long side <= 1333).
One thread throughout. Measured, in one run, on a synthetic world:

1. the teacher's ``ground`` over pre-decoded, pre-parsed samples, its model forward timed apart (a hook on
   ``model.forward``): the rest of ``ground`` is resize + normalise + pad, tokenising, positive maps, scoring;
2. the job's shard work (read, decode, validate, spaCy, matching, writing) with the teacher's answers from (1)
   replayed at once (``bench_label.shard_work_alone``; its first shard is a warm-up and is not counted).

Printed: forward ms/sample, teacher-side non-forward ms/sample, shard-work ms/sample, their non-forward sum
(target <= 8 ms/sample/core) and the cores that keep one GPU fed at ``--gpu-rate`` img/s:
cores = rate * non-forward ms / 1000. On a GPU the forward leaves the CPU; everything else stays on it.

    .venv/bin/python benchmarks/bench_mdetr_real.py --samples 16 --per-shard 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_label import _answer_key, shard_work_alone, world


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16, help="world samples (R101 on CPU: seconds per image)")
    p.add_argument("--per-shard", type=int, default=8, help="samples per shard (>= 2 shards: one warms up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gpu-rate", type=float, default=150.0, help="img/s one GPU runs the teacher at")
    p.add_argument("--score-floor", type=float, default=0.05)
    p.add_argument("--score-threshold", type=float, default=0.1)
    p.add_argument("--decode", default="worker", choices=("worker", "teacher"))
    p.add_argument("--workdir", help="keeps the world and teacher between runs (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def random_teacher(root: Path, texts: list[str], entry: str = "mdetr_resnet101", preprocess=None) -> Path:
    """A random-weight teacher directory of ``entry`` (default preprocessing: MDETR's evaluation size)."""
    import torch

    from teacher.grounding import TOKENIZER_DIR, write_teacher_json
    from teacher.mdetr import build_mdetr, save_mdetr
    from teacher.preprocess import PreprocessConfig
    from teacher.tokenizer import train_tokenizer

    out = root / f"teacher-{entry}"
    if not (out / "teacher.json").is_file():
        torch.manual_seed(0)
        model = build_mdetr(entry)
        save_mdetr(model, model.config, str(out))
        train_tokenizer(texts, vocab_size=400, min_frequency=1).save_pretrained(str(out / TOKENIZER_DIR))
        write_teacher_json(out, preprocess or PreprocessConfig(), {"bench": "random weights"})
    return out


def parsed_samples(world_dir: Path) -> tuple[list, int]:
    """``GroundingInput`` of every valid sample with phrases (decoded, parsed) and the sample count."""
    from pipeline.phrases import PhraseExtractor
    from pipeline.validate import ValidationConfig, check_caption, check_image
    from shards.errors import SampleError
    from shards.images import iter_image_shard, list_shards
    from teacher.base import GroundingInput

    images, decoded, total = str(world_dir / "images"), [], 0
    for shard in list_shards(images):
        for s in iter_image_shard(images, shard):
            total += 1
            try:
                caption = check_caption(s.key, s.caption, ValidationConfig())
                decoded.append((check_image(s.key, s.status, s.jpg, s.error_message, ValidationConfig()),
                                caption))
            except SampleError:
                continue
    spans = PhraseExtractor().extract([c for _, c in decoded])
    return [GroundingInput(img, c, sp) for (img, c), sp in zip(decoded, spans) if sp], total


def teacher_pass(teacher_dir: Path, batch: list, args) -> tuple[dict, dict]:
    """CPU seconds of ``ground`` and of the model forward inside it; the answers keyed for replay."""
    import torch

    from teacher.base import load_teacher

    torch.set_num_threads(1)
    teacher = load_teacher(str(teacher_dir), score_floor=args.score_floor)
    model, forward_s = teacher.model, [0.0]
    inner = model.forward

    def timed(*a, **k):
        start = time.thread_time()
        try:
            return inner(*a, **k)
        finally:
            forward_s[0] += time.thread_time() - start

    model.forward = timed
    teacher.ground(batch[:1])                      # warm-up: first-call allocations
    forward_s[0], found = 0.0, []
    start = time.thread_time()
    for i in range(0, len(batch), args.batch_size):
        found.extend(teacher.ground(batch[i: i + args.batch_size]))
    ground_s = time.thread_time() - start
    answers = {_answer_key(x.caption, x.spans): [(pb.boxes, pb.scores) for pb in phrases]
               for x, phrases in zip(batch, found)}
    shapes = {tuple(x.image.shape[:2]) for x in batch}
    return {"ground_s": ground_s, "forward_s": forward_s[0], "source_sizes": sorted(shapes)[:3]}, answers


def run(args) -> dict:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-mdetr-real-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        world_dir = world(root, args.samples, args.per_shard)
        batch, total = parsed_samples(world_dir)
        teacher_dir = random_teacher(root, [x.caption for x in batch] * 5)
        timing, answers = teacher_pass(teacher_dir, batch, args)
        shard = shard_work_alone(world_dir, args, answers)
    finally:
        if not args.workdir:    # the teacher alone is 742 MB
            shutil.rmtree(root, ignore_errors=True)
    grounded = len(batch)
    forward_ms = 1000 * timing["forward_s"] / grounded
    teacher_rest_ms = 1000 * (timing["ground_s"] - timing["forward_s"]) / grounded
    # Shard work is per sample read, less scoring against the world's hidden truth (real data has none);
    # the teacher's rest per grounded sample (the others never reach it).
    non_teacher_ms = shard["ms_per_sample"] - shard["scoring_ms_per_sample"] + teacher_rest_ms
    return {
        "teacher": "mdetr_resnet101 (random weights, 800 px, fp32, 1 thread)", "samples": total,
        "grounded": grounded, "source_image_sizes_hw": timing["source_sizes"],
        "forward_ms_per_sample": forward_ms,
        "teacher_non_forward_ms_per_sample": teacher_rest_ms,
        "shard_work_ms_per_sample": shard["ms_per_sample"],
        "ground_truth_scoring_ms_per_sample": shard["scoring_ms_per_sample"],
        "non_teacher_ms_per_sample_per_core": non_teacher_ms,
        "target_non_teacher_ms": 8.0, "gpu_rate_img_per_s": args.gpu_rate,
        "cores_to_feed_one_gpu": args.gpu_rate * non_teacher_ms / 1000,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:40s} {value:.2f}" if isinstance(value, float) else f"{key:40s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
