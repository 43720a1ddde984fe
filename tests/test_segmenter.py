"""The streaming Segmenter and its memory bank: shapes, schedule, bounded memory, objects added mid-video, bf16.

An untrained network cannot be judged on quality: these tests check the mechanics, with tiny frames (size 32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmrc.config import model_config
from lmrc.inference.memory_bank import MemoryBank
from lmrc.inference.segmenter import Segmenter, output_prob_to_mask
from lmrc.model.network import LMRC

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
H, W = 37, 53  # odd sizes: resizing and padding both have work to do



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LMRC(model_config("lmrc-lite"), pretrained_backbone=False).eval()


def frames(count: int, h: int = H, w: int = W, seed: int = 0) -> list[np.ndarray]:
    """A square sliding right over a noisy background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    out = []
    for t in range(count):
        f = background.copy()
        f[8:20, 5 + t: 17 + t] = (230, 40, 40)
        out.append(f)
    return out


def box(object_id: int, rows: slice, cols: slice, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[rows, cols] = object_id
    return m


FIRST = box(1, slice(8, 20), slice(5, 17))


def test_output_shape_sum_and_given_mask(model):
    seg = Segmenter(model, size=32)
    video = frames(4)
    probs = seg.step(video[0], FIRST)
    assert probs.shape == (2, H, W) and probs.dtype == torch.float32
    np.testing.assert_array_equal(output_prob_to_mask(probs, seg.object_ids), FIRST)  # the prompt comes back exact
    for f in video[1:]:
        probs = seg.step(f)
        assert probs.shape == (2, H, W)
        torch.testing.assert_close(probs.sum(0), torch.ones(H, W), atol=1e-5, rtol=0)
        assert probs.min() >= 0 and probs.max() <= 1
        assert set(np.unique(output_prob_to_mask(probs, seg.object_ids))) <= {0, 1}
    assert seg.object_ids == [1]
    assert seg.process_size == (32, round(W * 32 / H))


def test_tensor_frames_give_the_same_result_as_uint8(model):
    video = frames(3)
    a, b = Segmenter(model, size=32), Segmenter(model, size=32)
    for i, f in enumerate(video):
        mask = FIRST if i == 0 else None
        pa = a.step(f, mask)
        pb = b.step(torch.from_numpy(f).permute(2, 0, 1).float() / 255, None if mask is None else torch.from_numpy(mask))
        torch.testing.assert_close(pa, pb)


def test_frames_before_the_first_mask_are_background(model):
    seg = Segmenter(model, size=32, mem_every=2)
    video = frames(5)
    for f in video[:2]:
        probs = seg.step(f)
        assert probs.shape == (1, H, W) and bool((probs == 1).all())
    seg.step(video[2], FIRST)
    seg.step(video[3])
    seg.step(video[4])
    assert seg.memory_frames == [2, 4]  # the schedule counts from the first mask


@pytest.mark.parametrize("mem_every, limit, expected", [
    (3, None, [0, 3, 6, 9]),
    (3, 3, [0, 6, 9]),
    (1, 4, [0, 8, 9, 10]),
])
def test_memory_schedule(model, mem_every, limit, expected):
    seg = Segmenter(model, size=32, mem_every=mem_every, max_memory_frames=limit)
    for i, f in enumerate(frames(11)):
        seg.step(f, FIRST if i == 0 else None)
    assert seg.memory_frames == expected
    assert seg.memory.local_frame == 10  # the previous frame is always the local memory


def test_prompt_frames_stay_in_bounded_memory(model):
    # Prompts at 0 and 4 are pinned; only the other frames rotate.
    seg = Segmenter(model, size=32, mem_every=2, max_memory_frames=3)
    kept = []
    for i, f in enumerate(frames(10)):
        mask = FIRST if i == 0 else box(2, slice(25, 33), slice(30, 40)) if i == 4 else None
        seg.step(f, mask)
        kept.append(seg.memory_frames)
    assert kept[2] == [0, 2] and kept[4] == [0, 2, 4] and kept[6] == [0, 4, 6] and kept[9] == [0, 4, 8]


def test_memory_stays_flat_with_max_memory_frames(model):
    seg = Segmenter(model, size=32, mem_every=1, max_memory_frames=4)
    video = frames(60, 32, 48)  # mem_every=1: every frame enters memory, the hardest case
    shapes, sizes, pointers = [], [], set()
    for i, f in enumerate(video):
        seg.step(f, FIRST[:32, :48] if i == 0 else None)
        shapes.append((tuple(seg.memory.keys.shape), tuple(seg.memory.values.shape)))
        sizes.append(seg.memory.nbytes())
        if i >= 4:
            pointers.add(seg.memory.keys.data_ptr())
    assert seg.memory.capacity == 4
    assert len(set(shapes[4:])) == 1 and len(set(sizes[4:])) == 1  # no growth once full
    assert len(pointers) == 1  # nor reallocation: old slots are overwritten in place
    assert seg.memory_frames == [0, 57, 58, 59]
    positions = seg.memory.feature_size[0] * seg.memory.feature_size[1]
    assert seg.memory.memory_for(seg.memory.groups[0]).global_keys.shape[-1] == 4 * positions


def test_unbounded_memory_grows_geometrically(model):
    bank = MemoryBank(initial_capacity=2)
    bank.add_objects(1, start=0)
    capacities, pointers = [], []
    for t in range(9):
        bank.add_global(t, torch.randn(1, 4, 2, 3), torch.randn(1, 1, 5, 2, 3), pinned=t == 0)
        capacities.append(bank.capacity)
        pointers.append(bank.keys.data_ptr())
    assert capacities == [2, 2, 4, 4, 8, 8, 8, 8, 16]
    assert len(set(pointers)) == 4  # reallocated only when doubling
    mem = bank.memory_for(bank.groups[0])
    assert mem.global_keys.shape == (1, 4, 9 * 6) and mem.global_values.shape == (1, 1, 5, 9 * 6)
    assert mem.global_keys.data_ptr() == bank.keys.data_ptr()  # a view, not a copy
    assert mem.global_values.data_ptr() == bank.values.data_ptr()
    # the top-k read gathers one row (all channels) per memory position: the values are such rows already
    assert mem.global_values.flatten(1, 2).transpose(1, 2).is_contiguous()


def test_memory_bank_values_match_the_frames_they_came_from():
    bank = MemoryBank(max_frames=3)
    bank.add_objects(1, start=0)
    keys = {t: torch.full((1, 2, 1, 2), float(t)) for t in range(0, 12, 2)}
    for t, k in keys.items():
        bank.add_global(t, k, k[:, None].expand(1, 1, 2, 1, 2) * 10, pinned=t == 0)
    assert bank.frames == [0, 8, 10]
    mem = bank.memory_for(bank.groups[0])
    held = sorted(set(mem.global_keys[0, 0].tolist()))
    assert held == [0.0, 8.0, 10.0]
    torch.testing.assert_close(mem.global_values[0, 0], mem.global_keys[0] * 10)


def test_new_object_mid_video_reads_only_its_own_frames(model):
    seg = Segmenter(model, size=32, mem_every=2)
    second = box(2, slice(25, 33), slice(30, 40))
    channels = []
    for i, f in enumerate(frames(8)):
        probs = seg.step(f, FIRST if i == 0 else second if i == 3 else None)
        channels.append(probs.shape[0])
        ids = output_prob_to_mask(probs, seg.object_ids)
        assert set(np.unique(ids)) <= ({0, 1} if i < 3 else {0, 1, 2})
        if i == 3:
            assert (ids[second == 2] == 2).all()  # the given mask wins over the prediction of object 1
            assert (probs[1][second == 2] == 0).all() and (probs[2][second != 2] == 0).all()
    assert channels == [2, 2, 2, 3, 3, 3, 3, 3]  # object 2 has a probability only from frame 3 on
    assert seg.object_ids == [1, 2]
    assert seg.memory_frames == [0, 2, 3, 4, 6]
    first_group, second_group = seg.memory.groups
    assert (first_group.start, second_group.start) == (0, 3)
    positions = seg.memory.feature_size[0] * seg.memory.feature_size[1]
    old, new = seg.memory.memory_for(first_group), seg.memory.memory_for(second_group)
    assert old.global_keys.shape[-1] == 5 * positions and old.global_values.shape[1] == 1
    assert new.global_keys.shape[-1] == 3 * positions and new.global_values.shape[1] == 1  # frames 3, 4, 6 only
    slots = seg.memory.group_slots(second_group)
    assert sorted(seg.memory.slot_frame[s] for s in slots) == [3, 4, 6]


def test_updating_a_known_object_keeps_its_channel(model):
    seg = Segmenter(model, size=32)
    video = frames(3)
    seg.step(video[0], FIRST)
    seg.step(video[1])
    moved = box(1, slice(10, 22), slice(8, 20))
    probs = seg.step(video[2], moved)
    assert seg.object_ids == [1] and len(seg.memory.groups) == 1
    np.testing.assert_array_equal(output_prob_to_mask(probs, [1]), moved)


def test_bf16_and_fp16_run_and_store_reduced_memory(model):
    video = frames(4)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        seg = Segmenter(model, size=32, mem_every=2, precision=precision)
        for i, f in enumerate(video):
            probs = seg.step(f, FIRST if i == 0 else None)
            assert probs.dtype == torch.float32 and bool(torch.isfinite(probs).all())
            torch.testing.assert_close(probs.sum(0), torch.ones(H, W), atol=1e-4, rtol=0)
        assert seg.memory.keys.dtype == dtype  # autocast was in effect
        assert seg.memory_frames == [0, 2]


def test_misuse_is_reported(model):
    seg = Segmenter(model, size=32)
    seg.step(frames(1)[0], FIRST)
    with pytest.raises(ValueError, match="call reset"):
        seg.step(frames(1, 40, 40)[0])
    with pytest.raises(ValueError, match="like its frame"):
        seg.step(frames(1)[0], FIRST[:30])
    with pytest.raises(ValueError, match="no pixel"):
        seg.step(frames(1)[0], FIRST, objects=[5])
    with pytest.raises(ValueError, match="precision"):
        Segmenter(model, precision="int8")
    seg.reset()
    assert seg.step(frames(1, 40, 40)[0]).shape == (1, 40, 40)


def test_output_prob_to_mask():
    probs = torch.zeros(3, 2, 2)
    probs[0, 0, 0] = probs[1, 0, 1] = probs[2, 1, :] = 1
    np.testing.assert_array_equal(output_prob_to_mask(probs, [4, 7]), [[0, 4], [7, 7]])
    with pytest.raises(ValueError):
        output_prob_to_mask(probs, [4])
    # ties go to the first channel, as argmax's do (equal probabilities are common: an empty channel, a clamp)
    tied = torch.randint(0, 3, (4, 60, 70)).float() / 2
    lookup = np.array([0, 3, 5, 9], np.uint8)
    np.testing.assert_array_equal(output_prob_to_mask(tied, [3, 5, 9]), lookup[tied.argmax(0).numpy()])


JUDO = DATA / "cutie_examples"


@pytest.mark.skipif(not (JUDO / "JPEGImages" / "480p" / "judo").is_dir(), reason=f"cutie examples not found at {JUDO}")
def test_judo_objects_appear_at_their_frames(model):
    from lmrc.data.video import open_frames
    from lmrc.inference.io import load_prompts

    source = open_frames(JUDO / "JPEGImages" / "480p" / "judo")
    with pytest.warns(UserWarning, match="853x480"):  # judo/00005.png is one pixel narrow
        prompts = load_prompts(JUDO / "Annotations" / "480p" / "judo", source)
    seg = Segmenter(model, size=32, mem_every=5)
    channels = []
    for frame in source:
        probs = seg.step(frame.rgb, prompts.masks.get(frame.index))
        assert probs.shape[1:] == (480, 854)
        channels.append(probs.shape[0] - 1)
        ids = output_prob_to_mask(probs, seg.object_ids)
        assert set(np.unique(ids).tolist()) <= {0, *seg.object_ids}
    assert seg.object_ids == [1, 2, 3, 4]
    assert channels == [1] * 5 + [2] * 3 + [3] * 5 + [4] * 3
    assert [g.start for g in seg.memory.groups] == [0, 5, 8, 13]
    assert seg.memory_frames == [0, 5, 8, 10, 13, 15]


def test_public_api_and_segment_video_give_what_the_segmenter_gives(model):
    import lmrc

    assert lmrc.Segmenter is Segmenter and lmrc.InferenceConfig().precision == "auto"
    assert callable(lmrc.load_model) and callable(lmrc.segment_video)
    config = lmrc.InferenceConfig(size=32, mem_every=2, precision="fp32", device="cpu")
    video = frames(5)
    later = np.zeros((H, W), np.uint8)
    later[2:8, 2:8] = 3  # an object that starts at frame 2: prompts are per frame
    prompts = {0: FIRST, 2: later}
    reference = Segmenter(model, config)
    expected = [reference.step(f, prompts.get(i)) for i, f in enumerate(video)]
    got = list(lmrc.segment_video(video, prompts, config, model, backward=False))  # the streaming result
    assert [i for i, _, _ in got] == list(range(5))
    for (_, ids, probs), want in zip(got, expected):
        np.testing.assert_array_equal(ids, reference.probs_to_ids(want) if want.shape[0] == 3
                                      else output_prob_to_mask(want, [1]))
    for (_, _, probs), want in list(zip(got, expected))[2:]:  # every object known: the same channels
        torch.testing.assert_close(probs, want.cpu())
    np.testing.assert_array_equal(reference.probs_to_ids(expected[-1]), output_prob_to_mask(expected[-1], [1, 3]))
    # both ways (the default): object 3 is also segmented before its first mask, by a pass over reversed frames
    both = list(lmrc.segment_video(video, prompts, config, model))
    assert all(probs.shape[0] == 3 for _, _, probs in both)
    np.testing.assert_array_equal(both[-1][1], got[-1][1])


def test_segmenter_leaves_the_model_alone_and_is_reused_across_videos(model):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seg = Segmenter(model, size=32, precision="fp32")
    inference = seg.model
    first = [seg.step(f, FIRST if i == 0 else None) for i, f in enumerate(frames(3))]
    assert model.training and all(p.requires_grad for p in model.parameters())  # not put in eval mode or frozen
    assert list(model.state_dict()) == list(before)  # not rewritten (BatchNorm folding happens in the copy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype and v.device == before[k].device
    seg.reset()
    again = [seg.step(f, FIRST if i == 0 else None) for i, f in enumerate(frames(3))]
    assert seg.model is inference  # the same inference copy for the next video
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)
    model.eval()
