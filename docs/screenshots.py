"""The README's and the docs' pictures: the chat page after a few turns, and the top of a training report.

    python docs/screenshots.py --home .tuneloop      # a home where `tuneloop demo` ran

Starts the demo assistant's server on 127.0.0.1 (a free port, stopped at the end), drives Debian's Chromium
with Playwright (never a downloaded browser), and writes docs/images/chat.png and docs/images/report.png.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
MESSAGES = [
    "where is my parcel? it was supposed to arrive yesterday",
    "我的退款什么时候到账？",
    "this is the third time I'm asking, I want to talk to a real person",
]


def main() -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from tuneloop.config import ServerSettings, load_config
    from tuneloop.demo import demo_assistant
    from tuneloop.registry import Registry
    from tuneloop.serve.app import create_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="A tuneloop home where the demo ran.")
    args = parser.parse_args()
    settings = load_config(None, [f"registry.home={args.home}", f"serve.assistant={demo_assistant()}"], ServerSettings)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    registry = Registry(settings.registry)
    report = registry.folder(registry.get("support-intents@production")).report_html
    IMAGES.mkdir(exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 900, "height": 760})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('title').textContent.length > 0")
            for number, message in enumerate(MESSAGES, start=1):
                page.fill("#message", message)
                page.click("#send")
                page.wait_for_function(f"document.querySelectorAll('.msg.bot').length >= {number}")
            page.locator(".msg.bot").first.locator("button.thumb.up").click()
            page.screenshot(path=str(IMAGES / "chat.png"))
            page.set_viewport_size({"width": 1100, "height": 900})
            page.goto(report.as_uri())
            # The plots say more than the headline table at the top of the page.
            page.evaluate(
                "document.evaluate(\"//h2[text()='Confusion matrix']\", document).iterateNext().scrollIntoView()"
            )
            page.screenshot(path=str(IMAGES / "report.png"))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(f"wrote {IMAGES / 'chat.png'} and {IMAGES / 'report.png'}")


if __name__ == "__main__":
    main()
