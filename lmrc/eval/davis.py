"""Score a results folder against a DAVIS 2016 or 2017 root with the official semi-supervised protocol.

Layouts understood:
- ground truth: `<root>/Annotations/480p/<seq>/<frame>.png`; the split lists sequences in
  `<root>/ImageSets/480p/<split>.txt` (DAVIS 2016 release: one `/JPEGImages/... /Annotations/...` pair a line),
  `<root>/ImageSets/2016/<split>.txt` or `<root>/ImageSets/2017/<split>.txt` (one sequence name a line).
- results: `<results>/<seq>/<frame>.png`, palette ids or binary 0/255.

Year 2016 scores one object per sequence (any non-zero id is the object). Year 2017 scores objects
1..max id of the first annotated frame (as the official code does); void 255 counts as background.
"""
from __future__ import annotations

import concurrent.futures
import csv
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lmrc.data.masks import read_mask
from lmrc.utils.errors import LmrcError
from lmrc.eval.metrics import score_objects, statistics
from lmrc.fileio import atomic_path

RESOLUTION = "480p"
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
PER_SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")


@dataclass(frozen=True)
class ObjectScores:
    """Per-frame J and F of one object over the scored frames (first and last frame excluded)."""

    sequence: str
    object_id: int
    j: np.ndarray  # (T-2,)
    f: np.ndarray  # (T-2,)

    @property
    def name(self) -> str:
        return f"{self.sequence}_{self.object_id}"


@dataclass
class Evaluation:
    """Scores of every object of every evaluated sequence, in sequence order."""

    split: str
    year: int
    objects: list[ObjectScores]
    frames: int  # scored frames summed over sequences

    def global_scores(self) -> dict[str, float]:
        """The seven global numbers: means over objects (not sequences) of each object's statistics."""
        j = np.array([statistics(o.j) for o in self.objects])  # n_objects x (mean, recall, decay)
        f = np.array([statistics(o.f) for o in self.objects])
        jm, jr, jd = j.mean(axis=0)
        fm, fr, fd = f.mean(axis=0)
        return dict(zip(GLOBAL_COLUMNS, (float(v) for v in ((jm + fm) / 2, jm, jr, jd, fm, fr, fd))))

    def per_object(self) -> list[tuple[str, float, float]]:
        """(`<seq>_<id>`, J-Mean, F-Mean) per object."""
        return [(o.name, statistics(o.j)[0], statistics(o.f)[0]) for o in self.objects]


def csv_paths(results: str | Path, split: str) -> tuple[Path, Path]:
    """(global, per-sequence) CSV paths inside the results folder."""
    results = Path(results)
    return results / f"global_results-{split}.csv", results / f"per-sequence_results-{split}.csv"


def detect_year(gt_root: str | Path, split: str) -> int:
    """2016 if a 2016 split file exists for `split`, else 2017 if a 2017 one does."""
    root = Path(gt_root)
    for year in (2016, 2017):
        if any(p.is_file() for p in _split_files(root, split, year)):
            return year
    raise LmrcError(
        f"no split file for '{split}' under {root / 'ImageSets'} (looked for 480p/{split}.txt, "
        f"2016/{split}.txt, 2017/{split}.txt); pass --gt the DAVIS root folder and a --split it provides"
    )


def split_sequences(gt_root: str | Path, split: str, year: int) -> list[str]:
    """Sequence names of a split, in file order, without duplicates."""
    files = [p for p in _split_files(Path(gt_root), split, year) if p.is_file()]
    if not files:
        looked = ", ".join(str(p) for p in _split_files(Path(gt_root), split, year))
        raise LmrcError(f"split file not found (looked for {looked}); check --gt, --split and --year")
    names: dict[str, None] = {}
    for line in files[0].read_text().splitlines():
        tokens = line.split()
        if not tokens:
            continue
        # 2016 format: "/JPEGImages/480p/<seq>/00000.jpg /Annotations/480p/<seq>/00000.png"; else a bare name.
        name = tokens[-1].strip("/").split("/")[-2] if "/" in tokens[-1] else tokens[-1]
        names[name] = None
    if not names:
        raise LmrcError(f"split file {files[0]} lists no sequences")
    return list(names)


def _split_files(root: Path, split: str, year: int) -> list[Path]:
    if year == 2016:
        return [root / "ImageSets" / RESOLUTION / f"{split}.txt", root / "ImageSets" / "2016" / f"{split}.txt"]
    if year == 2017:
        return [root / "ImageSets" / "2017" / f"{split}.txt"]
    raise LmrcError(f"year {year} is not a DAVIS year; use --year 2016 or --year 2017")


def gt_frames(gt_root: str | Path, sequence: str) -> list[Path]:
    """Sorted annotation PNGs of one sequence; refuses an absent or incomplete (fewer masks than frames) folder."""
    root = Path(gt_root)
    folder = root / "Annotations" / RESOLUTION / sequence
    if not folder.is_dir():
        raise LmrcError(f"ground-truth folder {folder} not found; check --gt (the DAVIS root) and the sequence name")
    frames = sorted(folder.glob("*.png"))
    images = root / "JPEGImages" / RESOLUTION / sequence
    n_images = len(list(images.glob("*.jpg"))) if images.is_dir() else 0
    if n_images > len(frames):
        raise LmrcError(
            f"ground truth {folder} has {len(frames)} masks for {n_images} frames in {images}; "
            "semi-supervised scoring needs a mask for every frame (use the full train/val annotations)"
        )
    if len(frames) < 3:
        raise LmrcError(
            f"ground truth {folder} has {len(frames)} frames; at least 3 are needed (first and last are not scored)"
        )
    return frames


