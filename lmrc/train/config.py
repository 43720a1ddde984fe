"""Training configuration: a dataclass tree loaded from YAML, unknown keys rejected with the key named.

A config file may start with ``base: other.yaml`` (relative to the file): the base is loaded first (recursively)
and this file's mappings are merged over it key by key, so an ablation file only states what differs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmrc.config import ModelConfig, from_dict, load_yaml, to_dict
from lmrc.utils.errors import LmrcError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
SCHEDULES = ("constant", "step", "cosine")
CE_KINDS = ("plain", "balanced", "bootstrapped")


@dataclass
class DatasetSpec:
    """One source of real training videos (read with ``lmrc.data.datasets.read_dataset``)."""

    kind: str = "davis2016"  # davis2016 | davis2017 | youtube_vos | folder | video_masks | image_masks
    root: str = ""
    weight: float = 1.0  # share of samples, relative to the other sources (real and synthetic)
    split: str | None = "train"  # DAVIS ImageSets split; None: every sequence folder (ignored by youtube_vos/folder)
    exclude: list[str] = field(default_factory=list)  # more sequences to leave out (besides data.holdout)


@dataclass
class SyntheticConfig:
    """Synthetic clips built from the (non-held-out) training sequences; weight 0 disables a source."""

    static_weight: float = 0.0  # one annotated frame under three random warps (StaticImageClips)
    static_stride: int = 5  # use every k-th annotated frame as a static source
    paste_weight: float = 0.0  # a second sequence's object pasted over the clip (PastedObjectClips)


@dataclass
class ValidationConfig:
    """Held-out clips scored during training. Sequences default to ``data.holdout`` of the first dataset."""

    kind: str | None = None  # None: the first dataset's kind and root
    root: str | None = None
    split: str | None = "train"
    sequences: list[str] | None = None  # None: data.holdout
    triplets_per_sequence: int = 4  # fixed 3-frame samples (no augmentation) for a loss / J on triplets
    # frames per held-out video segmented with the streaming Segmenter and scored with J&F; 0 disables it, null
    # takes whole videos and scores them as `lmrc eval` does (frames 1..T-2): short clips miss late drift
    video_frames: int | None = 30
    short_side: int = 240  # validation frames are resized to this shorter side (480: DAVIS's evaluation size)


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    # never trained on, from any dataset; in a file, a path to a YAML list relative to the config file
    # (configs/splits/davis2016-holdout.yaml), read when the config is loaded
    holdout: list[str] = field(default_factory=list)
    crop_size: tuple[int, int] = (384, 384)
    max_objects: int = 2
    max_gap: int = 10  # "three different frames within 10 frames" (Section III-E-2)
    # frames per training clip: 3 is the paper's sample (lmrc.model.network.LMRC.forward); more run
    # lmrc.train.clip_pass over the clip as inference runs over a video (XMem and Cutie train on 8)
    num_frames: int = 3
    # probability that a clip gets a copy of its target pasted elsewhere as unlabelled background (a look-alike
    # distractor: the global read cannot tell it from the target, the local read can)
    distractor_prob: float = 0.0
    # Optional curriculum: [[first_iteration, max_gap], ...] starting at 0; overrides max_gap.
    gap_curriculum: list[tuple[int, int]] | None = None
    max_short_side: int | None = 480  # frames are downscaled to this shorter side before cropping
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    workers: int = 1  # DataLoader worker processes per training process
    seed: int = 0


@dataclass
class ClipConfig:
    """The forward pass over a training clip (lmrc.train.clip_pass)."""

    # frames of the clip added to the global memory (from their predictions) every k frames, as at inference;
    # null: frame 0 only (the paper's 3-frame sample)
    mem_every: int | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 1e-7
    schedule: str = "constant"  # constant | step | cosine
    warmup_iterations: int = 0  # linear ramp from 0 to lr
    hold_until: int = 0  # "cosine": the lr stays at its peak until this step, then decays to the end
    step_milestones: list[float] = field(default_factory=lambda: [0.8])  # fractions of iterations ("step")
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping
    iterations: int = 200_000
    batch_size: int = 8  # EFFECTIVE batch: summed over every process
    precision: str = "auto"  # fp32 | bf16 | fp16 (CUDA only) | auto (lmrc.train.trainer.autocast_dtype says which)
    frozen: list[str] = field(default_factory=list)  # parameter-name prefixes kept fixed, e.g. key_encoder.trunk.stem


@dataclass
class LossConfig:
    ce: str = "plain"  # plain | balanced | bootstrapped
    plain_ce_iterations: int = 0  # plain CE before switching to `ce` (STCN warms up bootstrapping this way)
    beta: float = 1e-4  # weight of the scale loss, eq. (11)
    scale_loss_iterations: int = 1000  # "L_scale is used until 1K iterations"


@dataclass
class LoggingConfig:
    every: int = 20  # print / TensorBoard every N iterations
    checkpoint_every: int = 500
    weights_every: int = 0  # also keep weights/step-NNNNNN.safetensors every N iterations (ablations compare equal steps)
    val_every: int = 2000  # 0 disables validation during training (it still runs at the end)
    tensorboard: bool = True
    progress_bar: bool | None = None  # None: only when stderr is a terminal


@dataclass
class InitConfig:
    pretrained_backbone: bool = True  # ImageNet encoders where lmrc ships them (lmrc-lite)
    stcn: str | None = None  # STCN .pth: initialises the encoders of lmrc-r50 (the paper's init)
    weights: str | None = None  # an lmrc .safetensors to start from (fine-tuning)
    # lmrc .safetensors of a setting with fewer reads (e.g. A for F): the paper starts LMRC from STCN, a GMR-only net
    grow_from: str | None = None
    # lmrc .safetensors of any setting or layout: tensors matching by name and shape are copied (the decoder's
    # readout projections read by read), the others start fresh and are listed in the log
    transfer_from: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init: InitConfig = field(default_factory=InitConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    seed: int = 0  # model initialisation and torch RNG


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of `path` with its ``base:`` chain resolved (base first, this file over it)."""
    path = Path(path).resolve()
    if path in _seen:
        raise LmrcError(f"config {path}: 'base' chain loops back to itself; remove the cycle")
    data = load_yaml(path)
    _read_holdout_file(data, path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise LmrcError(f"config {path}: 'base' must be a file name, got {base!r}")
    base_path = (path.parent / base)
    if not base_path.is_file():
        raise LmrcError(f"config {path}: base file {base_path} not found; 'base' is relative to the config file")
    return _merge(read_config_dict(base_path, _seen + (path,)), data)


def _read_holdout_file(data: dict[str, Any], path: Path) -> None:
    """data.holdout given as a file name: replace it with the file's list (so a run's config.yaml is explicit)."""
    section = data.get("data")
    if not isinstance(section, dict) or not isinstance(section.get("holdout"), str):
        return
    split = path.parent / section["holdout"]
    if not split.is_file():
        raise LmrcError(f"config {path}: data.holdout file {split} not found; it is relative to the config file")
    names = load_yaml_list(split)
    section["holdout"] = names


def load_yaml_list(path: Path) -> list[str]:
    import yaml

    try:
        names = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LmrcError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LmrcError(f"{path} must be a YAML list of sequence names (one '- name' a line)")
    return names


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    data = dict(data)
    # Nested lists of dataclasses are not handled by lmrc.config.from_dict: build the dataset specs here.
    data_section = dict(data.get("data") or {})
    if not isinstance(data_section, dict):
        raise LmrcError(f"{where}: 'data' must be a mapping")
    specs = data_section.get("datasets") or []
    if not isinstance(specs, list):
        raise LmrcError(f"{where}: data.datasets must be a list of {{kind, root, weight}} mappings")
    data_section["datasets"] = [
        s if isinstance(s, DatasetSpec) else from_dict(DatasetSpec, s, f"{where}: data.datasets[{i}]")
        for i, s in enumerate(specs)
    ]
    if data_section.get("gap_curriculum") is not None:
        data_section["gap_curriculum"] = [tuple(int(v) for v in step) for step in data_section["gap_curriculum"]]
    data["data"] = data_section
    cfg = _build(data, where)
    validate(cfg, where)
    return cfg


def _build(data: dict[str, Any], where: str) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise LmrcError(f"{where}: unknown key(s) {', '.join(unknown)}; valid top-level keys are {', '.join(sorted(fields))}")
    sections = {}
    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig), ("loss", LossConfig),
                      ("logging", LoggingConfig), ("init", InitConfig), ("clip", ClipConfig)):
        value = data.get(name)
        if value is not None and not isinstance(value, dict):
            raise LmrcError(f"{where}: '{name}' must be a mapping of keys to values")
        if name == "data":
            datasets = (value or {}).get("datasets", [])
            rest = {k: v for k, v in (value or {}).items() if k != "datasets"}
            built = from_dict(DataConfig, rest, f"{where}: data")
            built.datasets = list(datasets)
            built.crop_size = tuple(built.crop_size)
            sections[name] = built
        else:
            sections[name] = from_dict(cls, value, f"{where}: {name}")
    return TrainConfig(**sections, seed=int(data.get("seed", 0)))


