"""Start a model from lmrc weights of another setting or layout: copy what matches, report what does not.

``init.grow_from`` (lmrc.model.weights.grow_weights) is strict: the same model with a subset of the reads.
``init.transfer_from`` takes any lmrc weights file of the same backbone family: tensors equal in name and shape
are copied; the decoder's readout projections are copied read by read (columns of the reads both settings have;
reads new to the model start at zero, so it first computes what the file's network computed); everything else
(e.g. a value encoder of another layout) keeps its fresh initialisation and is listed in the report. Two layout
changes of lmrc-lite's value encoder have their own rule: a k x k fusion conv made 1 x 1 starts as its sum of taps,
and the mask-only trunk's first conv starts as the first trunk's mask channels (it read image, mask, other objects).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmrc.config import ModelConfig
from lmrc.utils.errors import LmrcError

READOUT_SUFFIX = ".readout_conv.weight"
# lmrc-lite's first value trunk read (RGB image, mask, other objects); MaskValueTrunk reads (mask, other objects)
VALUE_STEM = "value_encoder.trunk.stem.0.0.weight"
IMAGE_CHANNELS = 3


@dataclass
class TransferReport:
    copied: list[str] = field(default_factory=list)
    partly: list[str] = field(default_factory=list)  # readout projections: the reads both settings have
    pointwise: list[str] = field(default_factory=list)  # k x k conv weights summed over taps into a 1 x 1 conv
    mask_inputs: list[str] = field(default_factory=list)  # the value stem: the file's mask input channels
    fresh: list[str] = field(default_factory=list)  # model tensors left as initialised (absent or other shape)
    unused: list[str] = field(default_factory=list)  # file tensors the model has no place for

    def summary(self, limit: int = 8) -> str:
        def names(items: list[str]) -> str:
            return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

        text = f"{len(self.copied)} tensors copied, {len(self.partly)} readout projections copied read by read"
        if self.pointwise:
            text += f", {len(self.pointwise)} k x k convs summed into 1 x 1 ({names(self.pointwise)})"
        if self.mask_inputs:
            text += f", {names(self.mask_inputs)} from the file's mask input channels (its image ones dropped)"
        if self.fresh:
            text += f"; {len(self.fresh)} start fresh: {names(self.fresh)}"
        if self.unused:
            text += f"; {len(self.unused)} in the file unused: {names(self.unused)}"
        return text


def transfer_weights(model: nn.Module, path: str | Path) -> TransferReport:
    """Copy the tensors of lmrc weights file `path` that fit `model` (see the module docstring)."""
    from safetensors.torch import load_file

    from lmrc.model.readouts import readout_layout, stage_readouts
    from lmrc.model.weights import model_name_of, read_weights_metadata, tensors_digest

    path = Path(path)
    if not path.is_file():
        raise LmrcError(f"init.transfer_from weights {path} not found; point it at an lmrc .safetensors file")
    meta = read_weights_metadata(path)
    stored = json.loads(meta["config"])
    if stored.get("backbone") != model.config.backbone:
        raise LmrcError(f"init.transfer_from: {path} holds {meta.get('model')} weights (backbone "
                        f"{stored.get('backbone')}), the model is {model_name_of(model.config)}; use weights of the "
                        "same model size")
    state = load_file(str(path))
    if tensors_digest(state) != meta["sha256"]:
        raise LmrcError(f"weights file {path} is corrupt (its hash does not match its metadata)")
    # Only the reads of the stored setting and its value widths matter here (fields this version does not know,
    # e.g. from a newer lmrc, are left aside).
    old_layout = readout_layout(ModelConfig(backbone=stored["backbone"], setting=stored.get("setting", "F")))
    new_layout = readout_layout(model.config)
    old_dims = dict(zip((2, 3, 4), stored.get("value_dims", model.config.value_dims)))
    new_dims = dict(zip((2, 3, 4), model.config.value_dims))

    report = TransferReport()
    target = model.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            if name not in state:
                report.fresh.append(name)
            elif name.endswith(READOUT_SUFFIX) and name.startswith("decoder.stage"):
                r = int(name[len("decoder.stage")])
                if _copy_readouts(tensor, state[name], _names(old_layout, r), _names(new_layout, r), old_dims[r], new_dims[r]):
                    report.partly.append(name)
                else:
                    report.fresh.append(f"{name} (shape {tuple(state[name].shape)} in the file)")
            elif state[name].shape == tensor.shape:
                tensor.copy_(state[name])
                report.copied.append(name)
            elif _pointwise_of(state[name], tensor):
                # On features that vary slowly over the kernel's taps, a k x k conv acts as its 1 x 1 sum of taps:
                # the nearest 1 x 1 start for a fusion conv made cheaper (lmrc-lite's value encoder).
                tensor.copy_(state[name].sum((2, 3), keepdim=True))
                report.pointwise.append(name)
            elif name == VALUE_STEM and state[name].shape[1] == tensor.shape[1] + IMAGE_CHANNELS \
                    and state[name].shape[0] == tensor.shape[0] and state[name].shape[2:] == tensor.shape[2:]:
                # Without this the stem starts random, and how well the copied trunk after it does depends on the
                # seed (seed 1 of lmrc-lite-v2 started at a CE of ~3 instead of ~0.3).
                tensor.copy_(state[name][:, IMAGE_CHANNELS:])
                report.mask_inputs.append(name)
            else:
                report.fresh.append(f"{name} (shape {tuple(state[name].shape)} in the file, "
                                    f"{tuple(tensor.shape)} here)")
        report.unused = sorted(set(state) - set(target))
    return report


def _pointwise_of(source: torch.Tensor, dest: torch.Tensor) -> bool:
    """Whether `dest` is a 1 x 1 conv weight with the channels of the k x k conv weight `source`."""
    return (source.dim() == dest.dim() == 4 and dest.shape[2:] == (1, 1) and source.shape[2:] != (1, 1)
            and source.shape[:2] == dest.shape[:2])


def _names(layout: list, stage: int) -> list[str]:
    """The names of the reads decoder stage `stage` concatenates, in order."""
    from lmrc.model.readouts import stage_readouts

    return [readout.name for readout in stage_readouts(layout, stage)]


def _copy_readouts(dest: torch.Tensor, source: torch.Tensor, old_reads: list[str], new_reads: list[str],
                   old_width: int, new_width: int) -> bool:
    """Decoder input projection (out x sum(C) x k x k): the column group of each read both layouts have is copied,
    the groups of reads new to the model are zero. False when the shapes do not allow it (other widths)."""
    if old_width != new_width or dest.shape[0] != source.shape[0] or dest.shape[2:] != source.shape[2:] or \
            source.shape[1] != old_width * len(old_reads) or dest.shape[1] != new_width * len(new_reads):
        return False
    dest.zero_()
    for i, read in enumerate(new_reads):
        if read in old_reads:
            j = old_reads.index(read)
            dest[:, i * new_width:(i + 1) * new_width] = source[:, j * old_width:(j + 1) * old_width]
    return True
