"""`lmrc app` in a real browser: headless Debian Chromium driven by Selenium, against a server on 127.0.0.1.

The page is used as a person would: type a path or pick a file, drag a box on the canvas, press buttons, download
the export. The model is the shipped lmrc-lite at a 240-pixel processing size, for speed.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.app.engine import Engine
from lmrc.app.server import App
from lmrc.app.session import Limits
from lmrc.data.masks import read_mask
from lmrc.data.video import open_frames

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "demo" / "clip.mp4"
LAST_MASK = ROOT / "demo" / "last_mask.png"  # ground truth of the clip's last frame (DAVIS 2016, horsejump-low)
FIRST_MASK = ROOT / "demo" / "first_mask.png"

pytest.importorskip("selenium", reason="the browser tests need selenium: pip install selenium (the test extra)")
sys.path.insert(0, str(Path(__file__).parent))
from app_browser import (CHROMEDRIVER, CHROMIUM, INSTALL, Running, body, canvas_mean, choose_tool,  # noqa: E402
                         drag_box, export, go_to_frame, load_page, message, open_path, propagate, start_chrome,
                         stroke, wait, wait_masked, wait_message)
from selenium.webdriver.common.by import By  # noqa: E402


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# --- servers and browsers ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    from lmrc.model.weights import load_model

    return Engine(load_model("lmrc-lite"), size=192)


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    running = Running(App(engine, Limits(), cache_root=tmp_path_factory.mktemp("cache")))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chrome_ready():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"Chromium or its driver is missing ({CHROMIUM}, {CHROMEDRIVER}); install them: {INSTALL}")


@pytest.fixture
def open_browser(chrome_ready, tmp_path):
    """browser(downloads=None) -> a fresh headless Chromium (its own profile); all are quit at the end."""
    drivers = []

    def make(downloads: Path | None = None):
        drivers.append(start_chrome(tmp_path / f"profile{len(drivers)}", downloads))
        return drivers[-1]

    yield make
    for driver in drivers:
        driver.quit()


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory) -> Path:
    """The demo clip's first 8 frames as a folder of JPEGs."""
    folder = tmp_path_factory.mktemp("short") / "horse8"
    folder.mkdir()
    for frame in open_frames(CLIP):
        if frame.index == 8:
            break
        Image.fromarray(frame.rgb).save(folder / f"{frame.index:05d}.jpg", quality=95)
    return folder


# --- the whole path: open, box, propagate, export --------------------------------------------------------------------

