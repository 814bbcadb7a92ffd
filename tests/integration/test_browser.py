"""The HTML view of a finished run in a real browser: headless Chromium driven by selenium.

``.ci/run`` installs Chromium and its driver from the system's packages; where neither could be
installed the test is skipped, naming what is missing.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datus.outputs.html_view import write_html_view
from datus.runfolder.run import Run
from tests.conftest import NUM_IMAGES

pytestmark = pytest.mark.integration

PAGE_SIZE = 3
"""Small pages, so that the seven images of the finished run need three."""


def _browser():  # type: ignore[no-untyped-def]
    """A headless Chromium under selenium, or a skip that names what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    binary = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip(f"no {'Chromium' if binary is None else 'chromedriver'} on PATH (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_results_page_pages_through_every_image_and_its_links_load(finished_run: Path, tmp_path: Path) -> None:
    run = Run(finished_run)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert (finished_run / "index.html").is_file()  # predict wrote it, with the default page size
    pages = write_html_view(run.results, summary, page_size=PAGE_SIZE)
    assert pages == 3
    from selenium.webdriver.common.by import By

    browser = _browser()
    try:
        browser.get((finished_run / "index.html").as_uri())
        assert "datus results" in browser.title
        assert browser.find_element(By.CSS_SELECTOR, "img[alt=report]").get_property("naturalWidth") > 0
        assert "dense" in browser.find_element(By.ID, "metrics").find_element(By.XPATH, "following-sibling::table").text
        browser.find_element(By.ID, "browse").click()
        seen = []
        for number in range(1, pages + 1):
            assert browser.current_url.endswith(f"view/page-{number:06d}.html")
            seen += [caption.text.split("\n")[0] for caption in browser.find_elements(By.TAG_NAME, "figcaption")]
            if number < pages:
                browser.find_element(By.CSS_SELECTOR, "a[rel=next]").click()
        assert not browser.find_elements(By.CSS_SELECTOR, "a[rel=next]")  # the last page
        assert len(seen) == NUM_IMAGES and len(set(seen)) == NUM_IMAGES
        thumbnail = browser.find_element(By.CSS_SELECTOR, "figure img")
        browser.execute_script("arguments[0].scrollIntoView()", thumbnail)
        browser.execute_async_script(  # lazy images load once near the viewport
            "const [image, done] = arguments; image.complete ? done() : image.addEventListener('load', done)", thumbnail
        )
        assert thumbnail.get_property("naturalWidth") > 0
        screenshot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
        colours = np.unique(screenshot.reshape(-1, 3), axis=0)
        not_white = (screenshot < 240).any(axis=-1).mean()
        assert len(colours) > 100 and not_white > 0.05, (len(colours), not_white)
        for kind in ("mask", "image"):  # the mask by a relative link, the input image by its file:// URL
            link = browser.find_element(By.LINK_TEXT, kind)
            target = link.get_attribute("href")
            link.click()
            assert browser.current_url == target
            loaded = browser.find_element(By.TAG_NAME, "img")
            assert loaded.get_property("naturalWidth") > 0, target
            browser.back()
        browser.find_element(By.CSS_SELECTOR, "a[rel=index]").click()
        assert browser.current_url.endswith("/index.html")
    finally:
        browser.quit()
