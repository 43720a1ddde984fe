"""Run exported ONNX graphs (`lmrc export`) with onnxruntime behind the network's three-method contract.

    model = OnnxModel("lmrc-lite-onnx/")
    seg = Segmenter(model)      # the same streaming segmenter, which uses the model as it is; memory bank in Python

`OnnxModel` has what `Segmenter` uses of an `LMRC`: `config`, `encode_key`, `encode_value`, `read_and_decode`,
`global_memory_value`, and what it asks of a model that is not an `nn.Module`: `runtime`, `precision` (fp32),
`device` (cpu), `to` (the CPU only), `timer` (a `StageTimer`; the whole read-and-decode graph is one stage) and
`check_read_top_k` (the global read's top-k is fixed in the graph, `read_top_k`). Tensors cross to onnxruntime as
numpy views where they are contiguous, so most inputs are not copied.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lmrc.config import ModelConfig, from_dict
from lmrc.model.encoders import STAGES
from lmrc.model.network import LMRC, FrameEncoding, MemoryInput, SegmentOutput
from lmrc.utils.errors import LmrcError
from lmrc.utils.timing import StageTimer


def _array(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


class OnnxModel:
    """An exported LMRC network (a folder written by `export_onnx`) run by onnxruntime on the CPU.

    threads: onnxruntime's intra-op threads (default: torch's thread count, so both runtimes get the same cores)."""

    runtime = "onnxruntime"
    precision = "fp32"
    device = "cpu"

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise LmrcError("--runtime onnxruntime needs the onnxruntime package: pip install 'lmrc[onnx]'") from None
        from lmrc.inference.onnx_export import FORMAT, MANIFEST

        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise LmrcError(f"{folder} holds no {MANIFEST}; write the graphs with `lmrc export --out {folder}`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LmrcError(f"{path} is not valid JSON ({exc}); export the graphs again") from None
        if manifest.get("format") != FORMAT:
            raise LmrcError(f"{path} is not an lmrc ONNX manifest ({FORMAT}); export the graphs again with `lmrc export`")
        if "read_top_k" not in manifest:
            raise LmrcError(f"{path} does not say which global-read top-k its graphs keep (an older export); export "
                            f"the graphs again with `lmrc export --out {folder} --overwrite`")
        self.manifest, self.folder = manifest, folder
        self.config: ModelConfig = from_dict(ModelConfig, manifest["config"], where=f"config in {path}")
        self.projected_stages = set(manifest["projected_stages"])
        self.value_stages = tuple(manifest["value_stages"])
        self.read_top_k: int | None = manifest["read_top_k"]  # fixed in the graph; None reads every position
        self.timer = StageTimer()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.sessions = {}
        self.outputs = {}
        for name, graph in manifest["graphs"].items():
            file = folder / graph["file"]
            if not file.is_file():
                raise LmrcError(f"{file} is missing; export the graphs again with `lmrc export --out {folder} --overwrite`")
            self.sessions[name] = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
            self.outputs[name] = [o.name for o in self.sessions[name].get_outputs()]
        self.inputs = {name: [i.name for i in s.get_inputs()] for name, s in self.sessions.items()}

    # --- what Segmenter uses besides the three steps ----------------------------------------------------------

    def to(self, device: str | torch.device) -> "OnnxModel":
        if torch.device(device).type != "cpu":
            raise LmrcError("--runtime onnxruntime runs on the CPU here; use --device cpu (or the torch runtime on CUDA)")
        return self

    def check_read_top_k(self, read_top_k: int | None) -> None:
        """LmrcError unless `read_top_k` (None: every position) is the top-k the graphs were exported with."""
        if read_top_k != self.read_top_k:
            exported = (f"keep the {self.read_top_k} best global matches" if self.read_top_k
                        else "read every global memory position")
            asked = read_top_k or 0
            raise LmrcError(f"the graphs in {self.folder} {exported} (fixed at export), not --top-k {asked}; export "
                            f"again with `lmrc export --top-k {asked}`, or drop --top-k")

    # the same arithmetic as the network's (duck-typed: it only reads config and projected_stages)
    read_value_channels = LMRC.read_value_channels
    global_memory_value = LMRC.global_memory_value

    def _run(self, graph: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        feed = {name: _array(tensors[name]) for name in self.inputs[graph]}
        results = self.sessions[graph].run(self.outputs[graph], feed)
        return {name: torch.from_numpy(r) for name, r in zip(self.outputs[graph], results)}

    # --- the three steps ------------------------------------------------------------------------------------------

    def encode_key(self, image: Tensor) -> FrameEncoding:
        out = self._run("key_encoding", {"image": image})
        return FrameEncoding({r: out[f"key{r}"] for r in STAGES}, {r: out[f"features{r}"] for r in STAGES})

    def encode_value(self, image: Tensor, frame: FrameEncoding, masks: Tensor,
                     stages: tuple[int, ...] = STAGES) -> dict[int, Tensor]:
        missing = set(stages) - set(self.value_stages)
        if missing:
            raise ValueError(f"the exported value graph has stages {self.value_stages}, asked for {sorted(missing)}")
        tensors = {"image": image, "masks": masks, **{f"key{r}": frame.keys[r] for r in STAGES},
                   **{f"features{r}": frame.features[r] for r in STAGES}}
        out = self._run("value_encoding", tensors)
        return {r: out[f"value{r}"] for r in stages}

    def read_and_decode(self, query: FrameEncoding, memory: MemoryInput, read_top_k: int | None = None) -> SegmentOutput:
        """As `LMRC.read_and_decode`; read_top_k must be the graphs' own (`read_top_k`, fixed at export)."""
        self.check_read_top_k(read_top_k)
        if memory.valid_objects is not None and not bool(memory.valid_objects.all()):
            raise ValueError("the exported graphs take no padding objects (valid_objects must be all true)")
        positions = memory.global_keys.shape[-1]
        needed = max(self.read_top_k or 0, self.config.comparator_top_k if self.config.memory_comparator else 0)
        if positions < needed:
            raise LmrcError(f"the exported global read keeps the {needed} best of at least {needed} memory positions, "
                            f"the memory holds {positions}: process larger frames (--size)")
        key_sq = memory.global_key_sq if memory.global_key_sq is not None else memory.global_keys.pow(2).sum(1)
        tensors = {
            **{f"key{r}": query.keys[r] for r in STAGES}, **{f"features{r}": query.features[r] for r in STAGES},
            "memory_keys": memory.global_keys, "memory_key_sq": key_sq,
            # B x N x C x M -> B x M x N x C: a contiguous view of the memory bank's position-major rows
            "memory_value_rows": memory.global_values.permute(0, 3, 1, 2),
            **{f"local_key{r}": memory.local_keys[r] for r in self.config.local_read_stages},
            **{f"local_value{r}": memory.local_values[r] for r in self.config.local_read_stages},
        }
        with self.timer.stage("read_and_decode"):
            out = self._run("read_and_decode", tensors)
        reliability = {name[len("reliability_"):]: t for name, t in out.items() if name.startswith("reliability_")}
        return SegmentOutput(out["logits"], out["agg_logits"], out["probs"], reliability)


def open_onnx_model(folder: str | Path | None, model: torch.nn.Module | None = None, *,
                    read_top_k: int | None = 20, threads: int | None = None) -> OnnxModel:
    """The graphs in `folder`, or with folder None `model` (an LMRC) exported with the global read's `read_top_k`
    (None: every position) to a temporary folder first (the sessions keep what they need, the folder is removed)."""
    import tempfile

    if folder is not None:
        return OnnxModel(folder, threads)
    from lmrc.inference.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="lmrc-onnx-") as tmp:
        export_onnx(model, tmp, read_top_k=read_top_k, size=(240, 432), check=False)
        return OnnxModel(tmp, threads)
