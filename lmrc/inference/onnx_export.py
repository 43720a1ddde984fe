"""`lmrc export`: write the per-frame graphs of an LMRC network as ONNX, with a JSON manifest beside them.

    lmrc export --model lmrc-lite --out lmrc-lite-onnx/
    lmrc segment clip.mp4 --mask first.png --runtime onnxruntime --onnx lmrc-lite-onnx/

Three graphs, the three steps `Segmenter` drives (`lmrc.model.onnx_graphs`): key encoding, value encoding, and
read-and-decode (global read with its top-k, LMR, SLMR, the memory comparator, decoder, soft aggregation). The
memory bank stays in Python (`lmrc.inference.onnx_runtime`). The exported model is rewritten as the inference
copy is: BatchNorm folded into the convolutions and the decoder's readout projections moved into the value encoder
(`lmrc.model.transforms`), so the memory holds the narrower projected values.

The global read's top-k is an inference choice (`InferenceConfig.top_k`) but a constant of the graph: the
manifest records it (`read_top_k`, null = every position) and `OnnxModel` refuses any other.

Image size, number of objects and memory length are dynamic axes (sides multiples of 16). The TorchScript-based
exporter is used (`dynamo=False`): the torch.export-based one had not finished the read-and-decode graph (its
local reads unroll into hundreds of slices) after 12 minutes, where this one takes about a minute.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch

from lmrc.utils.errors import LmrcError

FORMAT = "lmrc-onnx-1"
MANIFEST = "manifest.json"
OPSET = 17
GRAPH_FILES = {"key_encoding": "key_encoding.onnx", "value_encoding": "value_encoding.onnx",
               "read_and_decode": "read_and_decode.onnx"}


def configure(parser: argparse.ArgumentParser) -> None:
    from lmrc.config import MODEL_PRESETS
    from lmrc.inference.config import InferenceConfig

    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="lmrc-lite", help="model (default: lmrc-lite)")
    parser.add_argument("--weights", metavar="FILE", help="weights file (.safetensors; default: the model's shipped weights)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the .onnx graphs and manifest.json")
    parser.add_argument("--size", type=int, default=480, metavar="PIXELS",
                        help="shorter side of the example frame the graphs are traced and checked at (default: 480; "
                             "the graphs take any size whose sides are multiples of 16)")
    parser.add_argument("--top-k", type=int, default=InferenceConfig().top_k, metavar="K",
                        help=f"global read keeps the K best memory matches per pixel (default: {InferenceConfig().top_k}, "
                             "as `lmrc segment`; 0 keeps all); fixed in the graph")
    parser.add_argument("--overwrite", action="store_true", help="replace graphs already in --out")


def main(args: argparse.Namespace) -> int:
    from lmrc.model.weights import load_model

    if args.size < 16:
        raise LmrcError(f"--size must be >= 16 pixels, got {args.size}")
    if args.top_k < 0:
        raise LmrcError(f"--top-k must be >= 1, or 0 to keep every memory match, got {args.top_k}")
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    model = load_model(args.model, args.weights)
    start = time.perf_counter()
    read_top_k = args.top_k or None
    manifest = export_onnx(model, out, read_top_k=read_top_k, size=example_size(args.size),
                           weights=args.weights or f"{args.model} (shipped)")
    print(f"exported {args.model} setting {model.config.setting} (global read top-k {read_top_k or 'all'}) to {out} "
          f"in {time.perf_counter() - start:.0f} s: "
          + ", ".join(g["file"] for g in manifest["graphs"].values()) + f", {MANIFEST}")
    check = manifest.get("check")
    if check:
        print(f"onnxruntime vs PyTorch at {check['size'][1]}x{check['size'][0]}: largest difference "
              f"{check['max_abs_difference']:.2e}")
    return 0


def example_size(shorter_side: int) -> tuple[int, int]:
    """A 16:9 frame (H, W) with the given shorter side, both rounded up to multiples of 16 (as the segmenter pads)."""
    up = lambda v: -(-v // 16) * 16  # noqa: E731
    return up(shorter_side), up(round(shorter_side * 16 / 9))


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LmrcError(f"--out {out} is a file; give a folder name")
    existing = [name for name in (MANIFEST, *GRAPH_FILES.values()) if (out / name).exists()]
    if existing and not overwrite:
        raise LmrcError(f"{out} already holds {', '.join(existing)}; pass --overwrite or choose another folder")


def export_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The copy that is exported: eval mode, projected values, BatchNorm folded (no in-place or kept-buffer tricks)."""
    from lmrc.model.transforms import fold_batch_norms, project_values_before_reading

    model = copy.deepcopy(model).cpu().float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    project_values_before_reading(model)
    fold_batch_norms(model.key_encoder)
    fold_batch_norms(model.value_encoder)
    return model


