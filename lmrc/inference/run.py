"""Whole videos: `segment_video` (the public one-call API, frames and masks in memory or on disk, results as an
iterator) and `segment_sequence` (one sequence to a results folder: the loop of `lmrc segment` and `lmrc eval --run`).

    for index, ids, probs in segment_video("clip.mp4", "first_mask.png", InferenceConfig(size=480)):
        ...
    stats = segment_sequence(model, "clip.mp4", "first_mask.png", "clip_lmrc", mem_every=5, size=480)

Everything that can be checked before the first output is checked first (frames, masks, output folder, overlay
name); every file is written atomically, so an interruption leaves finished frames only (continue with
`resume=True`).
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from lmrc.data.video import DEFAULT_FPS, Frame, FrameSource, open_frames
from lmrc.inference.config import InferenceConfig
from lmrc.inference.io import OverlayWriter, Prompts, ResultWriter, load_prompts
from lmrc.inference.segmenter import Segmenter
from lmrc.utils.errors import LmrcError


@dataclass
class SegmentStats:
    """frames segmented, wall seconds of the loop, frames per second, peak memory in MB (CUDA allocations on a GPU,
    else the process' peak resident size), where the masks went, frames skipped as unreadable, frames written."""

    frames: int
    seconds: float
    fps: float
    peak_memory_mb: float
    out_dir: Path
    skipped: list[int] = field(default_factory=list)
    written: int = 0


def check_overlay_path(path: str | Path, overwrite: bool) -> Path:
    """The overlay's name problems, found before anything is written."""
    path = Path(path)
    if path.suffix.lower() not in OverlayWriter.CONTAINERS:
        raise LmrcError(f"overlay {path}: use a .mp4 (or .mov, .mkv) file name")
    if path.exists() and not overwrite:
        raise LmrcError(f"overlay {path} already exists; pass --overwrite or choose another name")
    if path.is_dir():
        raise LmrcError(f"overlay {path} is a folder; give a file name such as {path / 'overlay.mp4'}")
    return path


def segment_video(
    video_or_frames: str | Path | FrameSource | Iterable[np.ndarray],
    masks: str | Path | Prompts | Mapping[int, np.ndarray] | np.ndarray,
    config: InferenceConfig | None = None,
    model: str | torch.nn.Module | Segmenter | None = None,
) -> Iterator[tuple[int, list[int], torch.Tensor]]:
    """Segment a whole video forward in time; yields (frame index, object ids in channel order, (N+1) x H x W
    probabilities) frame by frame.

    video_or_frames: a video file or frame folder (as `lmrc segment` reads), or H x W x 3 uint8 RGB frames.
    masks: the prompts, per frame: {frame index: H x W object ids}, one array (the first frame's), a Prompts, or a
    mask file / folder of masks named like their frames (with a path as video). config: InferenceConfig (default:
    its defaults). model: a model name ("lmrc-lite", the default, or "lmrc-r50": its shipped weights), a model
    (e.g. from `lmrc.load_model`), or a Segmenter to reuse (reset first).
    Frames before the first prompt come out as background (one channel).
    """
    if isinstance(video_or_frames, (str, Path)):
        video_or_frames = open_frames(video_or_frames)
    prompts = _prompts(masks, video_or_frames)
    segmenter = _segmenter(model, config)
    frames = (video_or_frames if isinstance(video_or_frames, FrameSource)
              else (Frame(i, f"{i:05d}", rgb) for i, rgb in enumerate(video_or_frames)))
    for frame, probs in _forward(segmenter, frames, prompts):
        yield frame.index, list(segmenter.object_ids), probs


def _prompts(masks, frames) -> dict[int, np.ndarray]:
    if isinstance(masks, Prompts):
        return masks.masks
    if isinstance(masks, (str, Path)):
        if not isinstance(frames, FrameSource):
            raise LmrcError(f"masks {masks}: mask files need the video as a path, to match their frames")
        return load_prompts(masks, frames).masks
    if isinstance(masks, Mapping):
        return {int(i): np.asarray(m) for i, m in masks.items()}
    return {0: np.asarray(masks)}


def _segmenter(model, config: InferenceConfig | None) -> Segmenter:
    if isinstance(model, Segmenter):
        model.reset()
        return model
    if model is None or isinstance(model, str):
        from lmrc.model.weights import load_model

        model = load_model(model or "lmrc-lite")
    return Segmenter(model, config)


def _forward(segmenter: Segmenter, frames: Iterable[Frame], prompts: Mapping[int, np.ndarray]
             ) -> Iterator[tuple[Frame, torch.Tensor]]:
    """Step through the frames in order, each with its prompt if it has one."""
    for frame in frames:
        yield frame, segmenter.step(frame.rgb, prompts.get(frame.index))


def segment_sequence(
    model: torch.nn.Module | Segmenter,
    frames_path: str | Path | FrameSource,
    mask_path: str | Path | Prompts,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    save_probs: bool = False,
    overlay: str | Path | None = None,
    skip_bad_frames: bool = False,
    progress: bool = False,
    **segmenter_options: Any,
) -> SegmentStats:
    """Segment every frame of `frames_path` (video, frame folder, or an opened FrameSource) from the mask(s) at
    `mask_path` (file, folder of sparse masks, or loaded Prompts) into `out_dir/<frame name>.png`.

    model: a model, or a Segmenter to reuse (it is reset; segmenter_options then must be empty); segmenter_options go
    to `Segmenter` (an InferenceConfig as `config`, or its fields). overlay: an mp4 path for masks drawn over the frames. With `resume`, frames already in out_dir are run (the memory needs
    them) but not rewritten.
    """
    source = frames_path if isinstance(frames_path, FrameSource) else open_frames(frames_path, skip_bad_frames=skip_bad_frames)
    prompts = mask_path if isinstance(mask_path, Prompts) else load_prompts(mask_path, source)
    if overlay is not None:
        overlay = check_overlay_path(overlay, overwrite or resume)
    segmenter = _segmenter(model, None) if isinstance(model, Segmenter) else Segmenter(model, **segmenter_options)
    size = source.size
    writer = ResultWriter(out_dir, overwrite=overwrite, resume=resume, save_probs=save_probs, size=size)
    video = OverlayWriter(overlay, source.fps or DEFAULT_FPS, size, overwrite=True) if overlay is not None else None

    if segmenter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(segmenter.device)
    pending = sorted(prompts.masks)  # prompt frames not reached yet
    frames = 0
    start = time.perf_counter()
    try:
        bar = _progress_bar(source, progress)
        for frame, probs in _forward(segmenter, bar, prompts.masks):
            if pending and pending[0] < frame.index:
                raise LmrcError(f"frame {pending[0]} carries a mask ({prompts.files.get(pending[0])}) but could not "
                                "be decoded; repair the frame or draw the mask on another frame")
            if pending and pending[0] == frame.index:
                pending.pop(0)
            ids = segmenter.probs_to_ids(probs)
            if not writer.done(frame.name):
                writer.write(frame.name, ids, probs[1:] if save_probs else None, segmenter.object_ids)
            if video is not None:
                video.write(frame.rgb, ids)
            frames += 1
        bar.close()
        if pending:
            raise LmrcError(f"the masks name frame {pending[0]}, but {source.path} ends after {frames} frames")
    except BaseException:
        if video is not None:
            video.abort()
        raise
    if video is not None:
        video.close()
    seconds = time.perf_counter() - start
    return SegmentStats(frames, seconds, frames / max(seconds, 1e-9), _peak_memory_mb(segmenter.device),
                        Path(out_dir), list(source.skipped), len(writer.written))


def _progress_bar(source: FrameSource, enabled: bool):
    from tqdm import tqdm

    # tqdm's rate reads "frame/s"; stderr keeps stdout clean for the summary; disable=None hides the bar when
    # stderr is not a terminal (logs), where its carriage returns would only add noise.
    return tqdm(source, total=source.num_frames, unit="frame", desc=str(getattr(source, "sequence", source.path)),
                disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
