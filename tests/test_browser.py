"""The demo page at `/` in a real headless browser: Debian's Chromium, driven by Playwright, against real server
processes on the tiny BLIP checkpoint.

Screenshots go to tests/artifacts/ on every run. docs/demo.png (the README's picture) is written when it is
missing or when UPDATE_DEMO_PNG=1, so that a test run does not dirty the checkout.
"""
from __future__ import annotations

import base64
import io
import os
import re
import time
import unittest
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from PIL import Image

from support.services import REPO_ROOT, ServerProcess, missing_service
from support.tiny_models import image_bytes, sample_images, tiny_checkpoint

pytestmark = pytest.mark.live

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# The flags that work on these machines (no sandbox as root, no GPU, nothing that phones home).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
DEMO_PNG = REPO_ROOT / "docs" / "demo.png"
DEFAULT_PROMPT = "a photo of"
ADMIN_TOKEN = "s3cret-token"
API_KEY = "sk-demo-key"
HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"
TIMEOUT_MS = 30_000

_servers: dict[str, ServerProcess] = {}
_playwright: Any = None
_browser: Any = None


def setUpModule() -> None:
    """Start the main server and one browser for every test. The admin server starts once the main one is
    ready, and loads its model while the main tests run (two cold starts at once only share the CPUs)."""
    global _playwright, _browser
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_service("the playwright Python package is not installed (pip install -r requirements-dev.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        missing_service(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    folder = tiny_checkpoint("blip")
    if folder.is_relative_to(REPO_ROOT):  # the servers run in the repository; a short id reads better on the page
        folder = folder.relative_to(REPO_ROOT)
    model = ["--blip", "--model-path", str(folder)]
    try:
        # short captions keep the screenshots readable
        main = ServerProcess([*model, "--caption-prompt", DEFAULT_PROMPT, "--max-new-tokens", "12"],
                             env={"CACHE_BACKEND": "memory"})
        _servers["main"] = main.start(wait_ready=False)
        _playwright = sync_playwright().start()
        _browser = _playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        main.wait_ready()
        _servers["admin"] = ServerProcess(model, env={"CACHE_BACKEND": "memory", "ADMIN_TOKEN": ADMIN_TOKEN}
                                          ).start(wait_ready=False)
        _servers["keyed"] = ServerProcess(model, env={"CACHE_BACKEND": "memory", "API_KEY": API_KEY}
                                          ).start(wait_ready=False)
    except BaseException:
        tearDownModule()
        raise
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


def tearDownModule() -> None:
    global _playwright, _browser
    for server in _servers.values():  # both shut down at once
        if server.process and server.process.poll() is None:
            server.process.terminate()
    if _browser is not None:
        _browser.close()
        _browser = None
    if _playwright is not None:
        _playwright.stop()
        _playwright = None
    for server in _servers.values():
        server.stop()
    _servers.clear()


def _png(img: Image.Image) -> bytes:
    return image_bytes(img, "PNG")


def _jpeg(img: Image.Image) -> bytes:
    return image_bytes(img, "JPEG")


def _payload(name: str, data: bytes, mime: str) -> dict[str, Any]:
    """A file for Playwright's set_input_files."""
    return {"name": name, "mimeType": mime, "buffer": data}


class Page:
    """A fresh browser context and page on one server, recording dialogs, console errors and every request."""

    def __init__(self, server: ServerProcess, **context_options: Any) -> None:
        self.server = server
        self.context = _browser.new_context(**{"viewport": {"width": 1200, "height": 900}, **context_options})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("dialog", self._on_dialog)
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(server.url + "/", wait_until="load")

    def wait_until(self, condition: str | Callable[[], Any], timeout_ms: int = TIMEOUT_MS) -> None:
        """Poll a JS expression (or a Python callable) until it is truthy. (wait_for_function evaluates strings
        in the page, which its CSP forbids; evaluate() goes through the DevTools protocol instead.)"""
        deadline = time.monotonic() + timeout_ms / 1000
        while not (condition() if callable(condition) else self.page.evaluate(condition)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {condition}")
            self.page.wait_for_timeout(25)

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def close(self) -> None:
        self.context.close()

    # ----- actions --------------------------------------------------------------------------------------------
    def choose(self, *files: dict[str, Any]) -> None:
        self.page.set_input_files("#file-input", list(files))

    def caption(self) -> None:
        """Press "Caption Images" and wait until no card is pending any more."""
        self.page.get_by_role("button", name="Caption Images").click()
        self.wait_settled()

    def wait_settled(self) -> None:
        self.wait_until(
            "document.querySelectorAll('.card').length > 0 && "
            "!document.querySelector('.card[data-state=pending], .card[data-state=queued]')")

    def clear_cache(self) -> str:
        """Press "Clear cache" and return the answer the page shows."""
        status = "document.getElementById('cache-status')"
        self.page.evaluate(f"{status}.textContent = ''")
        self.page.get_by_role("button", name="Clear cache").click()
        self.wait_until(f"!['', 'Clearing…'].includes({status}.textContent)")
        return self.page.evaluate(f"{status}.textContent")

    def cards(self) -> list[dict[str, Any]]:
        """What each card shows, read from the DOM as text."""
        return self.page.eval_on_selector_all(".card", """cards => cards.map(card => {
            const visible = sel => { const el = card.querySelector(sel); return el && !el.hidden ? el : null; };
            const img = card.querySelector('.card__img');
            return {
              state: card.dataset.state,
              name: card.querySelector('.card__name').textContent,
              caption: visible('.card__caption') ? card.querySelector('.card__caption').textContent : null,
              tags: Array.from(card.querySelectorAll('.tags:not([hidden]) .tag'), t => t.textContent),
              error: visible('.card__error') ? card.querySelector('.card__error').textContent : null,
              cached: !!visible('.badge--cached'),
              pending: !!visible('.card__pending'),
              preview: img.hidden ? null : {src: img.src, width: img.naturalWidth, height: img.naturalHeight},
              noPreview: !card.querySelector('.card__noimg').hidden,
              images: card.querySelectorAll('img').length,
            };
        })""")

    def screenshot(self, name: str, **options: Any) -> Path:
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), **options)
        return path