def evaluate_sequence(gt_root: str | Path, results: str | Path, sequence: str, year: int) -> list[ObjectScores]:
    """J and F of every object of one sequence over frames 1..T-2."""
    frames = gt_frames(gt_root, sequence)
    res_dir = Path(results) / sequence
    if not res_dir.is_dir():
        raise LmrcError(
            f"results folder {res_dir} not found; segment sequence '{sequence}' first "
            f"(one PNG a frame, {res_dir}/{frames[1].name}, ...) or leave it out with --sequences"
        )
    scored = frames[1:-1]
    missing = [res_dir / p.name for p in scored if not (res_dir / p.name).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more frames of '{sequence}')" if len(missing) > 1 else ""
        raise LmrcError(f"result {missing[0]} is missing{more}; write a mask for every frame of the sequence")

    first = read_mask(frames[0])
    n_objects = 1 if year == 2016 else int(first.max())
    gt = np.zeros((len(scored), *first.shape), dtype=np.uint8)
    pred = np.zeros_like(gt)
    for t, gt_path in enumerate(scored):
        gt[t] = _as_year(read_mask(gt_path), year, first.shape, gt_path, "ground truth")
        res_path = res_dir / gt_path.name
        ids = _as_year(read_mask(res_path), year, first.shape, res_path, "result")
        if ids.max(initial=0) > n_objects:
            raise LmrcError(
                f"result {res_path} has object id {int(ids.max())} but {frames[0]} has {n_objects} object(s); "
                "use the ids of the first-frame annotation"
            )
        pred[t] = ids
    j, f = score_objects(gt, pred, n_objects)
    return [ObjectScores(sequence, k + 1, j[k], f[k]) for k in range(n_objects)]


def _as_year(ids: np.ndarray, year: int, shape: tuple[int, ...], path: Path, what: str) -> np.ndarray:
    if ids.shape != shape:
        h, w = shape
        raise LmrcError(
            f"{what} {path} is {ids.shape[1]}x{ids.shape[0]} but the annotations are {w}x{h}; "
            f"write masks at the annotation resolution ({w}x{h})"
        )
    return (ids > 0).astype(np.uint8) if year == 2016 else ids


def evaluate(
    results: str | Path,
    gt_root: str | Path,
    *,
    split: str = "val",
    year: int | None = None,
    sequences: Sequence[str] | None = None,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Evaluation:
    """Score `results` against `gt_root`; removes this split's CSVs from `results` first, writes none.

    `sequences` restricts the split to a subset (each must be in the split). `workers` processes score sequences
    in parallel (default: the available cores). `progress(sequence, done, total)` is called as sequences finish.
    """
    results, gt_root = Path(results), Path(gt_root)
    if not results.is_dir():
        raise LmrcError(f"results folder {results} not found; pass --results the folder holding <seq>/<frame>.png")
    for stale in csv_paths(results, split):
        stale.unlink(missing_ok=True)  # a failed run must never leave an older score looking current
    if not gt_root.is_dir():
        raise LmrcError(f"DAVIS root {gt_root} not found; pass --gt the folder holding Annotations/ and ImageSets/")
    year = detect_year(gt_root, split) if year is None else year
    names = split_sequences(gt_root, split, year)
    if sequences:
        unknown = [s for s in sequences if s not in names]
        if unknown:
            raise LmrcError(
                f"sequence(s) {', '.join(unknown)} not in the '{split}' split of {gt_root}; "
                f"choose from: {', '.join(names)}"
            )
        names = list(dict.fromkeys(sequences))

    scores: dict[str, list[ObjectScores]] = {}
    jobs = [(str(gt_root), str(results), name, year) for name in names]
    workers = min(len(jobs), available_cores() if workers is None else max(1, workers))
    if workers <= 1:
        for job in jobs:
            scores[job[2]] = _score_job(job)
            if progress:
                progress(job[2], len(scores), len(jobs))
    else:
        # spawn: children must not inherit a parent's torch/OpenMP thread state (lmrc eval --run loads torch).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(_score_job, job): job[2] for job in jobs}
            try:
                for future in concurrent.futures.as_completed(futures):
                    scores[futures[future]] = future.result()
                    if progress:
                        progress(futures[future], len(scores), len(jobs))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    objects = [o for name in names for o in scores[name]]
    if not objects:
        raise LmrcError(f"no objects to score: the first annotated frames of {', '.join(names)} are empty")
    frames = sum(len(scores[name][0].j) for name in names if scores[name])
    return Evaluation(split=split, year=year, objects=objects, frames=frames)


def available_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one sequence per process already fills the cores


def _score_job(job: tuple[str, str, str, int]) -> list[ObjectScores]:
    gt_root, results, sequence, year = job
    return evaluate_sequence(gt_root, results, sequence, year)


def write_csvs(evaluation: Evaluation, results: str | Path) -> tuple[Path, Path]:
    """Write `global_results-<split>.csv` and `per-sequence_results-<split>.csv` atomically (3 decimals)."""
    global_path, per_sequence_path = csv_paths(results, evaluation.split)
    scores = evaluation.global_scores()
    with atomic_path(global_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(GLOBAL_COLUMNS)
        writer.writerow([f"{scores[c]:.3f}" for c in GLOBAL_COLUMNS])
    with atomic_path(per_sequence_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PER_SEQUENCE_COLUMNS)
        for name, j_mean, f_mean in evaluation.per_object():
            writer.writerow([name, f"{j_mean:.3f}", f"{f_mean:.3f}"])
    return global_path, per_sequence_path