def validate(cfg: TrainConfig, where: str = "config") -> None:
    o, d, l = cfg.optim, cfg.data, cfg.loss
    if o.precision not in PRECISIONS:
        raise LmrcError(f"{where}: optim.precision {o.precision!r} is not one of {', '.join(PRECISIONS)}")
    if o.schedule not in SCHEDULES:
        raise LmrcError(f"{where}: optim.schedule {o.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if l.ce not in CE_KINDS:
        raise LmrcError(f"{where}: loss.ce {l.ce!r} is not one of {', '.join(CE_KINDS)}")
    if o.iterations < 1 or o.batch_size < 1:
        raise LmrcError(f"{where}: optim.iterations and optim.batch_size must be >= 1")
    if len(d.crop_size) != 2 or any(int(s) % 16 for s in d.crop_size):
        raise LmrcError(f"{where}: data.crop_size {list(d.crop_size)} must be two multiples of 16 (the network's stride)")
    if not d.datasets:
        raise LmrcError(f"{where}: data.datasets is empty; list at least one {{kind, root}} source")
    for i, spec in enumerate(d.datasets):
        if not spec.root:
            raise LmrcError(f"{where}: data.datasets[{i}] has no root; set it to the dataset folder")
    if d.max_objects < 1:
        raise LmrcError(f"{where}: data.max_objects must be >= 1")
    from lmrc.data.datasets import IMAGE_READERS, READERS

    kinds = (*READERS, *IMAGE_READERS)
    for i, spec in enumerate(d.datasets):
        if spec.kind not in kinds:
            raise LmrcError(f"{where}: data.datasets[{i}].kind {spec.kind!r} is not one of {', '.join(kinds)}")
    if isinstance(d.holdout, str):
        raise LmrcError(f"{where}: data.holdout names a file ({d.holdout}); files are read by load_config, relative "
                        "to the config file; pass a list of sequence names here")
    if d.num_frames < 3:
        raise LmrcError(f"{where}: data.num_frames must be >= 3 (a global, a local and a query frame)")
    if d.max_gap < d.num_frames - 1 or any(g < d.num_frames - 1 for _, g in d.gap_curriculum or []):
        raise LmrcError(f"{where}: data.max_gap (and every gap_curriculum gap) must be >= num_frames - 1 = "
                        f"{d.num_frames - 1} to hold {d.num_frames} different frames")
    if not 0.0 <= d.distractor_prob <= 1.0:
        raise LmrcError(f"{where}: data.distractor_prob must be in [0, 1]")
    if cfg.clip.mem_every is not None and cfg.clip.mem_every < 1:
        raise LmrcError(f"{where}: clip.mem_every must be >= 1 or null (frame 0 only)")
    if d.synthetic.paste_weight > 0 and d.max_objects < 2:
        raise LmrcError(f"{where}: data.synthetic.paste_weight needs data.max_objects >= 2 (pasted clips have 2 objects)")
    if d.validation.video_frames is not None and d.validation.video_frames < 0:
        raise LmrcError(f"{where}: data.validation.video_frames must be >= 0 (0 turns video validation off) or null "
                        "(whole videos)")
    if sum(bool(x) for x in (cfg.init.weights, cfg.init.grow_from, cfg.init.transfer_from)) > 1:
        raise LmrcError(f"{where}: set one of init.weights (same setting), init.grow_from (a smaller setting) or "
                        "init.transfer_from (whatever matches), not both")
    for name in ("every", "checkpoint_every"):
        if getattr(cfg.logging, name) < 1:
            raise LmrcError(f"{where}: logging.{name} must be >= 1")


def load_config(path: str | Path) -> TrainConfig:
    return config_from_dict(read_config_dict(path), where=f"config {path}")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return to_dict(cfg)


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out
