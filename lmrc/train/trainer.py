"""The training recipe of Section III-E: Adam, eq. (11) loss, frozen BN statistics, clipping, mixed precision,
resumable checkpoints, validation on held-out sequences, one process or many (DistributedDataParallel).

Data order: iteration ``s`` consumes the global sample indices ``[s*B, (s+1)*B)`` (B = effective batch), each a
pure function of its index (``lmrc.data``), so resuming at step ``s`` only needs ``s``; with P processes rank r
takes the indices ``i % P == r`` of that range (B / P each), so the union is the same global batch.
"""
from __future__ import annotations

import copy
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn

from lmrc.config import ABLATION_SETTINGS
from lmrc.utils.device import choose_precision, half_precision_warning
from lmrc.utils.errors import LmrcError
from lmrc.fileio import atomic_path
from lmrc.train.config import TrainConfig, config_differences, config_to_dict
from lmrc.train.clip_pass import ClipRunner, clip_forward
from lmrc.train.losses import lmrc_loss

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "lmrc-train-checkpoint-1"


# ------------------------------------------------------------------------------------------------ process setup

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> Dist:
    """Join the process group torchrun describes (env RANK/WORLD_SIZE); a plain single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local)


def resolve_device(name: str, d: Dist) -> torch.device:
    """`lmrc.utils.device.choose_device`, with "cuda" meaning this process' GPU (its local rank)."""
    from lmrc.utils.device import choose_device

    device = choose_device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device


