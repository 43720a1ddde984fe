"""Helpers to drive `lmrc app` in headless Debian Chromium with Selenium (the browser tests and the docs'
screenshots). Nothing here downloads a browser or a driver: both are the system's."""
from __future__ import annotations

import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from lmrc.app.server import App, make_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"


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


def start_chrome(profile: Path, downloads: Path | None = None, size: str = "1400,1000") -> webdriver.Chrome:
    """A fresh headless Chromium with its own profile folder; downloads go to `downloads` without asking."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path given, Selenium Manager downloads nothing
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={size}"):
        options.add_argument(flag)
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def wait(driver, condition, timeout: float = 60, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), what)


def body(driver, key: str) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute(f"data-{key}") or ""


def job_number(driver) -> int:
    return int(body(driver, "job-number") or 0)


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
    earlier = job_number(driver)
    driver.find_element(By.ID, "open").click()
    wait(driver, lambda d: job_number(d) > earlier and body(d, "job") == "open:done"
         and body(d, "frames") == str(frames), 60,
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
    """Click propagate and wait for that job (not an earlier one, which may also say done) to finish."""
    earlier = job_number(driver)
    driver.find_element(By.ID, "propagate").click()
    wait(driver, lambda d: job_number(d) > earlier and body(d, "job") == "propagate:done", timeout,
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
