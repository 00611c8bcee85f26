"""The page in a real browser: Debian's chromium, headless, driven by Selenium through
chromium-driver (`.ci/run` installs them). Without them these tests skip, saying why."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from serve_helpers import server, served_store, store_before  # noqa: F401 (fixtures)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="no chromium and chromium-driver on this machine "
                                       "(apt-get install chromium chromium-driver)")

TEXT = "a cat and a sofa"


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def _map_canvases(driver, view: str = "A"):
    return driver.find_elements("css selector", f"#grid .card canvas.map-{view}")


def test_type_a_word_see_its_maps_click_a_token_change_the_threshold(browser, server, served_store):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from ovstore.analyze import compute_maps
    from ovstore.store import open_store

    store = open_store(served_store)
    browser.get(server.url)
    _wait(browser, lambda d: d.execute_script("return window.ovstore.info !== null"))
    assert len(browser.find_elements("css selector", "#grid .card")) == 3  # the images, before any prompt
    box = browser.find_element("id", "text-a")
    box.send_keys(TEXT, Keys.ENTER)
    _wait(browser, lambda d: len(_map_canvases(d)) == 3)
    captions = [c.text for c in browser.find_elements("css selector", "#grid .card .caption")]
    assert captions == [f"{i}: {store.record(i).prompt}" for i in store.complete_images()]
    # every image drawn in its photo tile
    assert browser.execute_script(
        "return [...document.querySelectorAll('#grid canvas.photo')].every(c => c.width > 0)")

    # the page's arrays are those of `ovstore maps`
    expected = compute_maps(store, [TEXT]).values
    for position in range(3):
        got = np.asarray(browser.execute_script(
            "return window.ovstore.views.A.result.images[arguments[0]].values.map(v => Array.from(v))", position))
        np.testing.assert_allclose(got.reshape(expected[position].shape), expected[position], rtol=1e-5,
                                   atol=1e-6 * float(expected.max()))

    # click a token: it is selected and its map is drawn
    chips = {c.text: c for c in browser.find_elements("css selector", "#tokens-a .chip")}
    assert set(chips) == {"cat", "sofa"}  # words; start/end of text and fillers hidden
    before = browser.execute_script("return Array.from(document.querySelector('canvas.map-A').shownValues)")
    chips["cat"].click()
    _wait(browser, lambda d: d.find_element("css selector", "#tokens-a .chip.selected").text == "cat")
    assert browser.execute_script("return window.ovstore.views.A.token") == 2
    after = browser.execute_script("return Array.from(document.querySelector('canvas.map-A').shownValues)")
    assert before != after
    # and large beside the first image
    _wait(browser, lambda d: "token=2" in (d.find_element("id", "detail-map").get_attribute("src") or ""))
    assert "image=0" in browser.find_element("id", "detail-map").get_attribute("src")

    # the label normalisation and a threshold: the mask is drawn
    Select(browser.find_element("id", "normalize")).select_by_value("minmax")
    shown = np.asarray(browser.execute_script("return Array.from(document.querySelector('canvas.map-A').shownValues)"))
    assert shown.min() == pytest.approx(0) and shown.max() == pytest.approx(1)
    browser.execute_script("const t = document.getElementById('threshold'); t.value = '0.5';"
                           "t.dispatchEvent(new Event('input'));")
    assert browser.find_element("id", "show-mask").is_selected()
    pixels = np.asarray(browser.execute_script(
        "const c = document.querySelector('canvas.map-A');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)")).reshape(-1, 4)[:, :3]
    inside = shown >= 0.5
    # outside the mask the colours are darkened, its edge is white
    assert 0 < inside.sum() < inside.size
    assert pixels[~inside].max() <= 0.46 * 255 + 1
    assert (pixels[inside] == 255).all(axis=1).any()

    # the reproducing command, and the large view with its label
    assert browser.find_element("id", "command").text.startswith(f"ovstore maps {served_store} --attribution")
    browser.find_elements("css selector", "#grid .card")[1].click()
    _wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('detail-map'); return i.complete && i.naturalWidth > 0"))
    assert "token=2" in browser.find_element("id", "detail-map").get_attribute("src")
    _wait(browser, lambda d: "--threshold 0.5" in d.find_element("id", "label-command").text)
    assert "--normalize minmax" in browser.find_element("id", "label-command").text
    _wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('detail-label'); return i.complete && i.naturalWidth > 0"))


def test_compare_a_second_prompt_and_a_learned_token(browser, server):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser.get(server.url)
    _wait(browser, lambda d: d.execute_script("return window.ovstore.info !== null"))
    browser.find_element("id", "text-a").send_keys("a red car", Keys.ENTER)
    browser.find_element("id", "text-b").send_keys("a dog in a park", Keys.ENTER)
    _wait(browser, lambda d: len(_map_canvases(d, "A")) == 3 and len(_map_canvases(d, "B")) == 3)
    assert [c.text for c in browser.find_elements("css selector", "#tokens-b .chip")] == ["dog", "park"]
    assert " && ovstore maps " in browser.find_element("id", "command").text
    Select(browser.find_element("id", "learned")).select_by_value("blob")
    _wait(browser, lambda d: d.execute_script("return (window.ovstore.views.A.result || {}).learned") == "blob")
    assert [c.text for c in browser.find_elements("css selector", "#tokens-a .chip")] == ["blob*"]


def test_typing_past_a_request_drops_it(browser, server):
    browser.get(server.url)
    _wait(browser, lambda d: d.execute_script("return window.ovstore.info !== null"))
    # three prompts in a row, faster than the server answers: only the last one is shown
    browser.execute_script(
        "for (const t of ['a cat', 'a cat on', 'a dog in a park']) {"
        "  window.ovstore.views.A.text = t; requestMaps('A'); }")
    _wait(browser, lambda d: (d.execute_script("return (window.ovstore.views.A.result || {}).text") == "a dog in a park"))
    assert browser.execute_script("return window.ovstore.views.A.seq") == 3


def test_label_a_class_with_a_learned_token(browser, server, served_store, tmp_path):
    from PIL import Image
    from selenium.webdriver.support.ui import Select

    from ovstore.label import label_config, label_store
    from ovstore.store import analysis_defaults, open_store

    browser.get(server.url)
    _wait(browser, lambda d: d.execute_script("return window.ovstore.info !== null"))
    Select(browser.find_element("id", "learned")).select_by_value("blob")
    _wait(browser, lambda d: d.execute_script("return (window.ovstore.views.A.result || {}).learned") == "blob")
    browser.find_elements("css selector", "#grid .card")[1].click()
    # showing the learned token, the label panel ticks it: the class "blob" is labelled with the token
    assert browser.find_element("css selector", "#label-tokens input[value='blob']").is_selected()
    _wait(browser, lambda d: "--token" in d.find_element("id", "label-command").text)
    command = browser.find_element("id", "label-command").text
    assert "blob.safetensors" in command and "--image 1" in command
    _wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('detail-label'); return i.complete && i.naturalWidth > 0"))
    pixels = browser.execute_script("return window.ovstore.label.pixels")
    assert browser.execute_script("return window.ovstore.label.classes") == ["blob"]
    # the page's label is the one `ovstore label --token` makes
    config = label_config(tokens=[served_store.parent / "tokens" / "blob.safetensors"],
                          defaults=analysis_defaults(open_store(served_store)))
    label_store(served_store, tmp_path / "labels", config, images=[1], scheduler="synchronous")
    written = np.asarray(Image.open(tmp_path / "labels" / "SegmentationClass" / "00001.png"))
    assert pixels == {"background": int((written == 0).sum()), "blob": int((written == 1).sum())}


def test_download_the_view_as_png(browser, server):
    import base64
    import io

    from PIL import Image
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url)
    _wait(browser, lambda d: d.execute_script("return window.ovstore.info !== null"))
    browser.find_element("id", "text-a").send_keys("a cat", Keys.ENTER)
    _wait(browser, lambda d: len(_map_canvases(d)) == 3)
    # catch the download the button starts: its file name and the PNG bytes
    browser.execute_script(
        "window.downloaded = null;"
        "HTMLAnchorElement.prototype.click = function () {"
        "  const name = this.download;"
        "  fetch(this.href).then(r => r.blob()).then(b => { const f = new FileReader();"
        "    f.onload = () => { window.downloaded = { name, data: f.result }; }; f.readAsDataURL(b); }); };")
    browser.find_element("id", "download").click()
    _wait(browser, lambda d: d.execute_script("return window.downloaded !== null"))
    got = browser.execute_script("return window.downloaded")
    assert got["name"] == "ovstore-view.png"
    assert got["data"].startswith("data:image/png;base64,")
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["data"].split(",", 1)[1]))).convert("RGB"))
    # three cards in a row, each its photo and map tiles drawn (not a blank canvas)
    tile = browser.execute_script("const c = document.querySelector('canvas.map-A'); return [c.width, c.height]")
    assert picture.shape[1] >= 3 * tile[0]
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50
    # the first map tile is in the picture, upscaled without smoothing
    shown = np.asarray(browser.execute_script(
        "const c = document.querySelector('canvas.map-A');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)")).reshape(tile[1], tile[0], 4)
    assert any((picture[y:y + 1, :, :] == shown[0, 0, :3]).all(axis=-1).any() for y in range(picture.shape[0]))