def test_box_propagate_export_reaches_the_last_frame(server, open_browser, tmp_path):
    """Upload the demo clip, drag a box around the horse on frame 0, propagate, export: the last frame's exported
    mask overlaps the ground truth (IoU >= 0.5). The reliability view draws over the frame; the overlay and cut-out
    exports hold every frame."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = open_browser(downloads)
    load_page(driver, server.url)
    driver.find_element(By.ID, "upload-video").send_keys(str(CLIP))
    wait(driver, lambda d: body(d, "job") == "open:done" and body(d, "frames") == "60", 60, "the upload to open")

    truth = read_mask(FIRST_MASK) > 0
    ys, xs = np.nonzero(truth)
    drag_box(driver, (xs.min() - 6, ys.min() - 6, xs.max() + 6, ys.max() + 6), 854, 480)
    wait_masked(driver, 1)
    assert "object 1" in driver.find_element(By.ID, "objects").text

    propagate(driver)
    progress = driver.find_element(By.ID, "progress-text").text
    print(progress)
    assert "frames/s" in progress
    wait_masked(driver, 60)

    masks = export(driver, downloads, "masks", "clip_masks.zip")
    with zipfile.ZipFile(masks) as archive:
        names = sorted(archive.namelist())
        assert names == [f"clip/{i:05d}.png" for i in range(60)]  # DAVIS layout
        first = Image.open(io.BytesIO(archive.read(names[0])))
        last = Image.open(io.BytesIO(archive.read(names[-1])))
        assert first.mode == "P" and last.mode == "P"
        first, last = np.array(first), np.array(last)
    print(f"IoU first frame {iou(first > 0, truth):.3f}, last frame {iou(last > 0, read_mask(LAST_MASK) > 0):.3f}")
    assert iou(first > 0, truth) >= 0.5
    assert iou(last > 0, read_mask(LAST_MASK) > 0) >= 0.5

    # the comparator's map over frame 30 changes what the canvas shows
    go_to_frame(driver, 30)
    plain = canvas_mean(driver)
    driver.find_element(By.ID, "show-reliability").click()
    wait(driver, lambda d: abs(canvas_mean(d) - plain) > 1, 20, "the reliability map to be drawn")

    overlay = export(driver, downloads, "overlay", "clip_overlay.mp4")
    assert open_frames(overlay).num_frames == 60
    cutout = export(driver, downloads, "cutout", "clip_cutout.zip")
    with zipfile.ZipFile(cutout) as archive:
        rgba = np.array(Image.open(io.BytesIO(archive.read("clip/00059.png"))))
    assert rgba.shape == (480, 854, 4)
    np.testing.assert_array_equal(rgba[..., 3] > 0, last > 0)


def test_correct_a_frame_and_repropagate(server, open_browser, tmp_path, short_clip):
    """A box on frame 4 propagates backward to frame 0 and forward to the end; a second object added on frame 6
    and a second propagation: frame 6 keeps exactly the mask drawn there (it is a prompt), the new object reaches
    frames 0 and 7, and frame 4 (the first prompt) keeps its object."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = open_browser(downloads)
    sid = load_page(driver, server.url)
    open_path(driver, short_clip, 8)
    go_to_frame(driver, 4)
    drag_box(driver, (130, 130, 482, 400), 854, 480)
    wait_masked(driver, 1)
    propagate(driver, 60)
    wait_masked(driver, 8)
    session = server.app.sessions[sid]
    before = [session.ids(i) for i in range(8)]
    assert all((ids == 1).any() for ids in before)

    go_to_frame(driver, 6)
    driver.find_element(By.ID, "add-object").click()
    wait(driver, lambda d: "object 2" in d.find_element(By.ID, "objects").text, 10, "a second object")
    drag_box(driver, (600, 150, 800, 400), 854, 480)  # the jump obstacle on the right
    wait(driver, lambda d: (session.ids(6) == 2).any(), 30, "object 2 on frame 6")
    drawn = session.ids(6).copy()
    assert json.loads(driver.execute_script("return JSON.stringify(status.prompt_frames)")) == [4, 6]

    propagate(driver, 60)
    after = [session.ids(i) for i in range(8)]
    np.testing.assert_array_equal(after[6], drawn)
    assert (after[0] == 2).any() and (after[7] == 2).any()  # backward and forward from frame 6
    assert iou(after[4] == 1, before[4] == 1) > 0.95  # frame 4 is still its own prompt


