"""Screenshots of each step of `lmrc app` on the demo clip, taken by headless Debian Chromium:

    python docs/screenshots/make_screenshots.py        # -> docs/screenshots/{1_open,2_box,3_propagated,4_reliability,5_export}.png

Needs chromium, chromium-driver (apt) and selenium (the test extra). Runs lmrc-lite at a 480-pixel processing size,
as `lmrc app` does by default (a minute or two on a CPU).
"""
from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from app_browser import (Running, canvas_mean, drag_box, export, go_to_frame, load_page, propagate, start_chrome,  # noqa: E402
                         wait, wait_masked)
from selenium.webdriver.common.by import By  # noqa: E402

from lmrc.app.engine import Engine  # noqa: E402
from lmrc.app.server import App  # noqa: E402
from lmrc.app.session import Limits  # noqa: E402
from lmrc.data.masks import read_mask  # noqa: E402
from lmrc.model.weights import load_model  # noqa: E402

OUT = Path(__file__).resolve().parent


def save(driver, name: str, colours: bool = False) -> None:
    """The page as shown, in 256 colours (dithered; a third of the size) unless `colours` (the heat map keeps all)."""
    from PIL import Image

    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    if not colours:
        image = image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    image.save(OUT / name, optimize=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "downloads").mkdir()
        running = Running(App(Engine(load_model("lmrc-lite"), size=480), Limits(), cache_root=scratch))
        driver = start_chrome(scratch / "profile", scratch / "downloads", size="1280,900")
        try:
            load_page(driver, running.url)
            driver.find_element(By.ID, "path").send_keys(str(ROOT / "demo" / "clip.mp4"))
            driver.find_element(By.ID, "open").click()
            wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-frames") == "60", 60)
            save(driver, "1_open.png")

            ys, xs = np.nonzero(read_mask(ROOT / "demo" / "first_mask.png"))
            drag_box(driver, (xs.min() - 6, ys.min() - 6, xs.max() + 6, ys.max() + 6), 854, 480)
            wait_masked(driver, 1)
            save(driver, "2_box.png")

            propagate(driver, 600)
            go_to_frame(driver, 40)
            save(driver, "3_propagated.png")

            plain = canvas_mean(driver)
            driver.find_element(By.ID, "show-reliability").click()
            wait(driver, lambda d: abs(canvas_mean(d) - plain) > 1, 20, "the reliability map")
            save(driver, "4_reliability.png", colours=True)
            driver.find_element(By.ID, "show-reliability").click()

            export(driver, scratch / "downloads", "masks", "clip_masks.zip")
            save(driver, "5_export.png")
        finally:
            driver.quit()
            running.stop()
    print(f"screenshots in {OUT}")


if __name__ == "__main__":
    main()