class BrowserTestCase(unittest.TestCase):
    """Opens pages and checks, at the end of each test, that nothing ran or loaded that should not have."""

    server_name = "main"

    @property
    def server(self) -> ServerProcess:
        return _servers[self.server_name]

    def open_page(self, **context_options: Any) -> Page:
        page = Page(self.server, **context_options)
        self.addCleanup(page.close)
        return page

    def api_caption(self, files: list[tuple[str, bytes]], prompt: str | None = None) -> list[dict[str, Any]]:
        """What POST /caption-images answers for these files, asked directly."""
        return self.server.post_images(files, prompt=prompt).json()["results"]

    def reset_cache(self) -> None:
        requests.post(self.server.url + "/reset-redis", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).raise_for_status()

    def assert_clean(self, page: Page, expected_console: str | None = None) -> None:
        """No dialog, no script error, no console error (but `expected_console`), no request off this server."""
        self.assertEqual(page.dialogs, [], "a dialog opened: page content ran as script")
        self.assertEqual(page.page_errors, [])
        unexpected = [m for m in page.console_errors if not (expected_console and re.search(expected_console, m))]
        self.assertEqual(unexpected, [])
        foreign = [u for u in page.requests
                   if not (u.startswith(page.server.url + "/") or u.startswith(("blob:", "data:")))]
        self.assertEqual(foreign, [], "the page requested something from another host")


