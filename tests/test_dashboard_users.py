"""The dashboard's people (README "Users and roles", "Dashboard access"): with users registered, every session signs in
with a user name and token (also on loopback), wrong tries are throttled in Redis (a new session does not start over)
and written to the audit log, admins get the Users and Audit pages, OIDC needs an allow-list (app/auth.py). The real
entry file through AppTest against a real Redis; `python -m app` as a process."""
from __future__ import annotations

import io
import json
from typing import Any

import pytest

from tests.fixtures_app import APP, open_page, texts, wait_until
from tests.test_dashboard_access import start_dashboard, web_env  # noqa: F401 - web_env: a fixture
from tests.fixtures_worker import run_cli
from worker import audit, signin, users

LOGIN_VARS = ("DASHBOARD_PASSWORD", "DASHBOARD_ADDRESS", "DASHBOARD_ALLOW_OPEN", "DASHBOARD_ALLOWED_EMAILS",
              "DASHBOARD_ALLOWED_DOMAINS", "DASHBOARD_ALLOWED_GROUPS", "DASHBOARD_DEFAULT_ROLE")


@pytest.fixture
def app_env(redis_conn: Any, job_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for var in LOGIN_VARS:
        monkeypatch.delenv(var, raising=False)
    return redis_conn


def sign_in(name: str, token: str, at: Any = None) -> Any:
    """An AppTest session of the entry page that typed `name` and `token` into the sign-in form."""
    from streamlit.testing.v1 import AppTest

    if at is None:
        at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert [t.value for t in at.title] == ["Sign in"], texts(at)
    fields = {t.label: t for t in at.text_input}
    fields["User name"].input(name)
    fields["Token"].input(token)
    return at.button[0].click().run()


def signed_in_as(at: Any) -> str:
    return " ".join(str(c.value) for c in at.sidebar.caption)


def test_no_users_keeps_todays_dashboard(app_env: Any) -> None:
    """Nobody is asked; the session is the admin `operator`, who may add the first user (it must be an admin, and the
    session then goes on as that user and sees its token once)."""
    at = open_page("jobs")
    assert not at.exception and at.title[0].value == "Jobs"
    at.switch_page("views/users.py").run()
    assert not at.exception and at.title[0].value == "Users"
    at.text_input(key="users:add:name").input("vic")
    at.selectbox(key="users:add:role").select("viewer")
    at.button[0].click().run()
    assert "the first user must be an admin" in texts(at) and not users.any_users(app_env)
    at.text_input(key="users:add:name").input("ada")
    at.selectbox(key="users:add:role").select("admin")
    at.button[0].click().run()
    assert not at.exception
    token = at.code[0].value
    assert users.by_token(app_env, token).name == "ada"
    assert "Signed in as **ada** (admin)" in signed_in_as(at)
    assert [(e.actor, e.action, e.target) for e in audit.entries(app_env)][:2] == [
        ("operator", "user.add", "ada"), ("ada", "session.sign_in", "ada")]


def test_users_sign_in_with_a_token_and_get_their_role(app_env: Any) -> None:
    _, ada = users.add_user(app_env, "ada", "admin")
    _, vic = users.add_user(app_env, "vic", "viewer")
    at = sign_in("ada", vic)  # a real token, of someone else
    assert "Wrong user name or token." in texts(at) and [t.value for t in at.title] == ["Sign in"]
    at = sign_in("ada", ada, at)
    assert not at.exception and at.title[0].value == "New job"
    assert "Signed in as **ada** (admin)" in signed_in_as(at)
    at.switch_page("views/audit.py").run()
    assert not at.exception and at.title[0].value == "Audit"
    table = at.dataframe[0].value
    assert list(table["action"])[:2] == ["session.sign_in", "session.sign_in_failed"]  # newest first
    assert list(table["from"])[1] == "dashboard 127.0.0.1"

    at = sign_in("vic", vic)
    assert "Signed in as **vic** (viewer)" in signed_in_as(at)
    with pytest.raises(ValueError, match="Could not find a navigation page"):  # not in a viewer's navigation
        at.switch_page("views/users.py").run()


def test_a_rotated_token_or_removed_user_loses_the_session(app_env: Any) -> None:
    users.add_user(app_env, "ada", "admin")
    _, bob = users.add_user(app_env, "bob", "submitter")
    at = sign_in("bob", bob)
    assert at.title[0].value == "New job"
    users.rotate_token(app_env, "bob")
    at.run()
    assert [t.value for t in at.title] == ["Sign in"] and "sign in again" in texts(at)


def test_a_click_after_a_demotion_or_removal_acts_as_the_user_is_now(app_env: Any) -> None:
    """Callbacks run before the page is drawn: each re-checks its user first, so a demoted submitter's Cancel is
    refused and a removed user's click does nothing (the session goes back to the sign-in form)."""
    from tests.fixtures_app import submit_digits
    from worker import api

    users.add_user(app_env, "ada", "admin")
    bob_user, bob = users.add_user(app_env, "bob", "submitter")
    job = submit_digits(app_env, actor=bob_user.actor())
    at = open_as("bob", bob, "jobs")
    at.multiselect(key="jobs:picked").set_value([job]).run()
    users.set_role(app_env, "bob", "viewer")
    at.button(key="jobs:cancel").click().run()
    assert "needs the submitter role" in texts(at) and api.job_status(app_env, job)["state"] == "queued"

    users.set_role(app_env, "bob", "submitter")
    at = open_as("bob", bob, "jobs")
    at.multiselect(key="jobs:picked").set_value([job]).run()
    users.remove_user(app_env, "bob")
    at.button(key="jobs:cancel").click().run()
    assert [t.value for t in at.title] == ["Sign in"] and "sign in again" in texts(at)
    assert api.job_status(app_env, job)["state"] == "queued"


def test_wrong_tries_are_throttled_across_sessions_and_logged(app_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """After FREE_TRIES wrong tries, the next try is not even checked until the delay has passed, also from a new
    session (the counter is in Redis, per address); then the right token works again."""
    monkeypatch.setattr(signin, "FIRST_DELAY", 6.0)
    _, ada = users.add_user(app_env, "ada", "admin")
    at = None
    for i in range(signin.FREE_TRIES):
        at = sign_in("ada", f"wrong-{i}", at)
        assert "Wrong user name or token." in texts(at)
    assert "wait 6 s" in texts(at)
    at = sign_in("ada", ada, at)  # right, but not checked yet
    assert "Too many wrong tries" in texts(at) and [t.value for t in at.title] == ["Sign in"]
    fresh = sign_in("ada", ada)  # a new session from the same address waits too
    assert "Too many wrong tries" in texts(fresh)
    subjects = signin.subjects("127.0.0.1", None)
    wait_until(lambda: signin.wait_left(app_env, subjects) == 0, 20, "the delay to pass")
    fresh = sign_in("ada", ada, fresh)
    assert not fresh.exception and fresh.title[0].value == "New job"
    failed = [e for e in audit.entries(app_env) if e.action == audit.AuditAction.SIGN_IN_FAILED.value]
    assert len(failed) == signin.FREE_TRIES + 2 and {e.address for e in failed} == {"127.0.0.1"}
    assert [e.detail.get("reason") for e in failed[-2:]] == ["throttled", "throttled"]


def test_delays_grow_and_are_capped() -> None:
    delays = [signin.delay_after(n) for n in range(1, 16)]
    assert delays[:signin.FREE_TRIES - 1] == [0.0] * (signin.FREE_TRIES - 1)
    assert delays[signin.FREE_TRIES - 1:signin.FREE_TRIES + 2] == [2.0, 4.0, 8.0]
    assert max(delays) == signin.MAX_DELAY


def test_the_shared_password_is_throttled_and_logs_out(app_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DASHBOARD_PASSWORD", "correct horse")
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.text_input[0].input("nope")
    at = at.button[0].click().run()
    assert "Wrong password." in texts(at)
    at.text_input[0].input("correct horse")
    at = at.button[0].click().run()
    assert at.title[0].value == "New job"
    at.sidebar.button(key="auth:logout").click().run()
    assert [t.value for t in at.title] == ["Sign in"]
    assert [e.action for e in audit.entries(app_env)] == ["session.sign_in_failed", "session.sign_in",
                                                          "session.sign_out"]


def test_audit_download_is_json_lines(app_env: Any) -> None:
    _, ada = users.add_user(app_env, "ada", "admin")
    at = sign_in("ada", ada)
    at.switch_page("views/audit.py").run()
    out = io.StringIO()
    assert audit.export_jsonl(app_env, out) == 1
    assert json.loads(out.getvalue())["action"] == "session.sign_in"
    assert at.get("download_button")  # the page offers the same export


# --------------------------------------------------------------------------------------------------------- OIDC
def test_oidc_needs_an_allow_list(app_env: Any, job_env: dict[str, str], tmp_path: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Single sign-on that would admit every account of the provider is refused, saying how to fix it; with an
    allow-list the entry page offers the provider's "Log in". A bad DASHBOARD_DEFAULT_ROLE stops `python -m app`."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from app import auth

    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[auth]\nredirect_uri = "http://localhost:8501/oauth2callback"\ncookie_secret = "x"\n'
                       'client_id = "c"\nclient_secret = "s"\n'
                       'server_metadata_url = "https://accounts.example.org/.well-known/openid-configuration"\n')
    before = st.get_option("secrets.files")
    st.config.set_option("secrets.files", [str(secrets)])
    st.secrets._reset()
    try:
        assert auth.oidc_configured()
        refusal = auth.access_refusal()
        assert refusal and "no allow-list" in refusal
        for fix in ("DASHBOARD_ALLOWED_EMAILS=", "DASHBOARD_ALLOWED_DOMAINS=", "DASHBOARD_ALLOWED_GROUPS=", "[access]"):
            assert fix in refusal, fix
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.title and "no allow-list" in at.error[0].value
        monkeypatch.setenv("DASHBOARD_ALLOWED_DOMAINS", "example.org")
        assert auth.access_refusal() is None
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.exception and [t.value for t in at.title] == ["Sign in"] and at.button[0].label == "Log in"
    finally:
        st.config.set_option("secrets.files", before)
        st.secrets._reset()
    env = {k: v for k, v in job_env.items() if k not in LOGIN_VARS}
    res = run_cli(["app"], {**env, "DASHBOARD_DEFAULT_ROLE": "root"}, timeout=60)
    assert res.returncode == 2 and "DASHBOARD_DEFAULT_ROLE: unknown role 'root'" in res.stderr


def test_the_allow_list_decides_who_gets_in_and_with_what_role(app_env: Any) -> None:
    from app.auth import AllowList, oidc_actor

    allowed = AllowList(emails=frozenset({"guest@gmail.com"}), domains=frozenset({"example.org"}),
                        groups=frozenset({"ml-team"}))
    viewer = users.Role.VIEWER
    claims = {"email": "eve@evil.example", "email_verified": True}
    assert oidc_actor(app_env, claims, allowed, viewer) is None
    assert oidc_actor(app_env, {**claims, "groups": ["ml-team"]}, allowed, viewer) is not None
    assert oidc_actor(app_env, {"email": "x@sub.example.org"}, allowed, viewer) is None  # exact domains only
    assert oidc_actor(app_env, {"email": "ada@example.org", "email_verified": False}, allowed, viewer) is None
    no_users = oidc_actor(app_env, {"email": "ada@example.org"}, allowed, viewer)
    assert no_users.name == users.OPERATOR and no_users.is_admin  # no user registered: the rules are off
    users.add_user(app_env, "ada", "admin", email="Ada@Example.org")
    assert oidc_actor(app_env, {"email": "ada@example.org"}, allowed, viewer).name == "ada"
    guest = oidc_actor(app_env, {"email": "Guest@gmail.com"}, allowed, viewer, "10.1.2.3")
    assert (guest.name, guest.role, guest.address) == ("guest@gmail.com", viewer, "10.1.2.3")


# ------------------------------------------------------------------------------------------------------- log-out
@pytest.mark.browser
def test_log_out_ends_the_sessions_power(web_env: dict[str, str], spawn: Any, redis_conn: Any) -> None:
    """What a browser sends after its log-out on behalf of the signed-in page does nothing: a "Cancel" click held
    back and replayed after the log-out cancels nothing, and the live fragment's rerun replayed then draws nothing
    (a real server, a real Chromium; the frames are the browser's own, captured on its websocket). Streamlit itself
    still runs the stored fragment when asked: without `auth.guarded` the job's charts and log are drawn again."""
    import re

    from playwright.sync_api import sync_playwright
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    from tests.fixtures_app import submit_digits
    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, settle
    from worker import api

    require_chromium()
    admin, ada = users.add_user(redis_conn, "ada", "admin")
    job = submit_digits(redis_conn, actor=admin.actor())  # queued (no worker): its page has Cancel and a live fragment
    _, base = start_dashboard(spawn, web_env)
    held: dict[str, bytes] = {}
    fragment_deltas: list[str] = []
    finished: list[int] = []
    servers: list[Any] = []

    def route(ws: Any) -> None:
        server = ws.connect_to_server()
        servers.append(server)

        def to_server(frame: bytes | str) -> None:
            if isinstance(frame, bytes):
                msg = BackMsg()
                msg.ParseFromString(frame)
                rerun = msg.rerun_script if msg.WhichOneof("type") == "rerun_script" else None
                if rerun is not None and rerun.fragment_id:
                    held["fragment"] = frame
                if rerun is not None and any(w.id.endswith("job:cancel") and w.trigger_value
                                             for w in rerun.widget_states.widgets):
                    held["cancel"] = frame  # the click never reaches the server now
                    return
            server.send(frame)

        def to_page(frame: bytes | str) -> None:
            if isinstance(frame, bytes):
                msg = ForwardMsg()
                msg.ParseFromString(frame)
                kind = msg.WhichOneof("type")
                if kind == "delta" and msg.delta.fragment_id:
                    if msg.delta.WhichOneof("type") == "new_element":  # (its empty container is no content)
                        fragment_deltas.append(msg.delta.fragment_id)
                elif kind == "script_finished":
                    finished.append(1)
            ws.send(frame)

        ws.on_message(to_server)
        server.on_message(to_page)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            page.route_web_socket(re.compile(r"/_stcore/stream"), route)

            def until(predicate: Any, what: str) -> None:  # Playwright delivers frames only while it is called
                wait_until(lambda: predicate() or page.wait_for_timeout(100), 30, what, interval=0.05)

            page.goto(f"{base}/job?job={job}")
            page.get_by_label("User name", exact=True).fill("ada")
            page.get_by_label("Token", exact=True).fill(ada)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("button", name="Log out").wait_for()
            page.get_by_test_id("stSidebarNav").get_by_text("Job", exact=True).click()  # the newest job: ours
            page.get_by_role("button", name="Cancel").wait_for()
            until(lambda: "fragment" in held and fragment_deltas, "the live fragment to rerun")
            settle(page)
            page.get_by_role("button", name="Cancel").click()
            until(lambda: "cancel" in held, "the Cancel click")
            page.get_by_role("button", name="Log out").click()
            page.get_by_role("heading", name="Sign in").wait_for()
            settle(page)
            fragment_id = BackMsg.FromString(held["fragment"]).rerun_script.fragment_id
            fragment_deltas.clear()
            for frame in (held["cancel"], held["fragment"]):  # what the signed-in page would have sent
                before = len(finished)
                servers[-1].send(frame)
                until(lambda: len(finished) > before, "the server to answer the replayed frame")
        finally:
            browser.close()
    assert api.job_status(redis_conn, job)["state"] == "queued"  # the Cancel click did nothing
    assert fragment_id not in fragment_deltas  # the live fragment ran (Streamlit still had it) and drew nothing
    assert [e.action for e in audit.entries(redis_conn)] == ["job.submit", "session.sign_in", "session.sign_out"]


# ---------------------------------------------------------------------------------------------- roles on the pages
def open_as(name: str, token: str, page: str, query: dict[str, str] | None = None) -> Any:
    """An AppTest session signed in as `name`, showing `page` (a key of tests.fixtures_app.PAGES)."""
    from tests.fixtures_app import PAGES

    at = sign_in(name, token)
    assert "Signed in as" in signed_in_as(at), texts(at)
    at.query_params.update(query or {})
    if PAGES[page] != PAGES["new"]:
        at.switch_page(PAGES[page]).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def buttons(at: Any) -> set[str]:
    return {b.label for b in at.button}


def test_pages_show_mine_first_and_only_the_buttons_a_role_may_use(app_env: Any) -> None:
    from tests.fixtures_app import submit_digits
    from worker import api

    _, ada = users.add_user(app_env, "ada", "admin")
    bob_user, bob = users.add_user(app_env, "bob", "submitter")
    _, vic = users.add_user(app_env, "vic", "viewer")
    ada_job = submit_digits(app_env, name="ada's", actor=users.get_user(app_env, "ada").actor())
    bob_job = submit_digits(app_env, name="bob's", actor=bob_user.actor())

    at = open_as("bob", bob, "jobs")
    assert at.radio(key="jobs:owner").value == "Mine"
    assert list(at.dataframe[0].value["name"]) == ["bob's"] and list(at.dataframe[0].value["owner"]) == ["bob"]
    at.radio(key="jobs:owner").set_value("Everyone").run()
    table = at.dataframe[0].value
    assert list(table["name"]) == ["bob's", "ada's"] and list(table["owner"]) == ["bob", "ada"]
    at.multiselect(key="jobs:picked").set_value([ada_job]).run()
    assert at.button(key="jobs:cancel").disabled and at.button(key="jobs:delete").disabled  # not his
    at.multiselect(key="jobs:picked").set_value([bob_job]).run()
    at.button(key="jobs:cancel").click().run()
    assert not at.exception and api.job_status(app_env, bob_job)["state"] == "cancelled"
    cancel = [e for e in audit.entries(app_env) if e.action == "job.cancel"]
    assert [(e.actor, e.target, e.source) for e in cancel] == [("bob", bob_job, "dashboard")]

    at = open_as("bob", bob, "job", {"job": ada_job})  # another's job: no Cancel; his own: Cancel
    assert "Cancel" not in buttons(at) and "Clone" in buttons(at)

    at = open_as("vic", vic, "jobs")
    at.radio(key="jobs:owner").set_value("Everyone").run()
    assert len(at.dataframe[0].value) == 2
    assert {"Cancel", "Retry", "Clone", "Delete…"}.isdisjoint(buttons(at))
    at = open_as("vic", vic, "new")
    assert "viewers see every job" in texts(at) and "Submit job" not in buttons(at)
    at = open_as("vic", vic, "datasets")
    assert "Register" not in buttons(at)

    at = open_as("ada", ada, "job", {"job": bob_job})
    assert "Retry" in buttons(at)  # an admin may act on anyone's job
    at = open_as("ada", ada, "job", {"job": ada_job})
    at.button(key="job:cancel").click().run()
    assert api.job_status(app_env, ada_job)["state"] == "cancelled"


def test_datasets_show_their_owner_and_only_the_owner_removes(app_env: Any, tmp_path: Any) -> None:
    from tests.test_app_datasets import shapes
    from worker import api

    ada_user, ada = users.add_user(app_env, "ada", "admin")
    bob_user, bob = users.add_user(app_env, "bob", "submitter")
    api.datasets.register(app_env, "adas", str(shapes(tmp_path, "a")), actor=ada_user.actor())
    api.datasets.register(app_env, "bobs", str(shapes(tmp_path, "b")), actor=bob_user.actor())

    at = open_as("bob", bob, "datasets")
    listed = at.dataframe[0].value
    assert list(listed["name"]) == ["bobs"] and list(listed["owner"]) == ["bob"]  # "Mine" first
    assert "Remove bobs:1…" in buttons(at)
    at.radio(key="datasets:owner").set_value("Everyone").run()
    at.selectbox(key="datasets:name").select("adas").run()
    assert not at.exception and "registered" in texts(at) and "by ada" in texts(at)
    assert not any(label.startswith("Remove") for label in buttons(at))  # not his

    at = open_as("ada", ada, "datasets")
    at.radio(key="datasets:owner").set_value("Everyone").run()
    at.selectbox(key="datasets:name").select("bobs").run()
    assert "Remove bobs:1…" in buttons(at)  # an admin may
