"""Configuration as data: typed dataclasses, loaded from YAML with unknown keys rejected."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmrc.utils.errors import LmrcError

T = TypeVar("T")

# Table 4 of the paper: which memory reads each ablation setting uses.
ABLATION_SETTINGS: dict[str, dict[str, Any]] = {
    "A": dict(local_read_stages=(), sequential_local_read=False, memory_comparator=False),
    "B": dict(local_read_stages=(4,), sequential_local_read=False, memory_comparator=False),
    "C": dict(local_read_stages=(2, 3, 4), sequential_local_read=False, memory_comparator=False),
    "D": dict(local_read_stages=(2, 3, 4), sequential_local_read=True, memory_comparator=False),
    "E": dict(local_read_stages=(2, 3, 4), sequential_local_read=False, memory_comparator=True),
    "F": dict(local_read_stages=(2, 3, 4), sequential_local_read=True, memory_comparator=True),
}


@dataclass
class ModelConfig:
    """Hyper-parameters of one LMRC network (Section III-E-3 defaults)."""

    backbone: str = "resnet50"  # "resnet50" (lmrc-r50) or "efficientnet_lite0" (lmrc-lite)
    setting: str = "F"  # ablation setting of Table 4, A..F
    key_dim: int = 64  # C^k_r, equal at every stage
    value_dims: tuple[int, int, int] = (64, 128, 256)  # C^v_r at stages 2, 3, 4
    decoder_dims: tuple[int, int, int] = (32, 64, 128)  # decoder widths at stages 2, 3, 4 (paper leaves them open)
    # What the value encoder's own trunk sees: "image_and_mask" (the paper's: image, object mask, other objects) or
    # "mask" (the masks alone; the frame enters through the key encoder's features F_r, already computed).
    # None: the backbone's own, "mask" for efficientnet_lite0 (lmrc-lite), "image_and_mask" for resnet50.
    value_trunk: str | None = None
    # Kernel of the convs fusing trunk and frame features into V_r; None: 1 for lmrc-lite (far cheaper), else 3.
    value_fusion_kernel: int | None = None
    window_radius: int = 2  # d: the local window is (2d+1) x (2d+1)
    comparator_top_k: int = 5  # k of the memory comparator
    scb_alpha: float = 3.0  # alpha of eq. (9)
    # STCN divides the negative squared distance by sqrt(C^k); the paper uses STCN's similarity ("as in [7]").
    similarity_scale: float | None = None  # None: 1 / sqrt(key_dim)

    def __post_init__(self) -> None:
        if self.setting not in ABLATION_SETTINGS:
            raise LmrcError(f"model setting {self.setting!r} is not one of {', '.join(ABLATION_SETTINGS)} (Table 4)")
        if self.backbone not in ("resnet50", "efficientnet_lite0"):
            raise LmrcError(f"model backbone {self.backbone!r} is not 'resnet50' or 'efficientnet_lite0'")
        self.value_dims = tuple(self.value_dims)
        self.decoder_dims = tuple(self.decoder_dims)
        lite = self.backbone == "efficientnet_lite0"
        if self.value_trunk is None:
            self.value_trunk = "mask" if lite else "image_and_mask"
        if self.value_fusion_kernel is None:
            self.value_fusion_kernel = 1 if lite else 3
        if self.value_trunk not in ("image_and_mask", "mask"):
            raise LmrcError(f"value_trunk {self.value_trunk!r} is not 'image_and_mask' or 'mask'")
        if self.value_trunk == "mask" and self.backbone != "efficientnet_lite0":
            raise LmrcError("value_trunk 'mask' is lmrc-lite's value encoder (backbone efficientnet_lite0)")
        if self.value_fusion_kernel not in (1, 3):
            raise LmrcError(f"value_fusion_kernel must be 1 or 3, got {self.value_fusion_kernel}")
        if self.window_radius < 0:
            raise LmrcError("window_radius (d) must be >= 0")

    @property
    def local_read_stages(self) -> tuple[int, ...]:
        return ABLATION_SETTINGS[self.setting]["local_read_stages"]

    @property
    def sequential_local_read(self) -> bool:
        return ABLATION_SETTINGS[self.setting]["sequential_local_read"]

    @property
    def memory_comparator(self) -> bool:
        return ABLATION_SETTINGS[self.setting]["memory_comparator"]

    @property
    def scale(self) -> float:
        return self.similarity_scale if self.similarity_scale is not None else self.key_dim ** -0.5


# The two shipped sizes share every LMRC module; only the encoders differ. lmrc-lite's value encoder reads the masks
# alone and fuses with 1x1 convs: the local memory's value is encoded at three scales on every frame, and this keeps
# that cost small (docs/PERFORMANCE.md). Weights files store their own config, so older lmrc-lite files still load.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "lmrc-r50": ModelConfig(backbone="resnet50"),
    "lmrc-lite": ModelConfig(backbone="efficientnet_lite0"),
}


def model_config(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise LmrcError(f"unknown model {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name], **overrides)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses; unknown keys are an error."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise LmrcError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(kind, value, f"{where}.{name}")
        elif typing.get_origin(kind) in (tuple,) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            pass
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-friendly dict of a dataclass (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(obj))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LmrcError(f"config file {path} not found; pass a YAML file such as configs/lmrc-lite-davis2016.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LmrcError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise LmrcError(f"config file {path} must hold a mapping of keys to values")
    return data


__all__ = ["ABLATION_SETTINGS", "ModelConfig", "MODEL_PRESETS", "model_config", "from_dict", "to_dict", "load_yaml", "field"]
