"""Randomness and choices behind one training sample: seeds, frame triplets within a gap, objects, sample order.

Every random choice of sample ``index`` comes from ``sample_rng(seed, index, ...)``, never from a global RNG, so a
sample is the same whichever DataLoader worker builds it and a resumed run sees the same data.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

# Salts keep the streams of independent decisions apart (a new decision must not shift the others' numbers).
SALT_SAMPLE = 0
SALT_EPOCH_ORDER = 1
SALT_MIX = 2
SALT_DISTRACTOR = 3


def sample_rng(seed: int, index: int, salt: int = SALT_SAMPLE) -> np.random.Generator:
    """The generator for one decision stream of sample `index`; a pure function of (seed, index, salt)."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(salt)])


@dataclass(frozen=True)
class GapSchedule:
    """Max frame gap by training iteration: ``steps = [(first_iteration, max_gap), ...]`` (a curriculum).

    STCN grows the gap during training (5 -> 10 -> 15 -> 20 -> 25 -> 5); the LMRC paper uses a fixed 10.
    """

    steps: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        steps = tuple((int(i), int(g)) for i, g in self.steps)
        if not steps or steps[0][0] != 0:
            raise ValueError("GapSchedule needs a step starting at iteration 0, e.g. [(0, 5), (10000, 10)]")
        if any(b[0] <= a[0] for a, b in zip(steps, steps[1:])):
            raise ValueError(f"GapSchedule iterations must increase: {steps}")
        if any(g < 1 for _, g in steps):
            raise ValueError(f"GapSchedule gaps must be >= 1: {steps}")
        object.__setattr__(self, "steps", steps)

    @classmethod
    def constant(cls, max_gap: int) -> "GapSchedule":
        return cls(((0, max_gap),))

    @classmethod
    def from_fractions(cls, total_iterations: int, fractions: Sequence[float], gaps: Sequence[int]) -> "GapSchedule":
        """Gap ``gaps[k]`` from ``fractions[k] * total_iterations`` on; ``fractions[0]`` must be 0."""
        if len(fractions) != len(gaps):
            raise ValueError("fractions and gaps must have the same length")
        return cls(tuple((int(round(f * total_iterations)), g) for f, g in zip(fractions, gaps)))

    def at(self, iteration: int) -> int:
        starts = [s for s, _ in self.steps]
        return self.steps[bisect.bisect_right(starts, iteration) - 1][1]

    @property
    def largest(self) -> int:
        return max(g for _, g in self.steps)


def as_schedule(max_gap: int | GapSchedule | Sequence[tuple[int, int]]) -> GapSchedule:
    if isinstance(max_gap, GapSchedule):
        return max_gap
    if isinstance(max_gap, int):
        return GapSchedule.constant(max_gap)
    return GapSchedule(tuple(max_gap))


def choose_frames(count: int, max_gap: int, rng: np.random.Generator, num_frames: int = 3) -> list[int]:
    """`num_frames` distinct positions in ``range(count)``, increasing, with ``last - first <= max_gap``.

    Uniform over all such sets: the first position is drawn with weight equal to the number of sets starting
    there, the rest from the window after it. Positions index the sequence's *annotated* frames.
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    if count < num_frames:
        raise ValueError(f"need {num_frames} annotated frames, the sequence has {count}")
    if max_gap < num_frames - 1:
        raise ValueError(f"max_gap {max_gap} cannot hold {num_frames} different frames; use >= {num_frames - 1}")
    rest = num_frames - 1
    # Sets starting at `first`: choose `rest` of the min(max_gap, count - 1 - first) later positions.
    room = np.minimum(max_gap, count - 1 - np.arange(count))
    weights = np.array([_comb(int(r), rest) for r in room], dtype=np.float64)
    first = int(rng.choice(count, p=weights / weights.sum()))
    later = rng.choice(np.arange(first + 1, first + 1 + int(room[first])), size=rest, replace=False)
    return [first] + sorted(int(p) for p in later)


def _comb(n: int, k: int) -> int:
    if k > n:
        return 0
    out = 1
    for i in range(k):
        out = out * (n - i) // (i + 1)
    return out


def objects_present(ids: np.ndarray, min_pixels: int = 1) -> list[int]:
    """Object ids (ascending, background 0 excluded) with at least `min_pixels` pixels in an id mask."""
    counts = np.bincount(np.asarray(ids, dtype=np.uint8).reshape(-1), minlength=256)
    return [int(i) for i in np.nonzero(counts >= max(min_pixels, 1))[0] if i != 0]


def choose_objects(candidates: Sequence[int], max_objects: int, rng: np.random.Generator) -> list[int]:
    """Up to `max_objects` of `candidates`, in random order (the network must not learn an id order)."""
    candidates = list(candidates)
    order = rng.permutation(len(candidates))
    return [int(candidates[i]) for i in order[:max_objects]]


class TrainingIndexSampler(Sampler[int]):
    """Global sample indices ``start, start+1, ... total-1`` (this rank's share): the resumable data order.

    Samples are random functions of their index, so no shuffling is needed here. To resume at iteration ``it``
    with global batch size ``B`` (all ranks), pass ``start = it * B``. With ``world_size`` ranks each takes the
    indices ``i % world_size == rank``; give each rank's DataLoader ``batch_size = B // world_size``.
    """

    def __init__(self, total: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.total, self.start, self.rank, self.world_size = int(total), int(start), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        first = self.start + (self.rank - self.start) % self.world_size
        return iter(range(first, self.total, self.world_size))

    def __len__(self) -> int:
        first = self.start + (self.rank - self.start) % self.world_size
        return max(0, (self.total - first + self.world_size - 1) // self.world_size)


def epoch_permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    """The visiting order of `count` items in one epoch (every item once per epoch)."""
    return sample_rng(seed, epoch, SALT_EPOCH_ORDER).permutation(count)


def pack_sample(
    images: torch.Tensor,
    ids: torch.Tensor,
    object_ids: Sequence[int],
    max_objects: int,
    info: dict,
    min_pixels: int = 1,
) -> dict:
    """The sample dict (see ``lmrc.data.datasets``) from augmented frames T x 3 x H x W and id masks T x H x W.

    An object that is not in the first frame after augmentation is marked invalid and its masks zeroed: with no
    reference mask the network cannot be asked to segment it.
    """
    t, _, h, w = images.shape
    masks = torch.zeros(t, max_objects, h, w, dtype=torch.float32)
    valid = torch.zeros(max_objects, dtype=torch.bool)
    padded = torch.zeros(max_objects, dtype=torch.long)
    for k, obj in enumerate(list(object_ids)[:max_objects]):
        channel = ids == obj
        if int(channel[0].sum()) >= min_pixels:
            masks[:, k] = channel.float()
            valid[k] = True
            padded[k] = obj
    out_info = dict(info)
    out_info["object_ids"] = padded  # 0 where the slot is empty or invalid
    return {"images": images.float().clamp(0, 1), "masks": masks, "valid_objects": valid, "info": out_info}
