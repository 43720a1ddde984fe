"""`lmrc app`'s engine without a browser: the reliability maps it saves are `Segmenter.reliability` of the frame
at the processing size, frames before the first prompt come from the backward pass, and an idle segmenter (its
inference copy) is reused by the next propagation with the same result."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.app.engine import Engine
from lmrc.app.session import Limits, Session
from lmrc.data.masks import read_mask
from lmrc.data.video import open_frames
from lmrc.inference.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "demo" / "clip.mp4"
FIRST_MASK = ROOT / "demo" / "first_mask.png"


@pytest.fixture(scope="module")
def model():
    from lmrc.model.weights import load_model

    return load_model("lmrc-lite")


@pytest.fixture
def session(tmp_path) -> Session:
    """The demo clip's first 5 frames, opened in a session, with the horse's mask given on frame 2."""
    folder = tmp_path / "horse5"
    folder.mkdir()
    for frame in open_frames(CLIP):
        if frame.index == 5:
            break
        Image.fromarray(frame.rgb).save(folder / f"{frame.index:05d}.jpg", quality=95)
    session = Session("test-engine", Limits(), root=tmp_path)
    session.open(folder).thread.join()
    session.write_ids(2, (read_mask(FIRST_MASK) > 0).astype(np.uint8))
    session.prompt_frames.add(2)
    yield session
    session.close()


def saved_maps(session: Session, index: int) -> dict[str, np.ndarray]:
    with np.load(session.reliability_path(index)) as maps:
        return {name: maps[name] for name in maps.files}


def test_saved_maps_are_the_segmenters_reliability_and_the_pool_reuses_segmenters(model, session):
    engine = Engine(model, size=96, precision="fp32")
    job = session.propagate(engine.propagate)
    job.thread.join()
    assert job.state == "done", job.message
    masks = [session.ids(i) for i in range(5)]
    assert all(m is not None and m.any() for m in masks)
    # frames 0-1 are predicted by the backward pass, 3-4 by the forward one; frame 2 is the prompt (no maps)
    assert [session.reliability_path(i).exists() for i in range(5)] == [True, True, False, True, True]

    reference = Segmenter(model, engine.config)  # forward from the prompt, as the forward pass
    reference.step(session.frame_rgb(2), session.ids(2))
    reference.step(session.frame_rgb(3))
    expected = {name: (h.clamp(0, 1) * 255).round().byte().numpy()
                for name, h in reference.reliability_at(reference.process_size).items()}
    saved = saved_maps(session, 3)
    assert expected and set(saved) == set(expected)
    for name, weight in saved.items():
        assert weight.shape == reference.process_size and weight.dtype == np.uint8
        assert np.abs(weight.astype(int) - expected[name].astype(int)).max() <= 1, name
        assert weight.std() > 0, f"{name}: a flat map"  # H varies over the frame (eq. 10)

    (pooled,) = engine._idle
    assert pooled.frames is None and pooled.object_ids == []  # idle: detached, no video's memory
    first_maps = saved_maps(session, 0)
    job = session.propagate(engine.propagate)
    job.thread.join()
    assert job.state == "done", job.message
    assert engine._idle == [pooled]  # the same inference copy served the second run
    assert all(np.array_equal(session.ids(i), masks[i]) for i in range(5))
    assert all(np.array_equal(saved_maps(session, 0)[n], m) for n, m in first_maps.items())
