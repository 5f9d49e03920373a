"""Full-size MDETR on one GPU: model throughput at 800 px in bf16 and a two-shard ``sga label`` job.

On a CUDA machine (about 5 minutes, well under 8):

1. if the installed torch has no CUDA build while an NVIDIA driver is present, ``pip install`` the same
   torch version from PyPI (its Linux wheels are CUDA builds) and re-run this script;
2. MDETR-R101 (random weights, official layout) forward throughput in bf16 autocast on 800 x 1066 inputs
   (MDETR's evaluation size of a 3:4 photo) for batch sizes 1, 4, 8, 16: img/s after warm-up;
3. a synthetic world of two shards labelled by ``sga label --gpus-per-worker 1`` with that model as the
   teacher (800-px preprocessing): the job's img/s and the teacher's busy fraction.

``--dry-run`` runs the same code on the CPU at toy size (the ``tiny`` entry, 64-px inputs, batch sizes 1 and
2, a world of 2 x 4 samples, ``--gpus-per-worker 0``) in well under a minute, to check the script itself.
The last line printed is one JSON object with every figure.

    python benchmarks/gpu_mdetr.py            # on the GPU machine
    python benchmarks/gpu_mdetr.py --dry-run  # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REEXEC_FLAG = "SGA_GPU_MDETR_REEXEC"


@dataclass(frozen=True)
class RunSize:
    """Everything the dry run shrinks."""

    entry: str
    device: str
    height: int
    width: int
    batch_sizes: tuple[int, ...]
    iters: int
    shard_samples: int
    short_side: int
    max_size: int
    gpus_per_worker: int
    job_batch_size: int
    num_cpus: int | None


FULL = RunSize("mdetr_resnet101", "cuda", 800, 1066, (1, 4, 8, 16), 10, 256, 800, 1333, 1, 16, None)
DRY = RunSize("tiny", "cpu", 64, 85, (1, 2), 2, 4, 64, 128, 0, 2, 2)


def ensure_cuda_torch() -> None:
    """Swap a CPU-only torch for PyPI's CUDA build of the same version when a GPU driver is present."""
    import torch

    if torch.cuda.is_available():
        return
    if torch.version.cuda is None and shutil.which("nvidia-smi") and not os.environ.get(REEXEC_FLAG):
        version = torch.__version__.split("+")[0]
        print(f"torch {torch.__version__} has no CUDA; installing torch=={version} from PyPI", flush=True)
        pip = [sys.executable, "-m", "pip", "install", "--force-reinstall", f"torch=={version}"]
        if subprocess.run(pip).returncode != 0:
            sys.exit(f"`{' '.join(pip)}` failed; install a CUDA build of torch {version} by hand")
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, REEXEC_FLAG: "1"})
    sys.exit("no CUDA device visible to torch (torch.cuda.is_available() is False); run with --dry-run "
             "to check the script on a CPU")


def throughput(size: RunSize) -> dict[str, float]:
    """img/s of the model forward in bf16 autocast at ``size.height x size.width`` per batch size."""
    import torch

    from teacher.mdetr import build_mdetr

    torch.manual_seed(0)
    device = torch.device(size.device)
    model = build_mdetr(size.entry).to(device).eval()
    tokens = 24  # a CC3M caption: ~12 words
    result = {}
    for batch in size.batch_sizes:
        images = torch.randn(batch, 3, size.height, size.width, device=device)
        mask = torch.zeros(batch, size.height, size.width, dtype=torch.bool, device=device)
        ids = torch.randint(5, 300, (batch, tokens), device=device)
        inputs = (images, mask, ids, torch.ones(batch, tokens, dtype=torch.long, device=device))
        for _ in range(2):      # warm-up: cuDNN autotuning, allocator growth
            _forward(model, inputs, device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(size.iters):
            _forward(model, inputs, device)
        _sync(device)
        result[str(batch)] = batch * size.iters / (time.perf_counter() - start)
        print(f"forward bs={batch:3d}: {result[str(batch)]:8.1f} img/s", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _forward(model, inputs: tuple, device) -> None:
    import torch

    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(*inputs)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def label_job(size: RunSize, root: Path) -> dict:
    """A two-shard world labelled by ``sga label`` with a random ``size.entry`` teacher; its summary."""
    sys.path.insert(0, str(HERE))
    from bench_label import world
    from bench_mdetr_real import random_teacher

    from shards.images import iter_image_shard, list_shards
    from teacher.preprocess import PreprocessConfig

    world_dir = world(root, 2 * size.shard_samples, size.shard_samples)
    images = str(world_dir / "images")
    captions = [s.caption for shard in list_shards(images) for s in iter_image_shard(images, shard)]
    teacher = random_teacher(root, captions * 2, size.entry,
                             PreprocessConfig(short_side=size.short_side, max_size=size.max_size))
    argv = [sys.executable, "-m", "pipeline.cli", "label", "--images", images, "--regions",
            str(world_dir / "regions"), "--out", str(root / "labels"), "--teacher", str(teacher),
            "--workers", "1", "--gpus-per-worker", str(size.gpus_per_worker),
            "--batch-size", str(size.job_batch_size), "--json"]
    if size.num_cpus is not None:
        argv += ["--num-cpus", str(size.num_cpus), "--cpus-per-worker", "1", "--shard-workers", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=420)
    if done.returncode != 0:
        sys.exit(f"sga label failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"label job: {summary['samples']} samples, {summary['samples_per_s']:.1f} img/s, teacher busy "
          f"{summary['teacher_busy_fraction']:.2f}", flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="toy size on the CPU (checks the script)")
    p.add_argument("--workdir", help="world and teacher folder (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    size = DRY if args.dry_run else FULL
    start = time.perf_counter()
    if not args.dry_run:
        ensure_cuda_torch()
    import torch

    if args.dry_run:
        torch.set_num_threads(1)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-mdetr-"))
    try:
        forward = throughput(size)
        summary = label_job(size, root)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if size.device == "cuda" else "cpu"
    print(json.dumps({
        "dry_run": args.dry_run, "device": device, "torch": torch.__version__, "size": asdict(size),
        "forward_img_per_s": forward, "label_samples": summary["samples"], "label_ok": summary["ok"],
        "label_img_per_s": summary["samples_per_s"],
        "teacher_busy_fraction": summary["teacher_busy_fraction"],
        "wall_s": time.perf_counter() - start,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
