"""`lmrc app` in a real browser: headless Debian Chromium driven by Selenium, against a server on 127.0.0.1.

The page is used as a person would: type a path or pick a file, drag a box on the canvas, press buttons, download
the export. The model is the shipped lmrc-lite at a 240-pixel processing size, for speed.
"""
from __future__ import annotations

import io
import json
import shutil
import threading
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.app.engine import Engine
from lmrc.app.server import App, make_server
from lmrc.app.session import Limits
from lmrc.data.masks import read_mask
from lmrc.data.video import open_frames

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "demo" / "clip.mp4"
LAST_MASK = ROOT / "demo" / "last_mask.png"  # ground truth of the clip's last frame (DAVIS 2016, horsejump-low)
FIRST_MASK = ROOT / "demo" / "first_mask.png"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium: pip install selenium")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# --- servers and browsers ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    from lmrc.model.weights import load_model

    return Engine(load_model("lmrc-lite"), size=240)


class Running:
    def __init__(self, app: App):
        self.app = app
        self.server = make_server(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.shutdown()


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
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def make(downloads: Path | None = None):
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)  # with the driver's path given, Selenium Manager downloads nothing
        profile = tmp_path / f"profile{len(drivers)}"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}", "--window-size=1400,1000"):
            options.add_argument(flag)
        if downloads is not None:
            options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                      "download.prompt_for_download": False})
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


def wait(driver, condition, timeout: float = 60, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), what)


def body(driver, key: str) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute(f"data-{key}") or ""


def message(driver) -> str:
    return driver.find_element(By.ID, "message").text


def wait_message(driver, text: str, timeout: float = 30) -> str:
    wait(driver, lambda d: text in message(d), timeout, f"a message with {text!r}; the page says {message(driver)!r}")
    return message(driver)


def load_page(driver, url: str) -> str:
    driver.get(url)
    wait(driver, lambda d: body(d, "session"), 30, "a session")
    return body(driver, "session")


def open_path(driver, path: Path | str, frames: int) -> None:
    field = driver.find_element(By.ID, "path")
    field.clear()
    field.send_keys(str(path))
    driver.find_element(By.ID, "open").click()
    wait(driver, lambda d: body(d, "job") == "open:done" and body(d, "frames") == str(frames), 60,
         f"the video to open; the page says {message(driver)!r}")


def drag_box(driver, box: tuple[float, float, float, float], width: int, height: int) -> None:
    """A mouse drag on the canvas from (x0, y0) to (x1, y1), in frame pixels."""
    canvas = driver.find_element(By.ID, "canvas")
    rect = canvas.rect
    sx, sy = rect["width"] / width, rect["height"] / height
    x0, y0, x1, y1 = box
    # Selenium 4 offsets are from the element's centre
    start = (x0 * sx - rect["width"] / 2, y0 * sy - rect["height"] / 2)
    ActionChains(driver).move_to_element_with_offset(canvas, int(start[0]), int(start[1])).click_and_hold() \
        .move_by_offset(int((x1 - x0) * sx / 2), int((y1 - y0) * sy / 2)) \
        .move_by_offset(int((x1 - x0) * sx / 2), int((y1 - y0) * sy / 2)).release().perform()


def wait_masked(driver, count: int, timeout: float = 60) -> None:
    wait(driver, lambda d: body(d, "masked") == str(count), timeout,
         f"{count} masked frames; the page says {message(driver)!r}")


def propagate(driver, timeout: float = 150) -> None:
    driver.find_element(By.ID, "propagate").click()
    wait(driver, lambda d: body(d, "job") == "propagate:done", timeout,
         f"the propagation to finish; the page says {message(driver)!r}")


def export(driver, downloads: Path, kind: str, name: str, timeout: float = 60) -> Path:
    driver.find_element(By.ID, f"export-{kind}").click()
    target = downloads / name
    wait(driver, lambda d: target.exists() and not list(downloads.glob("*.crdownload")), timeout,
         f"{name} to download; the page says {message(driver)!r}")
    return target


def canvas_mean(driver) -> float:
    return driver.execute_script(
        "const c = document.getElementById('canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + 2 * d[i + 2]; return s / (d.length / 4);")


def go_to_frame(driver, index: int) -> None:
    driver.execute_script("const s = document.getElementById('frame'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", index)
    wait(driver, lambda d: body(d, "shown").split(":")[1] == str(index), 20, f"frame {index} to show")


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
    assert "frames/s" in driver.find_element(By.ID, "progress-text").text
    wait_masked(driver, 60)

    masks = export(driver, downloads, "masks", "clip_masks.zip")
    with zipfile.ZipFile(masks) as archive:
        names = sorted(archive.namelist())
        assert names == [f"clip/{i:05d}.png" for i in range(60)]  # DAVIS layout
        first = Image.open(io.BytesIO(archive.read(names[0])))
        last = Image.open(io.BytesIO(archive.read(names[-1])))
        assert first.mode == "P" and last.mode == "P"
        first, last = np.array(first), np.array(last)
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


def choose_tool(driver, tool: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"input[name=tool][value={tool}]").click()


def stroke(driver, path: list[tuple[float, float]], width: int, height: int) -> None:
    """A mouse drag along `path` (frame pixels) on the canvas."""
    canvas = driver.find_element(By.ID, "canvas")
    rect = canvas.rect
    sx, sy = rect["width"] / width, rect["height"] / height
    chain = ActionChains(driver).move_to_element_with_offset(
        canvas, int(path[0][0] * sx - rect["width"] / 2), int(path[0][1] * sy - rect["height"] / 2)).click_and_hold()
    for (xa, ya), (xb, yb) in zip(path, path[1:]):
        chain = chain.move_by_offset(int((xb - xa) * sx), int((yb - ya) * sy))
    chain.release().perform()


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
    open_path(driver, short_clip, 8)
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