def training_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why) for `optim.precision`: the choice inference makes
    (`lmrc.utils.device.choose_precision`: bf16 where the hardware computes it natively); fp16 needs CUDA (and a
    GradScaler). benchmarks/train_step.py on this project's AVX512_BF16 EPYC: 8-frame steps 1.46x faster in bf16."""
    if precision == "fp16" and device.type != "cuda":
        raise LmrcError("optim.precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    choice = choose_precision(precision, device)
    reason = choice.reason if precision == "auto" else "config"
    warning = half_precision_warning(choice.name) if device.type == "cpu" else None
    return choice.autocast_dtype, f"{choice.name} ({reason})" + (f"; {warning}" if warning else "")


# ------------------------------------------------------------------------------------------------ model pieces

def freeze_batchnorm(model: nn.Module) -> None:
    """BN layers use (and keep) their running statistics while the rest trains; their affine weights still learn.

    Batches of 4-8 crops give noisy statistics, so STCN freezes them; call after every ``model.train()``.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def set_train_mode(model: nn.Module) -> None:
    model.train()
    freeze_batchnorm(model)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of optim.lr at `step` (0-based): linear warmup, then constant / step / cosine (after a hold)."""
    o = cfg.optim
    if o.warmup_iterations > 0 and step < o.warmup_iterations:
        return (step + 1) / o.warmup_iterations
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "step":
        passed = sum(step >= int(round(m * o.iterations)) for m in o.step_milestones)
        return o.step_gamma ** passed
    start = max(o.warmup_iterations, o.hold_until)
    span = max(1, o.iterations - start)
    t = min(1.0, max(0.0, (step - start) / span))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def ids_from_masks(masks: Tensor) -> Tensor:
    """B x N x H x W {0,1} object masks -> B x H x W ids (0 = background, k+1 = slot k)."""
    background = torch.full_like(masks[:, :1], 0.5)
    return torch.cat([background, masks], 1).argmax(1)


def training_loss(out, masks: Tensor, step: int, cfg: TrainConfig) -> tuple[Tensor, dict[str, float]]:
    """Eq. (11): CE on every predicted frame + beta * L_scale (first K iterations). `out` is a
    ``lmrc.train.clip_pass.ClipOutput`` (frames 1..T-1) or the network's 3-frame ``TrainingOutput``.

    Over a clip of T frames the CE sum is scaled by 2 / (T - 1): each clip weighs as the paper's two predicted
    frames, so the learning rate, beta and the gradient clipping keep their meaning whatever T is."""
    frames = out.outputs if hasattr(out, "outputs") else [out.local_frame, out.query_frame]
    targets = [ids_from_masks(masks[:, i + 1]) for i in range(len(frames))]
    kind = cfg.loss.ce if step >= cfg.loss.plain_ce_iterations else "plain"
    keys = out.query_keys if step < cfg.loss.scale_loss_iterations else None
    logits = [f.agg_logits for f in frames]
    if len(frames) == 2:
        return lmrc_loss(logits, targets, keys, cfg.loss.beta, kind)
    return lmrc_loss(logits, targets, keys, cfg.loss.beta, kind, ce_weight=2 / len(frames))


def build_model(cfg: TrainConfig, log) -> nn.Module:
    from lmrc.model.network import LMRC

    torch.manual_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's)
    model = LMRC(cfg.model, pretrained_backbone=cfg.init.pretrained_backbone)
    if cfg.init.stcn:
        from lmrc.model.weights import load_stcn_checkpoint

        if not Path(cfg.init.stcn).is_file():
            raise LmrcError(f"init.stcn checkpoint {cfg.init.stcn} not found; download STCN's stcn.pth or remove init.stcn")
        report = load_stcn_checkpoint(model, cfg.init.stcn)
        log(f"init from STCN {cfg.init.stcn}: {report.summary()}")
    if cfg.init.weights:
        from lmrc.model.weights import load_weights

        load_weights(model, cfg.init.weights)
        log(f"init from lmrc weights {cfg.init.weights}")
    if cfg.init.grow_from:
        from lmrc.model.weights import grow_weights

        if not Path(cfg.init.grow_from).is_file():
            raise LmrcError(f"init.grow_from weights {cfg.init.grow_from} not found; train the smaller setting first")
        meta = grow_weights(model, cfg.init.grow_from)
        log(f"init grown from {meta.get('model')} weights {cfg.init.grow_from} (new reads start switched off)")
    if cfg.init.transfer_from:
        from lmrc.train.transfer import transfer_weights

        report = transfer_weights(model, cfg.init.transfer_from)
        log(f"init from {cfg.init.transfer_from} (what matches): {report.summary()}")
    freeze_parameters(model, cfg.optim.frozen, log)
    return model


def freeze_parameters(model: nn.Module, prefixes: list[str], log=lambda msg: None) -> int:
    """Keep parameters whose names start with one of `prefixes` (at a '.' boundary) fixed; returns how many.

    A prefix that names no parameter is an error: a typo must not silently train everything.
    """
    names = [name for name, _ in model.named_parameters()]
    frozen = 0
    for prefix in prefixes:
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            raise LmrcError(f"optim.frozen: {prefix!r} names no parameter of the model (e.g. key_encoder.trunk.stem)")
        for name in matched:
            model.get_parameter(name).requires_grad_(False)
        frozen += sum(model.get_parameter(n).numel() for n in matched)
    if prefixes:
        log(f"frozen: {frozen / 1e6:.2f}M parameters under {', '.join(prefixes)}")
    return frozen


# ------------------------------------------------------------------------------------------------ data

def read_training_sequences(cfg: TrainConfig) -> list[list]:
    """Per dataset in data.datasets: its sequences (or, for image kinds, its (image, mask) pairs), held-out ones
    removed (LmrcError on a bad path/layout). Videos of kind video_masks are decoded into the frame cache here,
    once, before any worker starts."""
    from lmrc.data.datasets import IMAGE_READERS, read_dataset

    out = []
    for spec in cfg.data.datasets:
        options: dict[str, Any] = {"exclude": sorted(set(cfg.data.holdout) | set(spec.exclude))}
        if spec.kind in IMAGE_READERS:
            out.append(IMAGE_READERS[spec.kind](spec.root, **options))
            continue
        if spec.kind in ("davis2016", "davis2017"):
            options["split"] = spec.split
        out.append(read_dataset(spec.kind, spec.root, **options))
    return out


def build_training_data(cfg: TrainConfig, sequences: list[list], total: int):
    """One Dataset over the global sample stream: real sources and synthetic ones mixed by weight."""
    from lmrc.data.datasets import IMAGE_READERS, MixedDataset, VOSTrainingDataset
    from lmrc.data.synthetic import PastedObjectClips, StaticImageClips, annotated_frames

    d = cfg.data
    gap = [tuple(s) for s in d.gap_curriculum] if d.gap_curriculum else d.max_gap
    common = dict(crop_size=tuple(d.crop_size), max_objects=d.max_objects, max_short_side=d.max_short_side,
                  length=total, num_frames=d.num_frames)
    sources, weights = [], []
    for k, (spec, seqs) in enumerate(zip(d.datasets, sequences)):
        if spec.kind in IMAGE_READERS:  # single images: STCN's static stage, each image a warped pseudo-video
            sources.append(StaticImageClips(seqs, seed=d.seed + 101 * k, name=spec.kind,
                                            distractor_prob=d.distractor_prob, **common))
        else:
            sources.append(VOSTrainingDataset(seqs, max_gap=gap, seed=d.seed + 101 * k,
                                              batch_size=cfg.optim.batch_size, name=spec.kind,
                                              distractor_prob=d.distractor_prob, **common))
        weights.append(spec.weight)
    everything = [s for spec, seqs in zip(d.datasets, sequences) if spec.kind not in IMAGE_READERS for s in seqs]
    syn = d.synthetic
    if syn.static_weight > 0:
        sources.append(StaticImageClips(annotated_frames(everything, syn.static_stride), seed=d.seed + 7,
                                        distractor_prob=d.distractor_prob, **common))
        weights.append(syn.static_weight)
    if syn.paste_weight > 0:
        sources.append(PastedObjectClips(everything, max_gap=gap, seed=d.seed + 13, batch_size=cfg.optim.batch_size,
                                         **common))
        weights.append(syn.paste_weight)
    if len(sources) == 1:
        return sources[0]
    return MixedDataset(sources, weights, length=total, seed=d.seed + 1)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding/augmenting in a worker must not fight the training threads
    # Ctrl-C, and schedulers' SIGTERM, reach the whole process group: the worker must live on so the main
    # process can finish its step and checkpoint (it ends the workers itself).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, total: int, start: int, per_process: int, d: Dist, workers: int):
    from torch.utils.data import DataLoader

    from lmrc.data.sampling import TrainingIndexSampler

    sampler = TrainingIndexSampler(total, start=start, rank=d.rank, world_size=d.world_size)
    return DataLoader(dataset, batch_size=per_process, sampler=sampler, num_workers=workers,
                      worker_init_fn=_worker_init if workers else None, persistent_workers=False,
                      prefetch_factor=2 if workers else None, drop_last=True)


# ------------------------------------------------------------------------------------------------ checkpoints

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, step: int, cfg: TrainConfig,
                    best: float | None) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "data_position": step * cfg.optim.batch_size,  # next global sample index
        "config": config_to_dict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "best": best,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def export_checkpoint_weights(cfg: TrainConfig, out: Path, path: Path) -> tuple[int, str]:
    """Write the model of run `out`'s checkpoint as lmrc weights (safetensors); returns (step, sha256)."""
    from lmrc.model.network import LMRC
    from lmrc.model.weights import save_weights

    payload = load_checkpoint(out / CHECKPOINT_NAME, cfg)
    model = LMRC(cfg.model, pretrained_backbone=False)
    model.load_state_dict(payload["model"])
    step = int(payload["step"])
    return step, save_weights(model, path, extra={"step": step, "run": str(out)})


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise LmrcError(f"no checkpoint {path}; start without --resume or point --out at the run folder")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises many types
        raise LmrcError(f"checkpoint {path} cannot be read ({exc}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise LmrcError(f"{path} is not an lmrc training checkpoint; delete it or choose another --out")
    # Logging cadence, validation, the run length and where its decay starts may change on resume (a run cut short
    # or extended); anything else changes what is trained.
    # Options added after a run started are absent from its stored config: they had their defaults then.
    stored = _fill_defaults(copy.deepcopy(payload["config"]), config_to_dict(TrainConfig()))
    current = config_to_dict(cfg)
    for c in (stored, current):
        c.pop("logging", None)
        c.get("optim", {}).pop("iterations", None)
        c.get("optim", {}).pop("hold_until", None)
        c.get("data", {}).pop("validation", None)
    differ = config_differences(stored, current)
    if differ:
        raise LmrcError(f"checkpoint {path} was written with another config (differs in {', '.join(differ)}); "
                        "resume with the config of that run (saved as config.yaml beside it) or use another --out")
    return payload


def _fill_defaults(stored: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    for key, value in defaults.items():
        if key not in stored:
            stored[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(stored[key], dict):
            _fill_defaults(stored[key], value)
    return stored


# ------------------------------------------------------------------------------------------------ validation

@dataclass
class Validation:
    triplets: list[dict] = field(default_factory=list)
    sequences: list = field(default_factory=list)


def build_validation(cfg: TrainConfig) -> Validation:
    """Fixed held-out triplets (plain resize, no augmentation) and the held-out sequences themselves."""
    from lmrc.data.augment import ClipAugment
    from lmrc.data.datasets import VOSTrainingDataset, read_dataset

    v = cfg.data.validation
    names = v.sequences if v.sequences is not None else cfg.data.holdout
    if not names:
        return Validation()
    first = cfg.data.datasets[0]
    kind, root = v.kind or first.kind, v.root or first.root
    options: dict[str, Any] = {"include": names}
    if kind in ("davis2016", "davis2017"):
        options["split"] = v.split
    seqs = read_dataset(kind, root, **options)
    triplets = []
    if v.triplets_per_sequence > 0:
        ds = VOSTrainingDataset(seqs, max_gap=cfg.data.max_gap, max_objects=cfg.data.max_objects, seed=12345,
                                augment=ClipAugment(crop_size=tuple(cfg.data.crop_size), enabled=False),
                                max_short_side=cfg.data.max_short_side)
        triplets = [ds[i] for i in range(len(seqs) * v.triplets_per_sequence)]
    return Validation(triplets, seqs)


def _mean_j(pred_ids: Tensor, gt_ids: Tensor, valid: Tensor) -> list[float]:
    out = []
    for k in range(valid.shape[-1]):
        if not bool(valid[k]):
            continue
        p, g = pred_ids == k + 1, gt_ids == k + 1
        union = (p | g).sum().item()
        out.append(1.0 if union == 0 else (p & g).sum().item() / union)
    return out


@torch.no_grad()
def validate(model: nn.Module, val: Validation, cfg: TrainConfig, device: torch.device,
             amp: torch.dtype | None, log) -> dict[str, float]:
    """Loss and J (query frame) on the held-out triplets, and J&F of streaming segmentation of the held-out videos.
    Leaves the model in train mode with frozen BN."""
    model.eval()
    results: dict[str, float] = {}
    try:
        if val.triplets:
            losses, js = [], []
            for sample in val.triplets:
                images = sample["images"][None].to(device)
                masks = sample["masks"][None].to(device)
                valid = sample["valid_objects"][None].to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    out = clip_forward(model, images, masks[:, 0], valid, mem_every=cfg.clip.mem_every)
                # The loss as it stands after the warm-ups: no scale term, the configured CE kind.
                loss, _ = training_loss(out, masks, max(cfg.loss.scale_loss_iterations, cfg.loss.plain_ce_iterations), cfg)
                losses.append(float(loss))
                js += _mean_j(out.outputs[-1].probs.max(1).indices[0].cpu(), ids_from_masks(masks[:, -1])[0].cpu(),
                              sample["valid_objects"])
            results["val/loss"] = float(np.mean(losses))
            results["val/J_triplets"] = float(np.mean(js)) if js else 0.0
        if val.sequences and cfg.data.validation.video_frames != 0:
            results.update(validate_videos(model, val.sequences, cfg, device))
    finally:
        set_train_mode(model)
    return results


def validate_videos(model: nn.Module, sequences, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """J, F and J&F of the held-out videos segmented with lmrc.inference.Segmenter, aggregated as `lmrc eval` does.
    Whole videos score frames 1..T-2 like `lmrc eval`; clips score 1..T-1."""
    from lmrc.data.datasets import load_image
    from lmrc.data.masks import read_mask
    from lmrc.eval.davis import Evaluation, ObjectScores
    from lmrc.eval.metrics import score_objects
    from lmrc.inference.segmenter import Segmenter

    v = cfg.data.validation
    # one inference copy of the model for every video (fp32: validation scores stay comparable across machines)
    segmenter = Segmenter(model, size=v.short_side, device=device, precision="fp32")
    objects = []
    for seq in sequences:
        if 0 not in seq.masks:
            continue
        whole = v.video_frames is None or v.video_frames >= len(seq.frames)
        count = len(seq.frames) if v.video_frames is None else min(len(seq.frames), v.video_frames)
        scored = [t for t in range(1, count - 1 if whole else count) if t in seq.masks]
        if not scored:
            continue
        segmenter.reset()
        first = read_mask(seq.masks[0])
        preds, gts = [], []
        for t in range(scored[-1] + 1):
            probs = segmenter.step(load_image(seq.frames[t]), first if t == 0 else None)
            if t in scored:
                preds.append(segmenter.probs_to_ids(probs))
                gts.append(read_mask(seq.masks[t]))
        pred, gt = np.stack(preds), np.stack(gts)
        for k in (int(i) for i in np.unique(first) if i != 0):
            j, f = score_objects((gt == k).astype(np.uint8), (pred == k).astype(np.uint8), 1)
            objects.append(ObjectScores(seq.name, k, j[0], f[0]))
    if not objects:
        return {}
    scores = Evaluation("validation", 0, objects, sum(len(o.j) for o in objects)).global_scores()
    return {"val/J": scores["J-Mean"], "val/F": scores["F-Mean"], "val/JF": scores["J&F-Mean"]}


# ------------------------------------------------------------------------------------------------ the loop

class _StopFlag:
    """SIGTERM/SIGINT ask the loop to finish the current step, checkpoint and exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread): no handler
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signal = signum


@dataclass
class RunResult:
    step: int
    stopped_by: int | None = None  # signal number when interrupted
    final_hash: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)  # the trained (unwrapped) model, every rank

    @property
    def exit_code(self) -> int:
        return 0 if self.stopped_by is None else 128 + self.stopped_by


def train(cfg: TrainConfig, out: Path, *, resume: bool = False, device_name: str = "auto",
          log_stream=None) -> RunResult:
    """Run (or resume) training into folder `out`; returns where it stopped."""
    out = Path(out)
    d = setup_distributed("cuda" if device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(device_name, d)
    stream = log_stream or sys.stdout

    def log(msg: str) -> None:
        if d.is_main:
            from tqdm import tqdm

            tqdm.write(f"[lmrc train] {msg}", file=stream)
            stream.flush()

    B = cfg.optim.batch_size
    if B % d.world_size:
        raise LmrcError(f"optim.batch_size {B} (the effective batch) is not divisible by the {d.world_size} "
                        f"processes; use a multiple of {d.world_size}")
    per_process = B // d.world_size
    total_iters = cfg.optim.iterations
    checkpoint_path = out / CHECKPOINT_NAME
    if not resume and checkpoint_path.exists():
        raise LmrcError(f"{out} already holds a training checkpoint; pass --resume to continue it or choose another --out")

    # Read data first: a wrong path should fail before minutes of model building.
    sequences = read_training_sequences(cfg)
    dataset = build_training_data(cfg, sequences, total_iters * B)
    val = build_validation(cfg) if d.is_main else Validation()

    model = build_model(cfg, log).to(device)
    amp, precision_reason = training_precision(cfg.optim.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))

    step, best = 0, None
    if resume:
        payload = load_checkpoint(checkpoint_path, cfg)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        step, best = int(payload["step"]), payload.get("best")
        log(f"resumed {checkpoint_path} at step {step}")
    elif d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    set_train_mode(model)
    # The clip's forward pass (lmrc.train.clip_pass); 3 frames and no extra global frames = LMRC.forward.
    net: nn.Module = ClipRunner(model, cfg.clip.mem_every)
    if d.enabled:
        # Settings A and B leave the values of stages 2/3 unread, so their parameters get no gradient.
        unused = not set(ABLATION_SETTINGS["C"]["local_read_stages"]) <= set(cfg.model.local_read_stages)
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)

    writer = None
    if d.is_main and cfg.logging.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=step if resume else None)
        except ImportError:
            log("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")

    stop = _StopFlag()
    stop.install()
    result = RunResult(step, model=model)
    loader = make_loader(dataset, total_iters * B, step * B, per_process, d, cfg.data.workers)
    show_bar = cfg.logging.progress_bar if cfg.logging.progress_bar is not None else sys.stderr.isatty()
    from tqdm import tqdm

    bar = tqdm(total=total_iters, initial=step, disable=not (d.is_main and show_bar), dynamic_ncols=True,
               desc="train", file=sys.stderr)
    log(f"{'resuming' if resume else 'training'} {cfg.model.backbone} setting {cfg.model.setting}: "
        f"{total_iters} iterations, batch {B} ({d.world_size} x {per_process}), crop {list(cfg.data.crop_size)}, "
        f"precision {precision_reason}, device {device}, {len(dataset.datasets) if hasattr(dataset, 'datasets') else 1} source(s)")

    window_loss, window_parts, window_start, window_steps = 0.0, {}, time.perf_counter(), 0
    try:
        batches = iter(loader)
        while step < total_iters:
            batch = next(batches)
            images = batch["images"].to(device, non_blocking=True)
            masks = batch["masks"].to(device, non_blocking=True)
            valid = batch["valid_objects"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                output = net(images, masks[:, 0], valid)
            loss, parts = training_loss(output, masks, step, cfg)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.optim.grad_clip:
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            result.step = step

            if not math.isfinite(parts["total"]):
                raise LmrcError(f"loss became {parts['total']} at step {step}; lower optim.lr or use precision fp32 "
                                f"(resume from the last checkpoint with --resume)")
            window_loss += parts["total"]
            for k, v in parts.items():
                window_parts[k] = window_parts.get(k, 0.0) + v
            window_steps += 1
            bar.update(1)
            if step % cfg.logging.every == 0 or step == total_iters:
                now = time.perf_counter()
                rate = window_steps / max(now - window_start, 1e-9)
                means = {k: v / window_steps for k, v in window_parts.items()}
                lr = optimizer.param_groups[0]["lr"]
                eta = (total_iters - step) / max(rate, 1e-9)
                bar.set_postfix(loss=f"{means['total']:.4f}", lr=f"{lr:.2e}")
                log(f"step {step}/{total_iters} loss {means['total']:.4f} (ce {means['ce']:.4f}"
                    + (f", scale {means['scale']:.3g}" if "scale" in means else "")
                    + f") lr {lr:.2e} {rate:.3f} it/s eta {_hms(eta)}")
                if writer is not None:
                    for k, v in means.items():
                        writer.add_scalar(f"train/{k}", v, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/it_per_s", rate, step)
                window_loss, window_parts, window_start, window_steps = 0.0, {}, time.perf_counter(), 0

            if cfg.logging.val_every and step % cfg.logging.val_every == 0 and step < total_iters and d.is_main:
                best = _validate_and_keep(model, val, cfg, device, amp, log, writer, step, out, best, result)
                window_start = time.perf_counter()  # validation time is not training speed

            if d.is_main and cfg.logging.weights_every and step % cfg.logging.weights_every == 0:
                from lmrc.model.weights import save_weights

                save_weights(model, out / "weights" / f"step-{step:06d}.safetensors", extra={"step": step})
            stopping = _agree_stop(stop.signal, d, device)
            if d.is_main and (step % cfg.logging.checkpoint_every == 0 or stopping):
                save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                step=step, cfg=cfg, best=best)
            if stopping:
                result.stopped_by = stop.signal or signal.SIGTERM
                log(f"stopped by signal at step {step}; checkpoint saved to {checkpoint_path}; "
                    "continue with the same command and --resume")
                return result
        if d.is_main:
            if val.triplets or val.sequences:
                best = _validate_and_keep(model, val, cfg, device, amp, log, writer, step, out, best, result)
            save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            step=step, cfg=cfg, best=best)
            from lmrc.model.weights import save_weights

            result.final_hash = save_weights(model, out / "final.safetensors", extra={"step": step})
            log(f"done: {out / 'final.safetensors'} (sha256 {result.final_hash[:12]})")
        if d.enabled:
            dist.barrier()
        return result
    finally:
        bar.close()
        stop.restore()
        if writer is not None:
            writer.close()


def _agree_stop(signum: int | None, d: Dist, device: torch.device) -> bool:
    """Every rank must stop after the same step, or the others would hang in the next all-reduce."""
    if not d.enabled:
        return signum is not None
    flag = torch.tensor([1.0 if signum is not None else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _validate_and_keep(model, val, cfg, device, amp, log, writer, step, out, best, result):
    metrics = validate(model, val, cfg, device, amp, log)
    if not metrics:
        return best
    result.metrics = metrics
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)
    score = metrics.get("val/JF", metrics.get("val/J_triplets"))
    log(f"validation at step {step}: " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items()))
    if score is not None and (best is None or score > best):
        from lmrc.model.weights import save_weights

        save_weights(model, out / "best.safetensors", extra={"step": step, "score": score})
        log(f"new best {score:.4f}: {out / 'best.safetensors'}")
        return score
    return best


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