class DemoPageTest(BrowserTestCase):
    """The page against a server with a default prompt and an in-process cache."""

    def setUp(self) -> None:
        self.reset_cache()

    def test_shows_model_device_dtype_and_default_prompt(self) -> None:
        p = self.open_page()
        ready = requests.get(self.server.url + "/readyz", timeout=10).json()
        facts = p.page.locator("#facts")
        self.assertEqual(p.page.locator("#fact-family").text_content(), "blip")
        self.assertEqual(p.page.locator("#fact-checkpoint").text_content(), ready["model"]["id"])
        self.assertEqual(p.page.locator("#fact-device").text_content(), ready["device"])
        self.assertEqual(p.page.locator("#fact-dtype").text_content(), ready["dtype"])
        self.assertEqual(p.page.locator("#fact-status").text_content(), "ready")
        self.assertIn(DEFAULT_PROMPT, facts.text_content())
        self.assertEqual(p.page.get_by_label("Prompt").get_attribute("placeholder"), DEFAULT_PROMPT)
        self.assertTrue(p.page.get_by_role("button", name="Caption Images").is_visible())
        self.assertTrue(p.page.get_by_role("button", name="Clear cache").is_visible())
        self.assert_clean(p)

    def test_two_images_and_a_text_file_then_cached_then_clear(self) -> None:
        gradient, checkerboard, _ = sample_images()
        files = [("gradient.jpg", _jpeg(gradient), "image/jpeg"),
                 ("fake.jpg", b"this is not an image, just text\n", "image/jpeg"),
                 ("checkerboard.png", _png(checkerboard), "image/png")]
        p = self.open_page()
        # Hold the request, to see the previews and the pending state before any answer arrives.
        held: list[Any] = []
        p.page.route("**/caption-images", lambda route: held.append(route))
        p.choose(*(_payload(*f) for f in files))
        p.wait_until("Array.from(document.querySelectorAll('.card__img'))"
                                 ".every(img => img.hidden || img.complete)")
        queued = p.cards()
        self.assertEqual([c["name"] for c in queued], [f[0] for f in files])
        self.assertEqual([c["state"] for c in queued], ["queued"] * 3)
        for card in queued:  # a preview at once: the file itself, through an object URL
            if card["name"] != "fake.jpg":
                self.assertTrue(card["preview"]["src"].startswith("blob:"), card)
        self.assertTrue(queued[1]["noPreview"], queued[1])

        p.page.get_by_role("button", name="Caption Images").click()
        p.wait_until("document.querySelectorAll('.card[data-state=pending]').length === 3")
        self.assertTrue(all(c["pending"] and c["caption"] is None for c in p.cards()))
        self.assertEqual(p.page.locator("#caption-button").text_content(), "Captioning…")
        p.wait_until(lambda: held)
        p.page.unroute("**/caption-images")
        held[0].fallback()
        p.wait_settled()

        expected = self.api_caption([(name, data) for name, data, _ in files])  # now from the cache: same answer
        shown = p.cards()
        self.assertEqual([c["name"] for c in shown], [f[0] for f in files])
        for card, result, size in zip(shown, expected, [gradient.size, None, checkerboard.size]):
            self.assertEqual(card["name"], result["filename"])
            if size is None:  # the text file: its error, no caption
                self.assertEqual(card["state"], "error")
                self.assertEqual(card["error"], result["error"]["message"])
                self.assertIsNone(card["caption"])
                self.assertEqual(card["tags"], [])
                continue
            self.assertEqual(card["state"], "done")
            self.assertEqual(card["caption"], result["caption"])
            self.assertTrue(card["caption"].strip())
            self.assertEqual(card["tags"], result["tags"])
            self.assertTrue(card["tags"])
            self.assertFalse(card["cached"])
            self.assertIsNone(card["error"])
            # beside the right preview: the picture in this card is this file's (their sizes all differ)
            self.assertEqual((card["preview"]["width"], card["preview"]["height"]), size)
        self.assertRegex(p.page.locator("#results-summary").text_content(), r"^2 images captioned, 1 failed in ")
        p.screenshot("results.png", full_page=True)
        self._save_demo_png(p)

        # The same image again: served from the cache, and marked so.
        p.choose(_payload(*files[0]))
        p.caption()
        again = p.cards()[-1]
        self.assertEqual((again["name"], again["state"], again["cached"]), ("gradient.jpg", "done", True))
        self.assertEqual((again["caption"], again["tags"]), (expected[0]["caption"], expected[0]["tags"]))
        self.assertFalse(any(c["cached"] for c in p.cards()[:3]))
        self.assertRegex(p.page.locator("#results-summary").text_content(), r"1 image captioned \(1 from the cache\)")
        p.screenshot("results-cached.png")

        # Clear the cache: the answer, with its count of deleted entries.
        self.assertEqual(p.clear_cache(), "In-process cache cleared (no Redis is in use): 2 entries deleted.")
        self.assertEqual(p.clear_cache(), "In-process cache cleared (no Redis is in use): 0 entries deleted.")
        self.assert_clean(p)

    def test_hostile_file_name_and_markup_in_captions_are_shown_as_text(self) -> None:
        _, _, noise = sample_images()
        p = self.open_page()
        p.choose(_payload(HOSTILE_NAME, _png(noise), "image/png"))
        p.caption()
        card = p.cards()[0]
        self.assertEqual(card["name"], HOSTILE_NAME)
        self.assertEqual(card["state"], "done")
        self.assertEqual(card["images"], 1)  # the preview only; the name made no <img>
        self.assertEqual(p.page.locator("img[src='x']").count(), 0)

        # A caption and tags with markup (from a rewritten answer): text, not elements.
        markup = '<b id="injected">bold</b><img src=x onerror="alert(2)">'

        def rewrite(route: Any) -> None:
            body = route.fetch().json()
            for result in body["results"]:
                result.update(caption=markup, tags=["<script>alert(3)</script>", "<i>tag</i>"])
            route.fulfill(json=body)

        p.page.route("**/caption-images", rewrite)
        p.choose(_payload("plain.png", _png(noise), "image/png"))
        p.caption()
        card = p.cards()[1]
        self.assertEqual(card["caption"], markup)
        self.assertEqual(card["tags"], ["<script>alert(3)</script>", "<i>tag</i>"])
        self.assertEqual(p.page.locator("#injected, .card script, .card i, img[src='x']").count(), 0)
        p.page.wait_for_timeout(200)  # an onerror handler would have fired by now
        p.page.locator(".results-section").screenshot(path=str(ARTIFACTS / "hostile.png"))
        self.assert_clean(p)

    def test_request_level_errors_show_on_every_pending_card(self) -> None:
        gradient, checkerboard, _ = sample_images()
        p = self.open_page()
        files = [_payload("one.png", _png(gradient), "image/png"), _payload("two.png", _png(checkerboard), "image/png")]

        busy = {"error": {"code": "overloaded", "message": "the service is busy; retry later"}}
        p.page.route("**/caption-images",
                     lambda route: route.fulfill(status=503, json=busy, headers={"Retry-After": "7"}))
        p.choose(*files)
        p.caption()
        self.assertEqual([c["error"] for c in p.cards()], ["the service is busy; retry later (try again in 7 s)"] * 2)
        self.assertEqual([c["state"] for c in p.cards()], ["error", "error"])
        # the whole request failed, so pressing the button again sends both files again
        p.page.unroute("**/caption-images")
        p.caption()
        self.assertEqual([c["state"] for c in p.cards()], ["done", "done"])
        self.assertEqual([c["caption"] for c in p.cards()],
                         [r["caption"] for r in self.api_caption([("one.png", _png(gradient)),
                                                                   ("two.png", _png(checkerboard))])])

        p.page.route("**/caption-images", lambda route: route.abort("connectionrefused"))
        p.page.get_by_role("button", name="Clear list").click()
        p.choose(*files)
        p.caption()
        self.assertEqual([c["error"] for c in p.cards()],
                         ["Could not reach the server (network error). Is it still running?"] * 2)

        # A real request-level error from the server: too many files for MAX_FILES_PER_REQUEST would need
        # another server, so a whole-request 4xx it really sends is used instead (one file, not an image).
        p.page.unroute("**/caption-images")
        p.page.get_by_role("button", name="Clear list").click()
        p.choose(_payload("notes.txt", b"plain text", "text/plain"))
        p.caption()
        card = p.cards()[0]
        self.assertEqual(card["state"], "error")
        self.assertEqual(card["error"], self.api_caption([("notes.txt", b"plain text")])[0]["error"]["message"])
        self.assertTrue(card["noPreview"])
        # a request the server refused as such is not sent again
        p.page.get_by_role("button", name="Caption Images").click()
        p.wait_until("document.getElementById('form-status').textContent.startsWith('Choose or drop')")
        self.assertEqual(p.cards()[0]["state"], "error")
        self.assert_clean(p, expected_console=r"Failed to load resource|ERR_CONNECTION_REFUSED")

    def test_files_dropped_on_the_drop_zone(self) -> None:
        _, checkerboard, _ = sample_images()
        data = _png(checkerboard)
        p = self.open_page()
        p.page.evaluate("""([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'image/png'}));
            const zone = document.getElementById('dropzone');
            for (const type of ['dragenter', 'dragover', 'drop']) {
                zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
            }
        }""", ["dropped.png", base64.b64encode(data).decode()])
        self.assertEqual([c["name"] for c in p.cards()], ["dropped.png"])
        self.assertFalse(p.page.locator("#dropzone").evaluate("el => el.classList.contains('is-dragover')"))
        p.caption()
        card = p.cards()[0]
        self.assertEqual(card["caption"], self.api_caption([("dropped.png", data)])[0]["caption"])
        self.assertEqual((card["preview"]["width"], card["preview"]["height"]), checkerboard.size)
        self.assert_clean(p)

    def test_a_big_selection_goes_out_in_requests_of_eight_and_results_show_as_they_come(self) -> None:
        _, _, noise = sample_images()
        files = [(f"photo-{i:02d}.png", _png(noise.rotate(90 * (i % 4)).resize((40 + i, 40))), "image/png")
                 for i in range(10)]
        p = self.open_page()
        held: list[Any] = []
        sizes: list[int] = []

        def hold_the_second(route: Any) -> None:
            sizes.append(route.request.post_data_buffer.count(b'name="images"'))
            if len(sizes) == 2:
                held.append(route)
            else:
                route.fallback()

        p.page.route("**/caption-images", hold_the_second)
        p.choose(*(_payload(*f) for f in files))
        p.page.get_by_role("button", name="Caption Images").click()
        p.wait_until(lambda: held)
        p.wait_until("document.querySelectorAll('.card[data-state=done]').length === 8")
        self.assertEqual([c["state"] for c in p.cards()], ["done"] * 8 + ["pending"] * 2)
        held[0].fallback()
        p.wait_settled()
        self.assertEqual(sizes, [8, 2])
        expected = self.api_caption([(name, data) for name, data, _ in files])
        shown = p.cards()
        self.assertEqual([(c["name"], c["caption"], c["tags"]) for c in shown],
                         [(r["filename"], r["caption"], r["tags"]) for r in expected])
        self.assert_clean(p)

    def test_prompt_typed_by_the_user_is_sent(self) -> None:
        gradient, _, _ = sample_images()
        data = _jpeg(gradient)
        p = self.open_page()
        p.page.get_by_label("Prompt").fill("a plate of")
        p.choose(_payload("gradient.jpg", data, "image/jpeg"))
        p.caption()
        card = p.cards()[0]
        self.assertEqual(card["caption"], self.api_caption([("gradient.jpg", data)], prompt="a plate of")[0]["caption"])
        self.assertIn("a plate of", p.page.locator(".card__meta").first.text_content())
        self.assert_clean(p)

    def test_copy_caption_and_tags(self) -> None:
        _, _, noise = sample_images()
        data = _png(noise)
        p = self.open_page()
        p.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=self.server.url)
        p.choose(_payload("noise.png", data, "image/png"))
        p.caption()
        result = self.api_caption([("noise.png", data)])[0]
        p.page.get_by_role("button", name="Copy caption").click()
        p.wait_until("document.querySelector('.copy-caption').textContent.startsWith('Copied')")
        self.assertEqual(p.page.evaluate("navigator.clipboard.readText()"), result["caption"])
        p.page.get_by_role("button", name="Copy tags").click()
        p.wait_until("document.querySelector('.copy-tags').textContent.startsWith('Copied')")
        self.assertEqual(p.page.evaluate("navigator.clipboard.readText()"), ", ".join(result["tags"]))
        self.assert_clean(p)

    def test_phone_width_has_no_horizontal_overflow(self) -> None:
        gradient, checkerboard, _ = sample_images()
        p = self.open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        p.choose(_payload("a-rather-long-file-name-without-any-spaces-at-all-from-a-phone-camera-0001.jpg",
                          _jpeg(gradient), "image/jpeg"),
                 _payload("checkerboard.png", _png(checkerboard), "image/png"),
                 _payload("notes.txt", b"not an image", "text/plain"))
        p.caption()
        self.assertEqual([c["state"] for c in p.cards()], ["done", "done", "error"])
        width = p.page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        self.assertLessEqual(width[0], width[1], "the page scrolls sideways at phone width")
        for box in p.page.locator(".card, .panel").evaluate_all("els => els.map(e => e.getBoundingClientRect().right)"):
            self.assertLessEqual(box, 390)
        p.screenshot("phone.png", full_page=True)
        self.assert_clean(p)

    def test_keyboard_reaches_the_file_picker_and_the_button(self) -> None:
        _, checkerboard, _ = sample_images()
        p = self.open_page()
        choosers: list[Any] = []
        p.page.on("filechooser", lambda chooser: choosers.append(chooser))  # before the key press: the dialog is intercepted, not shown
        seen: list[str] = []
        for _ in range(12):
            p.page.keyboard.press("Tab")
            seen.append(p.page.evaluate("document.activeElement.id || document.activeElement.tagName"))
            if seen[-1] == "file-input":
                # the drop zone shows that it has the focus, and Space opens the file picker
                shadow = p.page.locator("#dropzone").evaluate("el => getComputedStyle(el).boxShadow")
                self.assertNotEqual(shadow, "none")
                p.page.keyboard.press("Space")
                p.wait_until(lambda: choosers)
                choosers[0].set_files([_payload("keyboard.png", _png(checkerboard), "image/png")])
            if seen[-1] == "caption-button":
                break
        self.assertIn("file-input", seen)
        self.assertEqual(seen[-1], "caption-button", seen)
        p.page.keyboard.press("Enter")
        p.wait_settled()
        card = p.cards()[0]
        self.assertEqual((card["name"], card["state"]), ("keyboard.png", "done"))
        self.assert_clean(p)

    def _save_demo_png(self, p: Page) -> None:
        """The README's screenshot: the results at 1200 px, written only when missing or asked for."""
        if DEMO_PNG.exists() and os.environ.get("UPDATE_DEMO_PNG") != "1":
            return
        DEMO_PNG.parent.mkdir(parents=True, exist_ok=True)
        p.page.evaluate("window.scrollTo(0, 0)")
        png = p.page.screenshot(full_page=True)
        # An 8-bit palette keeps the committed file small; the page is flat colours and text.
        Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                            dither=Image.Dither.NONE).save(DEMO_PNG, optimize=True)


