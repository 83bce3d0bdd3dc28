"""Playground page (issue 7) in real headless Chromium against the real stack (Procfile via honcho).

Chromium and chromedriver are Debian's packages (/usr/bin/chromium, /usr/bin/chromedriver); where
missing they are installed with apt-get when that is possible (root, apt-get present, not disabled
by GROUNDING_BROWSER_INSTALL=0), otherwise every test here is skipped with the reason. Selenium
drives the browser with explicit binary paths, so Selenium Manager never downloads anything.
Screenshots of the page go to test-output/ at the repository root.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.stackutil import ROOT, Stack, fake_model, tiny_model

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (it belongs to the test extra)")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# The install step may take minutes on a fresh CI machine; the tests themselves take seconds.
pytestmark = [pytest.mark.browser, pytest.mark.timeout(720)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_TIMEOUT_S = 540
OUT_DIR = ROOT / "test-output"
API_KEY = "playground-test-key"
MODEL = "playground-tiny"
PIXEL_CAP = 1_500_000          # server.max_image_pixels: the oversized upload below exceeds it
SHOT_SIZE = (1280, 800)        # pixels of the generated screenshot (under the cap)
WAIT_S = 30


REPLICATED = "playground-two-split-replicas"   # listed after MODEL (by id), which stays the default


def playground_models() -> dict:
    """The tiny random-weight GUI-Actor checkpoint on real MLX (CPU): real attention maps, so the
    heatmap assertions see what a real model draws. max_pixels matches the page's "fast" profile.
    And a fake-engine model on four GPUs (named in the stack's CUDA_VISIBLE_DEVICES: none is used),
    two replicas each split over two, to show its replicas and their helper GPUs."""
    return {MODEL: tiny_model("qwen2_vl", max_pixels=1_048_576),
            REPLICATED: fake_model(devices=[0, 1, 2, 3], gpus_per_replica=2, preload=True,
                                   fake={"load_s": 0.05, "weights_bytes": 100_000_000, "helper_weights_bytes": 32 << 20})}


# ---------- browser ----------

def _install_chromium() -> str | None:
    """apt-get install chromium chromium-driver; None on success, else why it could not."""
    if os.environ.get("GROUNDING_BROWSER_INSTALL", "1") == "0":
        return "installing is disabled (GROUNDING_BROWSER_INSTALL=0)"
    if shutil.which("apt-get") is None:
        return "apt-get is not available on this machine"
    if os.geteuid() != 0:
        return "apt-get install needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out after {INSTALL_TIMEOUT_S}s"
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed with {done.returncode}: {done.stderr.strip()[-400:]}"
    return None


@pytest.fixture(scope="module")
def chromium() -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        why = _install_chromium()
        if why is not None:
            pytest.skip(f"headless Chromium unavailable: {CHROMIUM} / {CHROMEDRIVER} missing and {why}")
        if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            pytest.skip(f"headless Chromium unavailable: apt-get ran but {CHROMIUM} or {CHROMEDRIVER} is missing")


@pytest.fixture(scope="module")
def driver(chromium):
    profile = tempfile.mkdtemp(prefix="playground-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1250"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    drv.set_page_load_timeout(WAIT_S)
    drv.set_script_timeout(WAIT_S)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ---------- stack ----------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    config = {"server": {"api_keys": [API_KEY], "max_image_pixels": PIXEL_CAP, "default_model": MODEL},
              "models": playground_models()}
    with Stack(tmp_path_factory.mktemp("playground"), config, api_key=API_KEY,
               env={"CUDA_VISIBLE_DEVICES": "gpu-a,gpu-b,gpu-c,gpu-d"}) as s:
        s.start(ready_timeout_s=180, loaded=(MODEL, REPLICATED))   # MLX import + checkpoint generation + load
        yield s


@pytest.fixture(scope="module")
def page_url(stack) -> str:
    return stack.http_base + "/"


# ---------- helpers ----------

def screenshot_png(path: Path, size: tuple[int, int]) -> Path:
    """A plausible editor window with a Save button, as PNG."""
    w, h = size
    im = Image.new("RGB", (w, h), (245, 246, 248))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, w, 48], fill=(38, 50, 72))
    d.text((16, 18), "Document - Editor", fill="white")
    d.rectangle([0, 48, 220, h], fill=(230, 233, 238))
    for i, label in enumerate(["Home", "Files", "Settings", "Help"]):
        d.text((24, 80 + 40 * i), label, fill=(30, 30, 30))
    d.rectangle([260, 90, w - 40, h - 120], fill="white", outline=(200, 200, 200))
    for i in range(12):
        d.line([290, 130 + 30 * i, w - 120 - (i * 37) % 200, 130 + 30 * i], fill=(180, 185, 190), width=6)
    d.rounded_rectangle([w - 260, h - 90, w - 160, h - 50], 6, fill=(37, 99, 235))
    d.text((w - 230, h - 76), "Save", fill="white")
    d.rounded_rectangle([w - 140, h - 90, w - 40, h - 50], 6, outline=(120, 120, 120))
    d.text((w - 112, h - 76), "Cancel", fill="black")
    im.save(path)
    return path


def wait(drv, cond, what: str, timeout: float = WAIT_S):
    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.05).until(lambda d: cond(d))
    except TimeoutException:
        error = drv.find_element(By.ID, "error").text
        raise AssertionError(f"timed out waiting for {what}; page error box: {error!r}") from None


def attr(drv, element_id: str, name: str) -> str | None:
    return drv.find_element(By.ID, element_id).get_attribute(name)


def error_box(drv) -> dict:
    return drv.execute_script(
        "const e = document.getElementById('error');"
        "return {hidden: e.hidden, text: e.innerText, code: e.dataset.code, status: e.dataset.status};")


def open_page(drv, url: str, key: str | None = API_KEY) -> None:
    drv.get(url)
    wait(drv, lambda d: attr(d, "model-status", "data-status") != "unknown", "the first /v1/models answer")
    if key is not None:
        field = drv.find_element(By.ID, "api-key")
        field.clear()
        field.send_keys(key, Keys.TAB)     # `change` re-lists the models with the key


def upload(drv, path: Path) -> None:
    drv.find_element(By.ID, "file-input").send_keys(str(path))


def canvas_stats(drv, canvas_id: str, x: float = 0, y: float = 0, radius: float = 0) -> dict:
    """Pixel counts of a canvas (or of a square around x, y): any ink, and strong red (the best marker)."""
    return drv.execute_script("""
        const [id, x, y, r] = arguments;
        const c = document.getElementById(id);
        const [x0, y0] = r ? [Math.max(0, Math.floor(x - r)), Math.max(0, Math.floor(y - r))] : [0, 0];
        const w = r ? Math.min(c.width - x0, Math.ceil(2 * r)) : c.width;
        const h = r ? Math.min(c.height - y0, Math.ceil(2 * r)) : c.height;
        const d = c.getContext('2d').getImageData(x0, y0, w, h).data;
        let ink = 0, red = 0, maxAlpha = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i + 3] > 0) ink++;
          if (d[i + 3] > 200 && d[i] > 180 && d[i + 1] < 80 && d[i + 2] < 120) red++;
          maxAlpha = Math.max(maxAlpha, d[i + 3]);
        }
        return {width: c.width, height: c.height, ink, red, maxAlpha};
    """, canvas_id, x, y, radius)


def js_errors(drv) -> list[str]:
    """Uncaught exceptions and console.error calls; failed HTTP loads are expected in the error tests."""
    return [e["message"] for e in drv.get_log("browser")
            if e["level"] == "SEVERE" and e.get("source") != "network"]


# ---------- tests ----------

def test_api_key_model_status_load_unload(driver, page_url):
    open_page(driver, page_url, key=None)
    err = wait(driver, lambda d: (e := error_box(d)) and not e["hidden"] and e, "the missing-key error")
    assert err["status"] == "401" and "Could not list models" in err["text"], err
    assert attr(driver, "model-status", "data-status") == "error"

    field = driver.find_element(By.ID, "api-key")
    field.send_keys(API_KEY, Keys.TAB)
    wait(driver, lambda d: attr(d, "model-status", "data-status") == "loaded", "model status 'loaded'")
    options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]
    assert options == [MODEL, REPLICATED]
    assert "weights" in driver.find_element(By.ID, "model-memory").text
    assert driver.find_element(By.ID, "load-btn").get_attribute("disabled") is not None

    driver.find_element(By.ID, "unload-btn").click()
    wait(driver, lambda d: attr(d, "model-status", "data-status") == "unloaded", "model status 'unloaded'")
    assert driver.find_element(By.ID, "unload-btn").get_attribute("disabled") is not None
    driver.find_element(By.ID, "load-btn").click()
    wait(driver, lambda d: attr(d, "model-status", "data-status") == "loaded", "model status 'loaded' again")
    assert error_box(driver)["hidden"]
    assert js_errors(driver) == []


def test_a_model_on_several_gpus_shows_its_replicas(driver, page_url):
    open_page(driver, page_url)
    wait(driver, lambda d: attr(d, "model-status", "data-status") == "loaded", "the models to be listed")
    Select(driver.find_element(By.ID, "model")).select_by_value(REPLICATED)
    wait(driver, lambda d: "4/4 GPUs loaded" in d.find_element(By.ID, "model-memory").text, "the replicas shown")
    # two helpers of 32 MiB each (the fake engine's knob)
    assert "helper GPUs: weights 64 MB" in driver.find_element(By.ID, "model-memory").text
    Select(driver.find_element(By.ID, "model")).select_by_value(MODEL)
    wait(driver, lambda d: "GPUs" not in d.find_element(By.ID, "model-memory").text, "a plain model again")
    assert js_errors(driver) == []


def test_locate_draws_points_and_heatmap(driver, page_url, tmp_path):
    open_page(driver, page_url)
    wait(driver, lambda d: attr(d, "model-status", "data-status") == "loaded", "the model to be listed")
    upload(driver, screenshot_png(tmp_path / "screen.png", SHOT_SIZE))
    wait(driver, lambda d: attr(d, "dropzone", "data-has-image") == "1", "the image to be accepted")
    driver.find_element(By.CSS_SELECTOR, 'input[name="profile"][value="fast"]').click()
    # the page sends the screenshot (POST /v1/screenshots) as soon as it has it, again for the new profile
    wait(driver, lambda d: attr(d, "prefill-status", "data-kept") == "1", "the screenshot to be kept")
    assert re.fullmatch(r"kept for questions \(\d+ tokens\)", driver.find_element(By.ID, "prefill-status").text)
    box = driver.find_element(By.ID, "instruction")
    box.send_keys("click the Save button", Keys.ENTER)     # Enter submits
    wait(driver, lambda d: attr(d, "points-canvas", "data-points-drawn") not in (None, "0"), "points drawn")
    # ... so the question ran from the kept state
    assert re.fullmatch(r"\d+ prompt \(\d+ cached\) · \d+ total", driver.find_element(By.ID, "usage").text)

    assert error_box(driver)["hidden"], error_box(driver)
    items = driver.find_elements(By.CSS_SELECTOR, "#points li")
    n_drawn = int(attr(driver, "points-canvas", "data-points-drawn"))
    assert 1 <= n_drawn <= 5 and len(items) == n_drawn
    ranks = [int(li.get_attribute("data-rank")) for li in items]
    scores = [float(li.get_attribute("data-score")) for li in items]
    assert ranks == list(range(1, n_drawn + 1)) and scores == sorted(scores, reverse=True)
    bx, by = float(items[0].get_attribute("data-x")), float(items[0].get_attribute("data-y"))
    assert 0 <= bx < SHOT_SIZE[0] and 0 <= by < SHOT_SIZE[1]

    action = driver.find_element(By.ID, "action-text").text
    m = re.fullmatch(r"pyautogui\.click\(x=(-?\d+), y=(-?\d+)\)", action)
    assert m, action
    assert abs(int(m[1]) - bx) <= 1 and abs(int(m[2]) - by) <= 1, (action, bx, by)

    w, h = SHOT_SIZE
    assert driver.find_element(By.ID, "image-size").text == f"{w} × {h} px"
    assert re.fullmatch(r"\d+ × \d+ px", driver.find_element(By.ID, "resized-size").text)
    assert re.fullmatch(r"\d+ × \d+ tokens", driver.find_element(By.ID, "grid-size").text)
    assert re.fullmatch(r"\d+ ms", driver.find_element(By.ID, "latency").text)

    # The canvases hold real pixels: the best marker is red where the best point is, and the
    # heatmap has ink, strongest near the best point (its cell carries the highest attention).
    points = canvas_stats(driver, "points-canvas", bx, by, radius=30)
    assert (points["width"], points["height"]) == SHOT_SIZE and points["red"] > 20, points
    assert attr(driver, "heatmap", "data-drawn") == "1"
    heat = canvas_stats(driver, "heatmap")
    assert heat["ink"] > 0 and (heat["width"], heat["height"]) == SHOT_SIZE, heat
    near = canvas_stats(driver, "heatmap", bx, by, radius=3 * 28 * w / int(
        driver.find_element(By.ID, "resized-size").text.split(" ")[0]))
    assert near["maxAlpha"] > 64, near

    OUT_DIR.mkdir(exist_ok=True)
    driver.save_screenshot(str(OUT_DIR / "playground.png"))

    toggle = driver.find_element(By.ID, "heatmap-toggle")
    toggle.click()
    assert not driver.find_element(By.ID, "heatmap").is_displayed()
    toggle.click()
    assert driver.find_element(By.ID, "heatmap").is_displayed()

    driver.find_element(By.ID, "copy-btn").click()
    wait(driver, lambda d: d.find_element(By.ID, "copy-status").text == "Copied", "the copy confirmation", 5)
    assert js_errors(driver) == []


def test_invalid_uploads_and_api_errors_show_messages(driver, page_url, tmp_path):
    open_page(driver, page_url)
    wait(driver, lambda d: attr(d, "model-status", "data-status") == "loaded", "the model to be listed")

    # A text file renamed .png: refused by the page before anything is sent.
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a screenshot\n")
    upload(driver, fake)
    err = wait(driver, lambda d: (e := error_box(d)) and not e["hidden"] and e, "the not-an-image error")
    assert "Invalid image" in err["text"] and "notes.png" in err["text"] and "not a PNG" in err["text"], err
    assert attr(driver, "dropzone", "data-has-image") == "0"

    # PNG signature followed by garbage: the browser cannot decode it.
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    upload(driver, corrupt)
    err = wait(driver, lambda d: "corrupt.png" in error_box(d)["text"] and error_box(d), "the corrupt-image error")
    assert "cannot be decoded" in err["text"], err

    # A valid image over server.max_image_pixels: the API answers 413 and the page shows why.
    big = screenshot_png(tmp_path / "big.png", (1600, 1200))
    upload(driver, big)
    wait(driver, lambda d: attr(d, "dropzone", "data-has-image") == "1", "the big image to be accepted")
    assert error_box(driver)["hidden"]
    driver.find_element(By.ID, "instruction").send_keys("click Save")
    driver.find_element(By.ID, "locate-btn").click()
    err = wait(driver, lambda d: (e := error_box(d)) and not e["hidden"] and e, "the 413 error")
    assert err["status"] == "413" and err["code"] == "payload_too_large", err
    assert "Request failed" in err["text"] and "pixels" in err["text"], err
    assert attr(driver, "points-canvas", "data-points-drawn") == "0"
    OUT_DIR.mkdir(exist_ok=True)
    driver.save_screenshot(str(OUT_DIR / "playground-error.png"))

    # A wrong API key: 401 from the completion, shown on the page.
    upload(driver, screenshot_png(tmp_path / "screen.png", SHOT_SIZE))
    wait(driver, lambda d: attr(d, "dropzone", "data-has-image") == "1", "the image to be accepted")
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys("wrong-key", Keys.TAB)
    wait(driver, lambda d: "Could not list models" in error_box(d)["text"], "the 401 on /v1/models")
    driver.find_element(By.ID, "locate-btn").click()
    err = wait(driver, lambda d: "Request failed" in (e := error_box(d))["text"] and e, "the 401 on the completion")
    assert err["status"] == "401" and not err["hidden"], err
    assert js_errors(driver) == []


def test_drop_and_paste_take_images(driver, page_url):
    open_page(driver, page_url)
    buf = io.BytesIO()
    Image.new("RGB", (320, 200), (200, 220, 240)).save(buf, "PNG")
    for event, name in (("drop", "dropped.png"), ("paste", "pasted.png")):
        driver.execute_script("""
            const [event, name, b64] = arguments;
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: 'image/png'}));
            const ev = event === 'drop'
              ? new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})
              : new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true});
            (event === 'drop' ? document.getElementById('dropzone') : document.body).dispatchEvent(ev);
        """, event, name, base64.b64encode(buf.getvalue()).decode())
        wait(driver, lambda d: name in d.find_element(By.ID, "file-name").text, f"the image from the {event} event")
        assert driver.find_element(By.ID, "file-name").text == f"{name} · 320 × 200"
    assert error_box(driver)["hidden"] and js_errors(driver) == []
