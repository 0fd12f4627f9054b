"""The Models page in a real browser: Debian's Chromium driven by Playwright against `streamlit run` and a real
redis-server (tests/test_browser.py starts them the same way; no worker is needed to register or move aliases).

A finished job (the exported digits run of tests/fixtures_runs.py) is registered twice from its Job page's "Register
model" button; the Models page shows both versions side by side; the alias form points `production` at version 1,
then moves it to version 2, and the page shows each change. Screenshots land in tests/screenshots/ (git-ignored).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_app import seed_finished_job
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, settle, shot, start_dashboard

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # about 100 s on 2 busy cores


def register_twice_from_the_job_page(page: Any, base: str, job_id: str) -> None:
    """The Job page's "Register model" popover: name the model, press Register twice (versions 1 and 2)."""
    page.goto(f"{base}/job?job={job_id}")
    page.get_by_text("Test accuracy", exact=True).wait_for()
    settle(page)
    popover = page.get_by_test_id("stPopover").filter(has_text="Register model").get_by_role("button").first
    popover.click()
    name = page.get_by_label("Model name", exact=True)
    name.fill("digits")
    name.press("Tab")
    for version in (1, 2):
        button = page.get_by_role("button", name="Register", exact=True)
        if not button.is_visible():  # the rerun closed the popover
            popover.click()
        button.click()
        page.get_by_text(f"Registered digits:{version}").wait_for()
        settle(page)


def point_alias(page: Any, alias: str, version: int) -> None:
    """The alias form: type the alias, pick the version in the select box, press the button."""
    field = page.get_by_label("Alias", exact=True)
    field.fill(alias)
    field.press("Tab")
    page.get_by_test_id("stSelectbox").filter(has_text="Version").click()
    page.get_by_role("option", name=str(version), exact=True).click()
    page.get_by_role("button", name="Point the alias at this version").click()


def test_models_page_versions_side_by_side_and_an_alias_moved(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                              exported_run: Path) -> None:
    from playwright.sync_api import sync_playwright

    from worker import api

    require_chromium()
    job_id = seed_finished_job(redis_conn, exported_run, name="digits run")
    base, _ = start_dashboard(job_env, spawn)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1300})
            page.set_default_timeout(60_000)
            register_twice_from_the_job_page(page, base, job_id)
            assert [v.version for v in api.models.model_versions(redis_conn, "digits")] == [1, 2]

            page.goto(f"{base}/models?model=digits")
            page.get_by_text("digits: versions").wait_for()
            settle(page)
            versions = page.get_by_test_id("stDataFrame").nth(1)  # the first is the list of models
            for column in ("version", "aliases", "accuracy", "macro F1", "serves", "size", "job"):
                versions.get_by_text(column, exact=True).first.wait_for(state="attached")
            assert versions.get_by_text(job_id).count() == 2  # each version's source job, one row each
            page.get_by_text("None yet.").wait_for()  # no alias yet
            shot(page, "models-1-versions")

            point_alias(page, "production", 1)
            page.get_by_text("digits@production → 1").first.wait_for()
            page.get_by_text("production → version 1").wait_for()
            settle(page)
            assert api.models.aliases(redis_conn, "digits") == {"production": 1}

            point_alias(page, "production", 2)
            page.get_by_text("digits@production → 2 (was 1)").wait_for()
            page.get_by_text("production → version 2").wait_for()
            settle(page)
            assert api.models.aliases(redis_conn, "digits") == {"production": 2}
            assert not page.get_by_text(re.compile(r"production → version 1")).count()
            versions = page.get_by_test_id("stDataFrame").nth(1)
            versions.get_by_text("production", exact=True).wait_for(state="attached")  # the aliases column
            assert versions.get_by_text("production", exact=True).count() == 1
            assert not page.get_by_test_id("stException").count()
            shot(page, "models-2-alias-moved")
        finally:
            browser.close()