class AdminTokenTest(BrowserTestCase):
    """Against a server with ADMIN_TOKEN set: the cache button needs the token."""

    server_name = "admin"

    @classmethod
    def setUpClass(cls) -> None:
        _servers[cls.server_name].wait_ready()

    def test_clear_cache_without_then_with_the_token(self) -> None:
        p = self.open_page()
        self.assertIn("needs one", p.page.locator("label[for=admin-token]").text_content())
        answer = requests.post(self.server.url + "/reset-redis", timeout=10).json()
        self.assertEqual(p.clear_cache(), f"Not allowed (401): {answer['error']['message']}")
        p.page.get_by_label("Admin token").fill("wrong")
        self.assertEqual(p.clear_cache(), f"Not allowed (401): {answer['error']['message']}")
        p.page.get_by_label("Admin token").fill(ADMIN_TOKEN)
        self.assertEqual(p.clear_cache(), "In-process cache cleared (no Redis is in use): 0 entries deleted.")
        p.screenshot("admin-token.png")
        self.assert_clean(p, expected_console=r"Failed to load resource: the server responded with a status of 401")


class ApiKeyTest(BrowserTestCase):
    """Against a server with API_KEY set: the page asks for the key and sends it as a Bearer token."""

    server_name = "keyed"

    @classmethod
    def setUpClass(cls) -> None:
        _servers[cls.server_name].wait_ready()

    def test_caption_without_then_with_the_key(self) -> None:
        image = _png(sample_images()[1])
        refused = self.server.post_images([("photo.png", image)])
        self.assertEqual(refused.status_code, 401)
        expected = self.server.post_images([("photo.png", image)],
                                           headers={"Authorization": f"Bearer {API_KEY}"}).json()["results"][0]
        p = self.open_page()
        self.assertIn("needs one", p.page.locator("label[for=api-key]").text_content())
        p.choose(_payload("photo.png", image, "image/png"))
        p.caption()
        [card] = p.cards()
        self.assertEqual((card["state"], card["error"], card["caption"]),
                         ("error", refused.json()["error"]["message"], None))
        p.page.get_by_label("API key").fill("wrong")
        p.caption()
        self.assertEqual(p.cards()[0]["error"], refused.json()["error"]["message"])
        p.page.get_by_label("API key").fill(API_KEY)
        p.caption()
        [card] = p.cards()
        self.assertEqual((card["state"], card["caption"], card["tags"]), ("done", expected["caption"], expected["tags"]))
        p.screenshot("api-key.png")
        self.assert_clean(p, expected_console=r"Failed to load resource: the server responded with a status of 401")


if __name__ == "__main__":
    unittest.main()
