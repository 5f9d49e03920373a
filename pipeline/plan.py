"""Everything ``sga label`` decides before it starts Ray: the config, the up-front refusals, the plan.

Refusals name the file and the fix: input folders without shards, a region set whose shard names differ
from the image shards', an unknown teacher, an output folder holding something other than label sets of
this schema. A plan lists every input shard and the ones still to do: a shard is done iff its marker
exists in the label set's folder, and the folder is named by the label set id, which hashes the teacher
fingerprint, the phrase extractor and the thresholds, so a rerun skips exactly what this configuration
already finished and a new teacher labels into a new folder beside the old one.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

from shards import fs
from shards.errors import SgaError, ShardReadError
from shards.images import list_image_keys, list_shards
from shards.labels import (
    INFO_NAME,
    SCHEMA_VERSION,
    LabelSetInfo,
    read_labelset_info,
    write_labelset_info,
)
from shards.manifest import read_marker
from shards.regions import read_regions_info
from shards.tario import iter_tar

from .labeler import DECODE, ShardTask
from .labelsets import JOB_NAME, read_job
from .phrases import CACHE_DIR, PhraseConfig, cache_slug, describe_model
from .teacher_id import CACHE_NAME, check_teacher_spec
from .validate import ValidationConfig


@dataclass
class LabelJobConfig:
    """``sga label`` options. Worker counts left as None are sized from the cluster's resources."""

    images: str
    regions: str
    out: str
    teacher: str = "tiny"
    gt: str | None = None                 # world ground truth (GT/NNNNN.parquet): adds precision/recall
    address: str | None = None            # None: a local Ray instance; "auto" or "ray://host:port": a cluster
    num_cpus: int | None = None           # CPUs of the local instance (default: this process's cores)
    workers: int | None = None            # teacher actors
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    shard_workers: int | None = None      # CPU actors reading, extracting phrases, matching, writing
    cpus_per_shard_worker: float = 1.0
    batch_size: int = 16
    max_inflight: int = 4                 # batches per shard worker queued at the teachers
    batches_per_call: int = 2             # teacher batches per call to a teacher actor
    decode: str = "worker"                # where images are decoded (pipeline.labeler.DECODE)
    score_floor: float = 0.05
    score_threshold: float = 0.1          # best F1 of the tiny teacher's M on a held-out world
    iou_threshold: float = 0.5
    top_k: int = 10
    max_error_rate: float = 0.5           # errors/samples of the whole label set above this fail the job
    device: str | None = None             # default: "cuda" with GPUs per worker, else "cpu"
    show_progress: bool = True            # progress bars on stderr (off under --json)
    phrases: PhraseConfig = field(default_factory=PhraseConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def teacher_device(self) -> str:
        return self.device or ("cuda" if self.gpus_per_worker > 0 else "cpu")


@dataclass
class JobPlan:
    task: ShardTask
    shards: list[str]           # every input shard
    pending: list[str]          # those without a marker in this label set
    teacher_name: str


def check_inputs(images: str, regions: str) -> tuple[list[str], dict]:
    """Image shard names and the region set's info; refuses missing or mismatched shard sets."""
    if not fs.is_dir(images):
        raise SgaError(f"{images} is not a folder; pass --images an img2dataset output folder (NNNNN.tar)")
    shards = list_shards(images)
    if not shards:
        raise SgaError(f"{images} holds no image shards (NNNNN.tar); pass --images an img2dataset output "
                       "folder, or run `sga world` to make one")
    info = read_regions_info(regions)
    region_shards = [n[: -len(".tar")] for n in fs.list_dir(regions, ".tar")]
    if region_shards != shards:
        lacking = sorted(set(shards) - set(region_shards))
        extra = sorted(set(region_shards) - set(shards))
        detail = []
        if lacking:
            detail.append(f"{fs.join(regions, lacking[0] + '.tar')} is missing (image shard "
                          f"{fs.join(images, lacking[0] + '.tar')} exists; {len(lacking)} missing in all)")
        if extra:
            detail.append(f"{fs.join(regions, extra[0] + '.tar')} has no image shard ({len(extra)} extra)")
        raise SgaError(f"region shards do not match the image shards: {'; '.join(detail)}. Compute regions "
                       "for the same shards (`sga regions import`) or pass the matching --regions")
    return shards, info


def check_output(out: str) -> None:
    """Refuse an ``--out`` that is not a folder of label sets of this schema."""
    if not fs.exists(out):
        return
    if not fs.is_dir(out):
        raise SgaError(f"{out} is a file; --out must be a folder for label sets (a new or empty one)")
    if fs.exists(fs.join(out, INFO_NAME)):
        raise SgaError(f"{out} is a label set itself ({fs.join(out, INFO_NAME)}); pass its parent folder "
                       "as --out")
    files = [name for name in fs.list_dir(out) if name != CACHE_NAME]
    if files:
        raise SgaError(f"{fs.join(out, files[0])} is not part of a label set folder; --out must hold only "
                       "label sets written by `sga label`: pass a new or empty folder")
    for name in fs.list_subdirs(out):
        sub = fs.join(out, name)
        if name == CACHE_DIR:
            continue
        if not fs.exists(fs.join(sub, INFO_NAME)):
            if fs.list_dir(sub) or fs.list_subdirs(sub):
                raise SgaError(f"{sub} is not a label set (no {INFO_NAME}); --out must hold only label sets "
                               "written by `sga label`: pass a new or empty folder")
            continue
        info = read_labelset_info(sub)  # refuses newer schemas itself
        if info.schema_version != SCHEMA_VERSION:
            raise SgaError(f"{fs.join(sub, INFO_NAME)} has label schema {info.schema_version}, this sga "
                           f"writes {SCHEMA_VERSION}; pass a new --out or remove {sub}")


def open_labelset(out: str, info: LabelSetInfo) -> tuple[str, LabelSetInfo]:
    """``OUT/<labelset_id>``, created with its ``labelset.json`` or reopened (keeping its creation date)."""
    uri = fs.join(out, info.labelset_id)
    if fs.exists(fs.join(uri, INFO_NAME)):
        existing = read_labelset_info(uri)
        if existing.labelset_id != info.labelset_id:
            raise SgaError(f"{fs.join(uri, INFO_NAME)} describes label set {existing.labelset_id}, not "
                           f"{info.labelset_id}; remove {uri} and rerun")
        return uri, existing
    fs.makedirs(uri)
    write_labelset_info(uri, info)
    return uri, info


def check_same_inputs(labelset_uri: str, config: LabelJobConfig) -> None:
    """Refuse to resume a label set that was started on other images or regions (same shard names, other
    data: its markers would wrongly mark them done)."""
    job = read_job(labelset_uri)
    if not job:
        return
    for name in ("images", "regions"):
        before, now = job.get(name), getattr(config, name)
        if before is not None and fs.resolve(before)[1] != fs.resolve(now)[1]:
            raise SgaError(f"{fs.join(labelset_uri, JOB_NAME)} says this label set was made from --{name} "
                           f"{before}, not {now}; pass another --out for other inputs")


@dataclass
class CheckedInputs:
    shards: list[str]
    feature_dim: int | None
    extractor: str


def check_keys_overlap(images: str, regions: str, shard: str) -> None:
    """Refuse region shards from another world: same shard names, but no key of ``shard`` in common (every
    sample would be rejected)."""
    region_uri = fs.join(regions, f"{shard}.tar")
    image_keys, region_keys = set(), set()
    # A damaged shard is the labeler's to report sample by sample: compare the keys read before the damage.
    with contextlib.suppress(ShardReadError):
        image_keys.update(list_image_keys(images, shard))
    with contextlib.suppress(ShardReadError):
        region_keys.update(s.key for s in iter_tar(region_uri))
    if image_keys and region_keys and not image_keys & region_keys:
        raise SgaError(f"no sample key of {fs.join(images, shard + '.tar')} is in {region_uri} (e.g. "
                       f"{min(image_keys)!r} vs {min(region_keys)!r}): the regions were computed for other "
                       "images; pass the --regions made from these --images")


def check_job(config: LabelJobConfig) -> CheckedInputs:
    """Every up-front refusal, before Ray or the teacher is started."""
    shards, regions_info = check_inputs(config.images, config.regions)
    check_keys_overlap(config.images, config.regions, shards[0])
    if not 0 <= config.max_error_rate <= 1:
        raise SgaError(f"--max-error-rate {config.max_error_rate}: pass a fraction in [0, 1]")
    if config.gt is not None and not fs.is_dir(config.gt):
        raise SgaError(f"{config.gt} is not a folder; --gt takes the world's gt/ folder (GT/NNNNN.parquet)")
    check_output(config.out)
    if not (0 <= config.score_floor <= config.score_threshold <= 1):
        raise SgaError(f"need 0 <= --score-floor ({config.score_floor}) <= --score-threshold "
                       f"({config.score_threshold}) <= 1")
    if min(config.batch_size, config.max_inflight, config.batches_per_call) < 1:
        raise SgaError("--batch-size, --max-inflight and --batches-per-call must be >= 1")
    if config.decode not in DECODE:
        raise SgaError(f"--decode {config.decode!r}: choose {' or '.join(DECODE)}")
    check_teacher_spec(config.teacher)
    _, _, extractor = describe_model(config.phrases)
    return CheckedInputs(shards, regions_info.get("feature_dim"), extractor)


def clean_partial(task: ShardTask) -> None:
    """Delete what writers killed mid-write left behind (temp files, never visible to readers).

    Called when a run starts and when it ends, while no writer of this label set is running.
    """
    fs.clean_tmp(task.labelset_uri)
    fs.clean_tmp(fs.join(task.labels_root, CACHE_DIR, cache_slug(task.info.extractor)))


def plan_job(config: LabelJobConfig, checked: CheckedInputs, teacher_name: str,
             teacher_fingerprint: str) -> JobPlan:
    """Open the label set of this teacher and configuration, and list the shards still to label."""
    info = LabelSetInfo(teacher_name=teacher_name, teacher_fingerprint=teacher_fingerprint,
                        extractor=checked.extractor, score_floor=config.score_floor,
                        score_threshold=config.score_threshold, iou_threshold=config.iou_threshold,
                        top_k=config.top_k)
    uri, info = open_labelset(config.out, info)
    check_same_inputs(uri, config)
    task = ShardTask(images_uri=config.images, regions_uri=config.regions, labels_root=config.out, info=info,
                     gt_uri=config.gt, feature_dim=checked.feature_dim, batch_size=config.batch_size,
                     max_inflight=config.max_inflight, batches_per_call=config.batches_per_call,
                     decode=config.decode, validation=config.validation)
    clean_partial(task)
    fs.write_json(fs.join(uri, JOB_NAME), {
        "images": config.images, "regions": config.regions, "gt": config.gt, "shards": checked.shards,
        "teacher_spec": config.teacher, "config": {k: v for k, v in asdict(config).items()
                                                   if k not in ("images", "regions", "out", "gt")},
    })
    pending = [s for s in checked.shards
               if (read_marker(uri, s) or {}).get("labelset_id") != info.labelset_id]
    return JobPlan(task=task, shards=checked.shards, pending=pending, teacher_name=teacher_name)