def test_clicks_brush_and_eraser_edit_the_mask(server, open_browser, short_clip):
    driver = open_browser()
    sid = load_page(driver, server.url)
    open_path(driver, short_clip, 8)
    session = server.app.sessions[sid]
    drag_box(driver, (130, 130, 482, 400), 854, 480)
    wait_masked(driver, 1)
    boxed = session.ids(0) == 1
    assert not boxed[:100, 600:].any()  # the trees top right are outside the box

    def edited(before: np.ndarray):
        wait(driver, lambda d: not np.array_equal(session.ids(0) == 1, before), 30,
             f"the mask to change; the page says {message(driver)!r}")
        return session.ids(0) == 1

    choose_tool(driver, "brush")
    stroke(driver, [(650, 40), (700, 40), (750, 40)], 854, 480)
    painted = edited(boxed)
    assert painted[40, 650:750].all()  # brushed pixels are the object

    choose_tool(driver, "eraser")
    stroke(driver, [(300, 150), (300, 250), (300, 350)], 854, 480)
    edited_after = edited(painted)
    assert not edited_after[160:340, 300].any()  # erased pixels are not

    ys, xs = np.nonzero(edited_after[200:, 340:])  # an object pixel away from both strokes
    x, y = int(xs[len(xs) // 2]) + 340, int(ys[len(ys) // 2]) + 200
    choose_tool(driver, "negative")
    stroke(driver, [(x, y)], 854, 480)  # a click: press and release in place
    clicked = edited(edited_after)
    assert not clicked[y - 2:y + 3, x - 2:x + 3].any()  # "not the object" there
    assert clicked[40, 650:750].all()  # the brushed strip stays


# --- bad input, limits, sessions ---------------------------------------------------------------------------------------

def test_bad_input_is_reported_in_the_page_and_the_server_goes_on(server, engine, open_browser, tmp_path,
                                                                  short_clip):
    driver = open_browser()
    load_page(driver, server.url)

    not_video = tmp_path / "notes.txt"
    not_video.write_text("hello")
    open_field = driver.find_element(By.ID, "path")
    open_field.send_keys(str(not_video))
    driver.find_element(By.ID, "open").click()
    assert "cannot read" in wait_message(driver, "notes.txt")

    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"this is not a video" * 100)
    driver.find_element(By.ID, "upload-video").send_keys(str(fake))
    assert "not a video" in wait_message(driver, "fake.mp4")

    broken = tmp_path / "broken"
    shutil.copytree(short_clip, broken)
    (broken / "00003.jpg").write_bytes(b"\xff\xd8 truncated")
    open_field.clear()
    open_field.send_keys(str(broken))
    driver.find_element(By.ID, "open").click()
    text = wait_message(driver, "cannot be decoded")
    assert "00003.jpg" in text and "frame 3" in text

    open_path(driver, short_clip, 8)
    driver.find_element(By.ID, "propagate").click()
    assert "nothing to propagate" in wait_message(driver, "nothing to propagate")

    driver.find_element(By.ID, "box-input").send_keys("900,10,1000,100")
    driver.find_element(By.ID, "set-box").click()
    assert "outside the 854x480 frame" in wait_message(driver, "outside")

    driver.find_element(By.ID, "box-input").clear()
    driver.find_element(By.ID, "box-input").send_keys("130,130,482,400")  # the server still works
    driver.find_element(By.ID, "set-box").click()
    wait_masked(driver, 1)

    small = Running(App(engine, Limits(max_frames=30)))
    try:
        load_page(driver, small.url)
        field = driver.find_element(By.ID, "path")
        field.send_keys(str(CLIP))
        driver.find_element(By.ID, "open").click()
        assert "at most 30 frames" in wait_message(driver, "has 60 frames")
        small.app.limits = Limits(max_pixels=640 * 360)
        load_page(driver, small.url)  # limits are a session's from its start
        driver.find_element(By.ID, "path").send_keys(str(CLIP))
        driver.find_element(By.ID, "open").click()
        assert "0.2 megapixels" in wait_message(driver, "854x480 (0.4 megapixels)")
    finally:
        small.stop()


def test_two_tabs_never_share_objects_and_closing_removes_the_cache(server, open_browser, short_clip):
    driver = open_browser()
    first = load_page(driver, server.url)
    open_path(driver, short_clip, 8)
    drag_box(driver, (130, 130, 482, 400), 854, 480)
    wait_masked(driver, 1)
    first_tab = driver.current_window_handle

    driver.switch_to.new_window("tab")
    second = load_page(driver, server.url)
    assert second != first
    assert driver.find_element(By.ID, "frame-label").text == "no video"
    assert driver.find_element(By.ID, "objects").text == ""
    driver.find_element(By.ID, "upload-folder").send_keys(str(short_clip))  # this tab uploads the folder
    wait(driver, lambda d: body(d, "job") == "open:done" and body(d, "frames") == "8", 60,
         f"the uploaded folder to open; the page says {message(driver)!r}")
    assert body(driver, "masked") == "0" and driver.find_element(By.ID, "objects").text == ""

    cache = server.app.sessions[first].dir
    assert any((cache / "frames").iterdir())
    driver.switch_to.window(first_tab)
    driver.close()  # the tab's unload beacon ends its session
    wait(driver, lambda d: not cache.exists() and first not in server.app.sessions, 20, "the first tab's cache to go")
    assert second in server.app.sessions


def test_idle_and_shutdown_end_sessions(engine, tmp_path, short_clip):
    app = App(engine, Limits(), idle_seconds=3600, cache_root=tmp_path)
    idle, busy = app.new_session(), app.new_session()
    idle.open(short_clip).thread.join()
    idle.last_seen -= 7200
    assert app.reap() == [idle.id]
    assert not idle.dir.exists() and busy.dir.exists()
    app.shutdown()
    assert not busy.dir.exists() and app.sessions == {}


def test_ended_session_gets_a_clear_answer(server):
    request = urllib.request.Request(server.url + "api/status?sid=nope")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 410
    assert "reload the page" in json.load(raised.value)["error"]
    with urllib.request.urlopen(server.url, timeout=10) as page:  # and the page itself still loads
        assert b"<canvas" in page.read()
