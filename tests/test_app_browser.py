"""The Gradio app in a real headless Chromium: upload through the page, read what it renders.

Needs Debian's ``chromium`` (``apt-get install -y --no-install-recommends chromium``; CI
installs it) and the ``playwright`` Python package, which drives that binary: no browser
is downloaded. Screenshots go to ``test-output/app/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.harness import free_port
from benchmarks.synthetic import make_image_folder

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install -y --no-install-recommends chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives chromium with playwright (pip install playwright)")
pytest.importorskip("gradio", reason="the app needs gradio (pip install 'dinoserve[app]')")

from dinoserve import app  # noqa: E402
from dinoserve.client import Client  # noqa: E402
from dinoserve.index import build_index  # noqa: E402

#: The flags of ../shared/reference/serving.md; playwright adds a fresh --user-data-dir.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output" / "app"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def served(tiny_repo, tmp_path_factory):
    """The ViT app on 12 images: (url, image folder, sorted indexed paths)."""
    gradio_tmp = tmp_path_factory.mktemp("gradio")
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_tmp)
    photos = tmp_path_factory.mktemp("photos")
    paths = sorted(make_image_folder(photos, per_class=4, size=64, seed=5))
    client = Client(repo=tiny_repo, model="vit_tiny")
    index = tmp_path_factory.mktemp("index") / "photos.index"
    build_index(photos, index, client, progress=False)
    demo = app.launch(client, index, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, photos, paths
    finally:
        demo.close()
        client.close()
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


@pytest.fixture(scope="module")
def page(served):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 960})
            pg.set_default_timeout(TIMEOUT_MS)
            pg.goto(served[0], wait_until="domcontentloaded")
            pg.wait_for_selector("#search-query input[type=file]", state="attached")
            yield pg
        finally:
            browser.close()


def _captions(pg, gallery: str) -> list[str]:
    return [c.strip() for c in pg.locator(f"#{gallery} .caption-label").all_inner_texts()]


def _wait_for_first_caption(pg, prefix: str, suffix: str) -> None:
    pg.wait_for_function(
        """([prefix, suffix]) => {
            const c = document.querySelector('#search-results .caption-label');
            return c && c.innerText.trim().startsWith(prefix) && c.innerText.trim().endsWith(suffix);
        }""",
        arg=[prefix, suffix],
    )


def test_browser_upload_shows_gallery_and_click_searches_again(page, served):
    _, photos, paths = served
    query = paths[6]
    page.set_input_files("#search-query input[type=file]", str(query))
    rel = f"{query.parent.name}/{query.name}"
    _wait_for_first_caption(page, "1. 1.000", rel)
    captions = _captions(page, "search-results")
    assert len(captions) == 8  # default k
    assert [c.split(".")[0] for c in captions] == [str(i) for i in range(1, 9)]
    scores = [float(c.split()[1]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    assert page.locator("#search-results img").count() == 8
    assert str(query) in page.locator("#search-table").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "search.png"), full_page=True)

    # Clicking the third result makes it the query: it now ranks first.
    third = captions[2].split()[-1]
    page.locator("#search-results img").nth(2).click()
    _wait_for_first_caption(page, "1. 1.000", third)
    assert str(photos / third) in page.locator("#search-table").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "search_after_click.png"), full_page=True)


def test_browser_example_click_searches_with_it(page, served):
    page.get_by_role("tab", name="Search").click()
    page.locator("#search-examples img").nth(1).click()
    # example_paths spreads 4 examples over the 12 sorted index images: the second is #3.
    query = served[2][3]
    _wait_for_first_caption(page, "1. 1.000", f"{query.parent.name}/{query.name}")


def test_browser_attention_tab_shows_each_head(page, served):
    _, _, paths = served
    page.get_by_role("tab", name="Attention").click()
    page.set_input_files("#attention-image input[type=file]", str(paths[1]))
    page.wait_for_function("document.querySelectorAll('#attention-heads img').length === 3")
    assert _captions(page, "attention-heads") == ["head 0", "head 1", "head 2"]
    page.wait_for_function("document.querySelectorAll('#attention-kept img').length === 4")
    kept = _captions(page, "attention-kept")
    assert kept[0].startswith("mean:") and kept[0].endswith("patches hold 60%")
    assert page.locator("#attention-mean img").count() == 1
    page.screenshot(path=str(SCREENSHOTS / "attention.png"), full_page=True)


def test_browser_bad_upload_shows_message(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.get_by_role("tab", name="Embed").click()
    page.set_input_files("#embed-image input[type=file]", str(bad))
    toast = page.locator("[data-testid=toast-text]").filter(has_text="notes.png")
    toast.first.wait_for(state="visible")
    assert toast.first.inner_text().strip() == "notes.png: not an image Pillow can read (unknown or corrupt format)"
    assert "Traceback" not in page.content()
    page.wait_for_timeout(500)  # let the notice finish sliding in before the picture
    page.screenshot(path=str(SCREENSHOTS / "bad_upload.png"))
