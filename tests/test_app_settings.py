"""The Settings page's webhooks box (AppTest of the real entry file, a real Redis, a real worker delivering to a real
HTTP receiver started by the test): a bad hook is refused with the reason and nothing saved; a hook added on the page
hears of a model registered, signed; its delivery shows in its log on the page; Remove removes it."""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

from tests.fixtures_app import open_page, seed_finished_job, texts
from tests.fixtures_worker import run_cli, wait_for
from tests.test_notify import Receiver, receiver  # noqa: F401 - the receiver fixture
from worker import api


def add(at: Any, url: str, events: list[str] | None = None, secret: str = "") -> Any:
    at.text_input(key="settings:hook:url").set_value(url)
    if events is not None:
        at.multiselect(key="settings:hook:events").set_value(events)
    at.text_input(key="settings:hook:secret").set_value(secret)
    next(b for b in at.button if b.label == "Add webhook").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_webhooks_added_delivered_and_removed_on_the_settings_page(redis_conn: Any, job_env: dict[str, str],
                                                                  spawn: Any, receiver: Receiver,  # noqa: F811
                                                                  exported_run: Path) -> None:
    at = open_page("settings")
    assert not at.exception, [e.value for e in at.exception]
    assert "No webhook yet" in texts(at)
    for url, events, message in (("ftp://example.org/hook", None, "give an http:// or https:// URL"),
                                 ("http://example.org:99999/hook", None, "the port is not a number"),
                                 (receiver.url + "/hook", [], "choose at least one event")):
        add(at, url, events)
        assert message in texts(at), texts(at)
        assert api.notify.list_hooks(redis_conn) == []  # nothing saved

    add(at, receiver.url + "/hook", ["model.registered", "alias.moved"], "s3cret")
    (hook,) = api.notify.list_hooks(redis_conn)
    assert hook.url == receiver.url + "/hook" and hook.events == ["model.registered", "alias.moved"] and hook.secret
    assert f"Webhook {hook.id} added" in texts(at) and "Events: model.registered, alias.moved" in texts(at)
    assert "Nothing delivered yet." in texts(at)

    job_id = seed_finished_job(redis_conn, exported_run)
    spawn.python(["worker", "run", "--cpu", "--slots", "1", "--no-prewarm"], job_env, name="worker")
    assert run_cli(["worker", "model", "register", job_id, "--name", "digits"], job_env).returncode == 0
    wait_for(lambda: receiver.events("/hook"), 60, "the model.registered delivery")
    (event,) = receiver.events("/hook")
    assert event["event"] == "model.registered" and event["model"] == "digits"
    raw = receiver.got[0]
    assert raw["headers"]["X-Trainer-Signature"] == "sha256=" + hmac.new(b"s3cret", raw["body"],
                                                                         hashlib.sha256).hexdigest()

    wait_for(lambda: api.notify.delivery_log(redis_conn, hook.id), 10, "the delivery in the hook's log")
    at.run()
    log = next(d.value for d in at.dataframe if "result" in d.value.columns)
    assert list(log["event"]) == ["model.registered"] and list(log["result"]) == ["ok"]
    assert list(log["status"]) == ["200"] and list(log["about"]) == [job_id]

    at.button(key=f"settings:hook:rm:{hook.id}").click().run()
    assert not at.exception and f"Webhook {hook.id} removed" in texts(at) and "No webhook yet" in texts(at)
    assert api.notify.list_hooks(redis_conn) == []
