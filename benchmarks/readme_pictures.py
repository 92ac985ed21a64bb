"""Screenshots of the app for the README, taken in headless Chromium from a real demo run.

Serves the app on the demo's index and model, uploads a query image through the page and
saves what the browser renders: the search gallery, and for ViT models the attention tab.

    python -m benchmarks.readme_pictures --index demo-run/demo.index --repo model_repository \
        --model dino_demo --query QUERY.png [--attention-query Q2.png] --out docs/

Needs Debian's chromium and the playwright package (both installed by the test command).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.harness import free_port

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--repo", default="model_repository")
    ap.add_argument("--model", required=True)
    ap.add_argument("--query", required=True, help="image to search with")
    ap.add_argument("--attention-query", help="image for the attention tab (ViT models)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--prefix", default="demo")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from dinoserve import app  # gradio: only when there is something to draw, not for --help
    from dinoserve.client import Client

    args.out.mkdir(parents=True, exist_ok=True)
    client = Client(repo=args.repo, model=args.model)
    demo = app.launch(client, args.index, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(demo.local_url, wait_until="domcontentloaded")
            page.set_input_files("#search-query input[type=file]", args.query)
            page.wait_for_function("document.querySelectorAll('#search-results img').length >= 8")
            page.wait_for_timeout(1500)  # thumbnails finish loading
            page.screenshot(path=str(args.out / f"{args.prefix}_search.png"), full_page=True)
            if args.attention_query and client.info.family == "vit":
                page.get_by_role("tab", name="Attention").click()
                page.set_input_files("#attention-image input[type=file]", args.attention_query)
                page.wait_for_function("document.querySelectorAll('#attention-kept img').length >= 2")
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out / f"{args.prefix}_attention.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
        client.close()
    print(sorted(str(p) for p in args.out.glob(f"{args.prefix}_*.png")))


if __name__ == "__main__":
    main()