def example_inputs(model: torch.nn.Module, size: tuple[int, int], objects: int = 2,
                   memory_frames: int = 2, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Inputs of each graph for a random frame of `size` (H, W) with `objects` objects and a memory of
    `memory_frames` frames, named as the graphs' inputs: {graph: {input name: tensor}}."""
    from lmrc.model.onnx_graphs import KeyEncodingGraph, ValueEncodingGraph, key_encoding_names, value_stages

    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, *size, generator=generator)
    masks = torch.rand(1, objects, *size, generator=generator)
    masks = masks / masks.sum(1, keepdim=True)
    with torch.no_grad():
        encoded = dict(zip(key_encoding_names()[1], KeyEncodingGraph(model)(image)))
        values = dict(zip((f"value{r}" for r in value_stages(model)),
                          ValueEncodingGraph(model)(image, *encoded.values(), masks)))
    # a memory of `memory_frames` frames: this frame's keys and values, perturbed
    keys = torch.cat([encoded["key4"].flatten(2) + 0.1 * t * torch.randn(encoded["key4"].flatten(2).shape, generator=generator)
                      for t in range(memory_frames)], 2)
    global_value = model.global_memory_value(values["value4"]).flatten(3)  # 1 x N x C x P
    rows = torch.cat([global_value] * memory_frames, 3).permute(0, 3, 1, 2).contiguous()  # 1 x M x N x C
    local = {}
    for r in model.config.local_read_stages:
        local[f"local_key{r}"] = encoded[f"key{r}"] + 0.1 * torch.randn(encoded[f"key{r}"].shape, generator=generator)
        local[f"local_value{r}"] = values[f"value{r}"]
    read = {**encoded, "memory_keys": keys, "memory_key_sq": keys.pow(2).sum(1), "memory_value_rows": rows, **local}
    return {"key_encoding": {"image": image},
            "value_encoding": {"image": image, **encoded, "masks": masks},
            "read_and_decode": read}


def _dynamic_axes(names: list[str]) -> dict[str, dict[int, str]]:
    """Named dynamic axes of every graph input and output (stage r sides are H/2^r, W/2^r; N objects; M positions)."""
    axes: dict[str, dict[int, str]] = {}
    for name in names:
        r = name[-1]
        if name in ("image", "masks", "logits", "agg_logits", "probs"):
            axes[name] = {2: "height", 3: "width"}
            if name != "image":
                axes[name][1] = "objects" if name in ("masks", "logits") else "objects_and_background"
        elif name.startswith(("key", "features", "local_key", "reliability_")):
            axes[name] = {2: f"height{r}", 3: f"width{r}"}
        elif name.startswith(("value", "local_value")):
            axes[name] = {1: "objects", 3: f"height{r}", 4: f"width{r}"}
        elif name == "memory_keys":
            axes[name] = {2: "memory_positions"}
        elif name == "memory_key_sq":
            axes[name] = {1: "memory_positions"}
        elif name == "memory_value_rows":
            axes[name] = {1: "memory_positions", 2: "objects"}
    return axes


