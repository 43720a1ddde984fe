"""Weights: safetensors files that carry their config and a hash; STCN checkpoints for the encoders of lmrc-r50."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmrc.config import MODEL_PRESETS, ModelConfig, from_dict, to_dict
from lmrc.utils.errors import LmrcError
from lmrc.fileio import atomic_path

FORMAT = "lmrc-weights-1"
# Keys older files store in their config that are not part of the model (the global read's top-k is an inference
# choice, `InferenceConfig.top_k`): ignored when reading a file.
RETIRED_CONFIG_KEYS = {"global_read_top_k"}
# Files written before the value encoder became a config choice hold the first one (image and masks, 3x3 fusion).
LEGACY_CONFIG_DEFAULTS = {"value_trunk": "image_and_mask", "value_fusion_kernel": 3}
_REPO_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


# --- lmrc weights (safetensors) ------------------------------------------------------------------------------

def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: identifies the weights, not the file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_name_of(config: ModelConfig) -> str:
    for name, preset in MODEL_PRESETS.items():
        if preset.backbone == config.backbone:
            return name
    return config.backbone


def save_weights(model: torch.nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> str:
    """Write the model's state dict as safetensors with its config and hash in the metadata; returns the hash."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = tensors_digest(state)
    metadata = {
        "format": FORMAT,
        "model": model_name_of(model.config),
        "config": json.dumps(to_dict(model.config), sort_keys=True),
        "sha256": digest,
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return digest


def read_weights_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LmrcError(f"weights file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise LmrcError(
            f"weights file {path} is not a safetensors file ({exc}); lmrc weights are .safetensors files "
            "written by `lmrc train` (an STCN .pth goes through lmrc.model.weights.load_stcn_checkpoint)"
        ) from None
    if meta.get("format") != FORMAT:
        raise LmrcError(f"weights file {path} was not written by lmrc (no '{FORMAT}' metadata); train or export it with lmrc")
    return meta


def weights_config(path: str | Path, meta: dict[str, Any] | None = None) -> ModelConfig:
    """The config stored with the weights (keys of RETIRED_CONFIG_KEYS ignored, LEGACY_CONFIG_DEFAULTS for keys older
    files lack)."""
    meta = read_weights_metadata(path) if meta is None else meta
    stored = {k: v for k, v in json.loads(meta["config"]).items() if k not in RETIRED_CONFIG_KEYS}
    stored = {**LEGACY_CONFIG_DEFAULTS, **stored}
    return from_dict(ModelConfig, stored, where=f"config stored in {path}")


def load_weights(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load lmrc weights into `model`, refusing weights made for another size or setting; returns the metadata."""
    meta = read_weights_metadata(path)
    stored = weights_config(path, meta)
    mine = to_dict(model.config)
    differ = {k: (v, mine[k]) for k, v in to_dict(stored).items() if mine[k] != v}
    if differ:
        detail = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in differ.items())
        raise LmrcError(
            f"weights file {path} belongs to {meta.get('model')} setting {stored.setting}, not to this "
            f"{model_name_of(model.config)} setting {model.config.setting} ({detail}); "
            f"use --model {meta.get('model')} or the weights of the model you chose"
        )
    model.load_state_dict(_verified_tensors(path, meta))
    return meta


def _verified_tensors(path: str | Path, meta: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of a weights file, checked against the hash in its metadata."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if tensors_digest(state) != meta["sha256"]:
        raise LmrcError(f"weights file {path} is corrupt (its hash does not match its metadata); download or export it again")
    return state


def grow_weights(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Start `model` from the weights of a setting with fewer reads (e.g. A -> F), as the paper starts LMRC from STCN.

    Shared tensors are copied. The decoder's readout projections get zero columns for the new reads, so the grown
    network computes exactly what the smaller one did until training teaches it to use them.
    """
    from lmrc.model.readouts import readout_layout, stage_readouts

    meta = read_weights_metadata(path)
    stored = weights_config(path, meta)
    mine = model.config
    mine_dict = to_dict(mine)
    differ = [k for k, v in to_dict(stored).items() if k != "setting" and mine_dict[k] != v]
    old_layout, new_layout = readout_layout(stored), readout_layout(mine)
    stages = sorted({readout.stage for readout in new_layout})
    old = {r: stage_readouts(old_layout, r) for r in stages}
    # the stored reads must come first at every decoder stage (always so when they are a subset: G4, then L, then S)
    prefix = all(stage_readouts(new_layout, r)[:len(old[r])] == old[r] for r in stages) and (
        mine.memory_comparator or not stored.memory_comparator)
    if differ or not prefix:
        raise LmrcError(
            f"cannot grow {model_name_of(mine)} setting {mine.setting} from {path} ({meta.get('model')} setting "
            f"{stored.setting}): the file must be the same model size with a subset of the reads"
            + (f"; these differ: {', '.join(differ)}" if differ else "")
        )
    state = _verified_tensors(path, meta)
    target = model.state_dict()
    value_dims = dict(zip((2, 3, 4), mine.value_dims))
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in target:
                raise LmrcError(f"weights file {path} has a tensor {name} that setting {mine.setting} lacks; "
                                "is it an lmrc weights file?")
            if not name.endswith(".readout_conv.weight"):
                target[name].copy_(tensor)
        for r in stages:  # readout projections: the smaller setting's columns first, zero for the new reads
            name, used = f"decoder.stage{r}.readout_conv.weight", value_dims[r] * len(old[r])
            if name in target:
                target[name].zero_()
                if used:
                    target[name][:, :used] = state[name]
    return meta


def default_weights_path(name: str) -> Path | None:
    """Shipped weights: $LMRC_WEIGHTS_DIR, then the repository's weights/ folder."""
    for folder in (os.environ.get("LMRC_WEIGHTS_DIR"), _REPO_WEIGHTS):
        if folder and (Path(folder) / f"{name}.safetensors").is_file():
            return Path(folder) / f"{name}.safetensors"
    return None


def load_model(
    name: str = "lmrc-lite",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A ready-to-run model in eval mode: `name`'s shipped weights, or the given weights file.

    The config (including the ablation setting) comes from the weights file, so it always matches them.
    Never returns a model with random weights.
    """
    from lmrc.model.network import LMRC

    if name not in MODEL_PRESETS:
        raise LmrcError(f"unknown model {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    path = Path(weights) if weights is not None else default_weights_path(name)
    if path is None:
        hint = (
            "train them with `lmrc train --config configs/lmrc-lite-davis2016.yaml`"
            if name == "lmrc-lite"
            else "train them (configs/lmrc-r50-paper.yaml) starting from an STCN checkpoint"
        )
        raise LmrcError(f"no weights for {name}: pass --weights FILE.safetensors, or {hint}")
    config = weights_config(path)
    if config.backbone != MODEL_PRESETS[name].backbone:
        stored = model_name_of(config)
        raise LmrcError(f"weights file {path} is for {stored}, not {name}; use --model {stored}")
    model = LMRC(config, pretrained_backbone=False)
    load_weights(model, path)
    return model.to(device).eval()


# --- STCN checkpoints ------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """Which checkpoint keys were used, which model keys stayed new, which checkpoint keys were ignored."""

    used: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"STCN checkpoint: {len(self.used)} tensors used, {len(self.new)} new in LMRC, {len(self.ignored)} ignored"


def _stcn_target(key: str) -> str | None:
    """Our parameter name for an STCN key, or None when LMRC has no counterpart (STCN's fuser, key_comp, decoder)."""
    if key.startswith("key_encoder."):
        rest = key[len("key_encoder."):].replace("res2.", "layer1.", 1) if key.startswith("key_encoder.res2.") else key[len("key_encoder."):]
        return "key_encoder.trunk." + rest
    if key.startswith("key_proj.key_proj."):
        return "key_encoder.key_proj.r4." + key[len("key_proj.key_proj."):]  # STCN's key projection is the stage-4 one
    if key.startswith("value_encoder.") and not key.startswith("value_encoder.fuser."):
        return "value_encoder.trunk." + key[len("value_encoder."):]
    return None


def load_stcn_checkpoint(model: torch.nn.Module, checkpoint: str | Path | dict[str, Tensor]) -> LoadReport:
    """Initialise lmrc-r50's encoders from an STCN state dict (Section III-E-2), as the paper does."""
    if model.config.backbone != "resnet50":
        raise LmrcError("STCN checkpoints fit lmrc-r50 only (ResNet50/ResNet18 encoders), not lmrc-lite")
    where = "the given state dict"
    if not isinstance(checkpoint, dict):
        where = str(checkpoint)
        path = Path(checkpoint)
        if not path.is_file():
            raise LmrcError(f"STCN checkpoint {path} not found")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LmrcError(f"STCN checkpoint {path} cannot be read safely ({exc}); it must be a plain state dict (stcn.pth)") from None
        if isinstance(checkpoint, dict) and "network" in checkpoint and isinstance(checkpoint["network"], dict):
            checkpoint = checkpoint["network"]  # STCN's training checkpoints wrap the state dict
    if not isinstance(checkpoint, dict) or not any(str(k).startswith("key_encoder.res2.") for k in checkpoint):
        raise LmrcError(
            f"{where} does not have STCN's layout (keys key_encoder.res2.*, value_encoder.*, key_proj.key_proj.*); "
            "pass the stcn.pth state dict"
        )
    own = model.state_dict()
    report = LoadReport()
    updates: dict[str, Tensor] = {}
    mismatched = []
    for key, value in checkpoint.items():
        target = _stcn_target(key)
        if target is None or target not in own:
            report.ignored.append(key)
            continue
        if target == "value_encoder.trunk.conv1.weight" and value.shape[1] == 4:
            value = torch.cat([value, value.new_zeros(value.shape[0], 1, *value.shape[2:])], 1)  # single-object stage
        if tuple(value.shape) != tuple(own[target].shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {target} {tuple(own[target].shape)}")
            continue
        updates[target] = value
        report.used.append(key)
    if mismatched:
        raise LmrcError(
            f"{where} has STCN key names but shapes that do not fit lmrc-r50 ({len(mismatched)} tensors, e.g. "
            f"{'; '.join(mismatched[:3])}); it is not an STCN (ResNet50) checkpoint"
        )
    if not report.used:
        raise LmrcError(f"{where} shares no tensor with lmrc-r50; it is not an STCN checkpoint")
    own.update(updates)
    model.load_state_dict(own)
    report.new = sorted(set(own) - set(updates))
    return report
