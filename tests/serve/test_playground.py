"""The web playground end to end in a real headless Chromium (Debian's ``chromium``, driven by
Playwright): vectors load, Generate streams unsteered and steered completions side by side.
A screenshot is saved to ``artifacts/playground.png``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import live_server

from avec.data.demo import DEMO_PAIRS
from avec.directions.extract import extract

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium package "
                    "(apt-get install chromium); the playground test needs it")
    return path


@pytest.mark.real_model
def test_playground_in_chromium(real_model):
    from avec.serve import Engine, Limits, VectorRegistry, create_app

    from avec.vector import Recommendation

    registry = VectorRegistry(real_model)
    # a tuned vector: the page starts its controls at the recommended setting
    registry.put("ocean", extract(real_model, DEMO_PAIRS, [12, 14]).with_recommendation(
        Recommendation((14,), 7.5, details={"budget": {"metric": "kl", "max": 1.0}})))
    engine = Engine(real_model, registry, Limits(max_tokens=64))
    app = create_app(engine, api_key="k3y", model_id=real_model.name)
    try:
        with live_server(app) as url:
            plain, steered = browse(url, real_model.name)
    finally:
        engine.shutdown()
    assert plain and steered and plain != steered
    assert any(w in steered.lower() for w in ("ocean", "sea", "shore", "wave", "beach"))


def browse(url: str, model_name: str) -> tuple[str, str]:
    """Drive the page like a user; return the unsteered and steered texts it shows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(f"{url}/")
            assert "avec playground" in page.title()
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "API key" in page.inner_text("#error")  # the key is required and asked for
            page.fill("#key", "k3y")
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#vector option[value=ocean]", state="attached")
            assert model_name in page.inner_text("#model")
            assert page.input_value("#coef") == "7.5" and page.input_value("#layers") == "14"
            assert "recommended: 7.5 at layer(s) 14 (kl <= 1)" in page.inner_text("#rec")
            page.fill("#prompt", "Tell me about your day.")
            page.fill("#max", "24")
            page.click("#go")
            page.wait_for_function("!document.getElementById('go').disabled && "
                                   "document.getElementById('steered').textContent.length > 0",
                                   timeout=60_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
            assert page.inner_text("#error") == ""
            return page.inner_text("#plain"), page.inner_text("#steered")
        finally:
            browser.close()