def export_onnx(model: torch.nn.Module, out: str | Path, *, read_top_k: int | None = 20,
                size: tuple[int, int] = (480, 864), weights: str | None = None, check: bool = True) -> dict:
    """Write the three graphs of `model` and manifest.json into `out`; returns the manifest.

    `read_top_k`: the global read keeps each pixel's k best memory matches (None: every position); fixed in the
    read-and-decode graph and recorded in the manifest beside the model config.
    `size` (H, W, multiples of 16): the example frame the graphs are traced at; they take any size. With `check`
    (and onnxruntime installed) each graph is run once on that example and compared with PyTorch; the largest
    difference goes into the manifest. Files are written under temporary names and renamed at the end, so an
    interrupted export leaves no half-written graph."""
    from lmrc.config import to_dict
    from lmrc.model.onnx_graphs import (KeyEncodingGraph, ReadAndDecodeGraph, ValueEncodingGraph, key_encoding_names,
                                        read_and_decode_names, value_encoding_names, value_stages)
    from lmrc.model.weights import model_name_of, tensors_digest

    if size[0] % 16 or size[1] % 16:
        raise LmrcError(f"example size {size[1]}x{size[0]}: sides must be multiples of 16")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digest = tensors_digest(model.state_dict())
    model = export_copy(model)
    inputs = example_inputs(model, size)
    graphs = {"key_encoding": (KeyEncodingGraph(model), key_encoding_names()),
              "value_encoding": (ValueEncodingGraph(model), value_encoding_names(model)),
              "read_and_decode": (ReadAndDecodeGraph(model, read_top_k), read_and_decode_names(model))}
    written: dict[str, Path] = {}
    entries = {}
    try:
        for name, (graph, (input_names, output_names)) in graphs.items():
            tmp = out / f".{GRAPH_FILES[name]}.tmp"
            args = tuple(inputs[name][n] for n in input_names)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
                torch.onnx.export(graph, args, str(tmp), input_names=input_names, output_names=output_names,
                                  dynamic_axes=_dynamic_axes(input_names + output_names), opset_version=OPSET,
                                  dynamo=False, do_constant_folding=True)
            written[name] = tmp
            entries[name] = {"file": GRAPH_FILES[name], "inputs": _graph_inputs(tmp), "outputs": output_names}
        manifest = {
            "format": FORMAT,
            "model": model_name_of(model.config),
            "config": to_dict(model.config),
            "read_top_k": read_top_k,
            "weights": weights,
            "weights_sha256": digest,
            "projected_stages": sorted(model.projected_stages),
            "value_stages": list(value_stages(model)),
            "example_size": list(size),
            "dynamic_axes": "image height/width (multiples of 16), objects, memory_positions (frames x H/16 x W/16)",
            "batch": 1,
            "opset": OPSET,
            "torch": torch.__version__,
            "graphs": entries,
        }
        if check:
            difference = _check(written, graphs, inputs)
            if difference is not None:
                manifest["check"] = {"size": list(size), "max_abs_difference": difference}
        for name, tmp in written.items():
            tmp.replace(out / GRAPH_FILES[name])
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
    return manifest


def _graph_inputs(path: Path) -> list[str]:
    """The inputs the written graph kept (the exporter drops inputs a graph does not use)."""
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _check(files: dict[str, Path], graphs: dict, inputs: dict) -> float | None:
    """Largest absolute difference between onnxruntime and PyTorch over every output of every graph, or None
    without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    largest = 0.0
    for name, (graph, (input_names, _)) in graphs.items():
        session = onnxruntime.InferenceSession(str(files[name]), providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[name][i.name].numpy() for i in session.get_inputs()}
        got = session.run(None, feed)
        with torch.no_grad():
            expected = graph(*(inputs[name][n] for n in input_names))
        for a, b in zip(got, expected):
            largest = max(largest, float(abs(torch.from_numpy(a) - b).max()))
    return largest
