"""The Models page and the Job page's Register button (AppTest of the real entry file, a real Redis, a run folder
trained and exported by core)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fixtures_app import open_page, seed_finished_job, texts
from worker import api


def test_register_from_the_job_page_then_alias_and_deploy_on_the_models_page(redis_conn: Any, job_env: dict[str, str],
                                                                            exported_run: Path) -> None:
    job_id = seed_finished_job(redis_conn, exported_run, name="digits run")
    at = open_page("job", {"job": job_id})
    assert not at.exception, [e.value for e in at.exception]
    at.text_input(key="job:model:name").set_value("digits")
    at.button(key="job:model:register").click().run()
    assert not at.exception and "Registered [digits:1](/models?model=digits)" in texts(at)
    assert [v.version for v in api.models.model_versions(redis_conn, "digits")] == [1]
    at.button(key="job:model:register").click().run()  # a second version of the same job's export

    at = open_page("models", {"model": "digits"})
    assert not at.exception, [e.value for e in at.exception]
    versions = next(d.value for d in at.dataframe if "serves" in d.value.columns)
    assert list(versions["version"]) == [1, 2] and versions["accuracy"].notna().all()
    at.text_input(key="models:alias:name").set_value("production")
    at.selectbox(key="models:alias:version").set_value(1)
    next(b for b in at.button if b.label.startswith("Point the alias")).click().run()
    assert api.models.aliases(redis_conn, "digits") == {"production": 1}
    at.selectbox(key="models:deploy:ref").set_value("digits@production")
    next(b for b in at.button if b.label == "Deploy").click().run()
    (dep,) = api.deployments.listing(redis_conn)
    assert dep["ref"] == "digits@production" and dep["state"] == "starting"  # no worker here: it waits for one
    assert "shown once" in texts(at)
    at.button(key=f"models:undeploy:{dep['id']}").click().run()
    assert api.deployments.listing(redis_conn)[0]["state"] == "stopped"


def test_the_models_page_without_models(redis_conn: Any, job_env: dict[str, str]) -> None:
    at = open_page("models")
    assert not at.exception and "No model is registered yet" in texts(at)
