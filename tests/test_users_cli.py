"""People through the real CLI (`python -m worker user|login|whoami|audit`, and every changing command acting as its
user) on a real Redis: roles, ownership, per-user limits, `--mine`, the audit log and its JSON-lines export."""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_worker import DIGITS, make_imagefolder, run_cli
from worker import accounts, api, audit, keys, users
from worker.errors import PermissionDeniedError, UserError


def cli(args: list[str], env: dict[str, str]) -> Any:
    return run_cli(["worker", *args], env)


def ok(args: list[str], env: dict[str, str]) -> Any:
    out = cli(args, env)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out


def refused(args: list[str], env: dict[str, str], code: int, *fragments: str) -> Any:
    """The command exits `code` with one line naming the problem (no traceback)."""
    out = cli(args, env)
    assert out.returncode == code, (args, out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, (fragment, out.stderr)
    return out


class People:
    """The users a test made, each with the CLI environment that acts as them (TRAINER_TOKEN)."""

    def __init__(self, conn: Any, base: dict[str, str], tmp: Path):
        self.conn = conn
        self.base = {**base, "TRAINER_TOKEN_FILE": str(tmp / "no-token-file")}
        self.base.pop("TRAINER_TOKEN", None)
        self.env: dict[str, dict[str, str]] = {}

    def add(self, name: str, role: str, as_: str | None = None) -> str:
        """Through the CLI, as `as_` (the operator while no user exists)."""
        out = ok(["user", "add", name, "--role", role], self.env[as_] if as_ else self.base)
        token = out.stdout.split()[-1]  # the token is printed once, last
        self.env[name] = {**self.base, "TRAINER_TOKEN": token}
        return token

    def made(self, name: str, role: str) -> None:
        """In this process (worker.accounts, as the CLI's `user add` does it): quicker where the CLI is not tested."""
        actor = self.actor("ada") if "ada" in self.env else None
        _, token = accounts.add(self.conn, name, role, actor=actor)
        self.env[name] = {**self.base, "TRAINER_TOKEN": token}

    def actor(self, name: str) -> users.Actor:
        return users.get_user(self.conn, name).actor("cli")


@pytest.fixture
def people(redis_conn: Any, job_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> People:
    """ada (admin, the first user), bob and cat (submitters), vic (viewer)."""
    for var in ("USER_MAX_ACTIVE_JOBS", "USER_MAX_GPUS"):
        monkeypatch.delenv(var, raising=False)
    crew = People(redis_conn, job_env, tmp_path)
    for name, role in (("ada", "admin"), ("bob", "submitter"), ("cat", "submitter"), ("vic", "viewer")):
        crew.made(name, role)
    return crew


def submit(env: dict[str, str], *extra: str) -> str:
    out = ok(["submit", str(DIGITS), "--set", "train.epochs=1", *extra], env)
    return out.stdout.split()[-1]


def jobs_in_redis(conn: Any) -> int:
    return conn.zcard(keys.jobs_index())


def audit_lines(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    out = ok(["audit", "--json", *args], env)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_role_rules_owners_and_the_audit_log_through_the_cli(redis_conn: Any, people: People) -> None:
    ada, bob, cat, vic = (people.env[n] for n in ("ada", "bob", "cat", "vic"))
    refused(["submit", str(DIGITS)], people.base, 3, "TRAINER_TOKEN")  # users exist: the CLI must say who it is
    refused(["submit", str(DIGITS)], vic, 3, "vic (viewer) may not submit jobs", "needs the submitter role")
    refused(["submit", str(DIGITS), "--priority", "high"], bob, 3, "may not submit with priority high",
            "user limits bob --high-priority")
    assert jobs_in_redis(redis_conn) == 0  # nothing enqueued by any refusal

    mine, theirs = submit(bob), submit(cat)
    refused(["cancel", theirs], bob, 3, "bob (submitter) may not cancel job", "belongs to cat")
    assert api.job_status(redis_conn, theirs)["state"] == "queued"  # nothing changed
    assert ok(["cancel", mine], bob).stdout.strip().endswith("cancelled")
    assert ok(["cancel", theirs], ada).stdout.strip().endswith("cancelled")  # an admin cancels anyone's

    # the owner in status and list, and --mine
    assert "owner      bob" in ok(["status", mine], vic).stdout
    listing = ok(["list"], vic).stdout
    assert "OWNER" in listing and " bob " in listing and " cat " in listing
    assert [j["id"] for j in json.loads(ok(["list", "--mine", "--json"], bob).stdout)] == [mine]

    # the audit log: admins only; exported as JSON lines, who did what to what, from where
    refused(["audit", "--json"], bob, 3, "bob (submitter) may not read the audit log")
    log = audit_lines(ada)
    assert all(set(e) >= {"id", "ts", "actor", "role", "action", "target", "source", "address", "detail"}
               for e in log)
    seen = {(e["actor"], e["action"], e["target"]) for e in log}
    assert {("bob", "job.submit", mine), ("cat", "job.submit", theirs), ("bob", "job.cancel", mine),
            ("ada", "job.cancel", theirs), ("operator", "user.add", "ada"), ("ada", "user.add", "vic")} <= seen
    denied = [e for e in log if e["action"] == "permission.denied"]
    assert {e["actor"] for e in denied} == {"vic", "bob"} and any(theirs in e["target"] for e in denied)
    cancel = next(e for e in log if e["action"] == "job.cancel" and e["target"] == theirs)
    assert (cancel["role"], cancel["source"], cancel["address"]) == ("admin", "cli", socket.gethostname())
    assert cancel["detail"]["owner"] == "cat"


def test_per_user_limits_at_submission(redis_conn: Any, people: People, monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits are checked where submissions are (worker.submit, for the CLI and the dashboard alike): a refusal
    names the limit and the use now, and enqueues nothing."""
    bob, ada = people.actor("bob"), people.actor("ada")

    def submit_as(actor: users.Actor, **kw: Any) -> str:
        return api.submit_job(DIGITS, ["train.epochs=1"], connection=redis_conn, allow_local_paths=True, actor=actor,
                              **kw).job_id

    accounts.change_limits(redis_conn, "bob", users.UserLimits(max_active_jobs=1), actor=ada)
    first = submit_as(people.actor("bob"))
    with pytest.raises(PermissionDeniedError, match="bob may have at most 1 job.s. queued or running at once and "
                                                    "has 1; this needs 1 more"):
        submit_as(people.actor("bob"))
    assert jobs_in_redis(redis_conn) == 1
    api.cancel_job(redis_conn, first, actor=bob)  # an ended job no longer counts
    submit_as(people.actor("bob"))

    # users without a limit of their own get the service's default (env); admins are never limited
    accounts.change_limits(redis_conn, "bob", users.UserLimits(), actor=ada)
    monkeypatch.setenv("USER_MAX_GPUS", "2")
    with pytest.raises(PermissionDeniedError, match="at most 2 GPU.s. in queued and running jobs and uses 1; this "
                                                    "asks for 2 more"):
        submit_as(people.actor("bob"), gpus=2)
    monkeypatch.setenv("USER_MAX_ACTIVE_JOBS", "1")
    submit_as(ada, gpus=4, priority="high")
    submit_as(ada)
    monkeypatch.setenv("USER_MAX_GPUS", "lots")
    with pytest.raises(UserError, match="USER_MAX_GPUS must be a whole number"):
        submit_as(people.actor("bob"))
    monkeypatch.delenv("USER_MAX_GPUS")
    monkeypatch.delenv("USER_MAX_ACTIVE_JOBS")

    # priority high: admins, or users allowed it
    with pytest.raises(PermissionDeniedError, match="may not submit with priority high"):
        submit_as(people.actor("bob"), priority="high")
    accounts.change_limits(redis_conn, "bob", users.UserLimits(high_priority=True), actor=ada)
    assert api.job_status(redis_conn, submit_as(people.actor("bob"), priority="high"))["priority"] == "high"

    # a sweep's parallel trials count as the owner's jobs; its trials then belong to the owner, unlimited per trial
    accounts.change_limits(redis_conn, "bob", users.UserLimits(max_active_jobs=3), actor=ada)
    space = {"optim.lr": {"float": [0.001, 0.1], "log": True}}
    sweep_kw: dict[str, Any] = {"connection": redis_conn, "trials": 3, "parallel": 2, "overrides": ["train.epochs=1"]}
    with pytest.raises(PermissionDeniedError, match="at most 3 job.s. queued or running at once and has 2; this "
                                                    "needs 2 more"):
        api.create_sweep(str(DIGITS), space, actor=people.actor("bob"), **sweep_kw)
    assert not redis_conn.zcard(keys.sweeps_index())
    sweep = api.create_sweep(str(DIGITS), space, actor=people.actor("cat"), **sweep_kw)
    trials = [j for j in api.list_jobs(redis_conn, owner="cat") if j.get("sweep") == sweep]
    assert len(trials) == 2 and api.sweep_status(redis_conn, sweep)["owner"] == "cat"
    assert [s["id"] for s in api.list_sweeps(redis_conn, owner="cat")] == [sweep]
    assert api.list_sweeps(redis_conn, owner="bob") == []
    with pytest.raises(PermissionDeniedError, match="belongs to cat"):
        api.cancel_sweep(redis_conn, sweep, actor=bob)
    api.cancel_sweep(redis_conn, sweep, actor=people.actor("cat"))


def test_retry_and_delete_are_the_owners_or_an_admins(redis_conn: Any, people: People) -> None:
    bob, cat, ada = people.actor("bob"), people.actor("cat"), people.actor("ada")
    job = api.submit_job(DIGITS, ["train.epochs=1"], connection=redis_conn, allow_local_paths=True, actor=cat).job_id
    api.cancel_job(redis_conn, job, actor=cat)
    for call in (api.retry_job, api.delete_job):
        with pytest.raises(PermissionDeniedError, match="belongs to cat"):
            call(redis_conn, job, actor=bob)
    with pytest.raises(PermissionDeniedError, match="no acting user"):  # a caller that forgot to say who acts
        api.delete_job(redis_conn, job)
    again = api.retry_job(redis_conn, job, actor=ada)
    assert api.job_status(redis_conn, again)["owner"] == "ada"  # a retry belongs to who retried it
    api.delete_job(redis_conn, job, actor=cat)
    assert [j["id"] for j in api.list_jobs(redis_conn)] == [again]
    log = [(e.actor, e.action, e.target) for e in audit.entries(redis_conn)]
    assert ("ada", "job.retry", job) in log and ("cat", "job.delete", job) in log
    assert ("ada", "job.submit", again) in log


def test_user_management_through_the_cli(redis_conn: Any, job_env: dict[str, str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINER_TOKEN", raising=False)
    crew = People(redis_conn, job_env, tmp_path)
    refused(["user", "add", "bob", "--role", "submitter"], crew.base, 2, "first user must be an admin")
    crew.add("ada", "admin")  # bootstrap: while no user exists, the operator adds the first admin
    refused(["user", "add", "eve", "--role", "admin"], crew.base, 3, "TRAINER_TOKEN")  # from then on, nobody else
    crew.add("bob", "submitter", as_="ada")
    crew.add("cat", "viewer", as_="ada")
    ada, bob = crew.env["ada"], crew.env["bob"]
    refused(["user", "list"], bob, 3, "bob (submitter) may not list users", "needs the admin role")
    refused(["user", "role", "cat", "submitter"], bob, 3, "needs the admin role")
    ok(["user", "role", "cat", "submitter"], ada)
    ok(["user", "limits", "bob", "--max-jobs", "2", "--high-priority"], ada)
    assert "bob: jobs 2, GPUs no limit, priority high yes" in ok(["user", "limits", "bob"], ada).stdout
    rows = {u["name"]: u for u in json.loads(ok(["user", "list", "--json"], ada).stdout)}
    assert {n: u["role"] for n, u in rows.items()} == {"ada": "admin", "bob": "submitter", "cat": "submitter"}
    assert rows["bob"]["limits"] == {"max_active_jobs": 2, "max_gpus": None, "high_priority": True}
    assert "token_sha256" not in json.dumps(rows)

    # login saves the token (0600); whoami; rotating my own token keeps this CLI working and revokes the old one
    token_file = tmp_path / "cfg" / "token"
    me = {**crew.base, "TRAINER_TOKEN_FILE": str(token_file)}
    refused(["login", "wrong"], me, 2, "unknown token")
    assert not token_file.exists()
    assert "logged in as bob (submitter)" in ok(["login", bob["TRAINER_TOKEN"]], me).stdout
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert ok(["whoami"], me).stdout.startswith("bob (submitter)")
    refused(["user", "token", "cat"], me, 3, "bob (submitter) may not issue a token for cat")
    assert "saved to" in ok(["user", "token", "bob"], me).stdout
    assert token_file.read_text().strip() != bob["TRAINER_TOKEN"]
    assert ok(["whoami"], me).stdout.startswith("bob")
    refused(["whoami"], bob, 2, "unknown token")  # the old one was revoked
    refused(["user", "rm", "ada"], ada, 2, "last admin")
    ok(["user", "rm", "bob"], ada)
    refused(["whoami"], me, 2, "unknown token")

    log = audit_lines(ada, "--user", "ada", "--limit", "2")
    assert [(e["action"], e["target"]) for e in log] == [("user.limits", "bob"), ("user.remove", "bob")]
    every = audit_lines(ada)
    assert log == [e for e in every if e["actor"] == "ada"][-2:]  # the newest two, oldest first
    assert {"session.sign_in", "session.sign_in_failed", "user.token", "user.role", "user.limits"} <= {
        e["action"] for e in every}
    assert audit_lines(ada, "--since", "1h") == audit_lines(ada)
    assert audit_lines(ada, "--since", "2999-01-01") == []
    refused(["audit", "--since", "yesterday-ish"], ada, 2, "--since: cannot read")
    text = ok(["audit", "--limit", "3"], ada).stdout.splitlines()
    assert len(text) == 3 and "user.remove" in text[-1]


def test_no_users_means_nobody_is_asked(redis_conn: Any, job_env: dict[str, str], tmp_path: Path) -> None:
    env = {**job_env, "TRAINER_TOKEN": "left-over-from-elsewhere"}  # ignored: there are no users
    assert ok(["whoami"], env).stdout.startswith("operator (admin): no users registered")
    job = submit(env, "--priority", "high")
    assert json.loads(ok(["status", job, "--json"], env).stdout)["owner"] == "operator"
    assert job in ok(["list", "--mine"], env).stdout
    ok(["cancel", job], env)
    refused(["login", "anything"], env, 2, "no users yet")


def test_sweeps_datasets_hooks_and_gc_follow_the_rules(redis_conn: Any, people: People, tmp_path: Path) -> None:
    ada, bob, cat = (people.env[n] for n in ("ada", "bob", "cat"))
    sweep = api.create_sweep(str(DIGITS), {"optim.lr": {"choice": [0.01, 0.1]}}, connection=redis_conn, trials=2,
                             parallel=1, overrides=["train.epochs=1"], actor=people.actor("bob"))
    assert " bob " in ok(["sweeps"], cat).stdout
    assert ok(["sweeps", "--mine", "--json"], cat).stdout.strip() == "[]"
    refused(["sweep-cancel", sweep], cat, 3, f"cat (submitter) may not cancel sweep {sweep}", "belongs to bob")
    assert api.sweep_status(redis_conn, sweep)["state"] == "running"

    folder = make_imagefolder(tmp_path / "shapes")
    ok(["dataset", "add", "shapes", str(folder)], bob)
    assert [(d["name"], d["owner"]) for d in json.loads(ok(["dataset", "list", "--json"], cat).stdout)] == [
        ("shapes", "bob")]
    assert "no registered dataset" in ok(["dataset", "list", "--mine"], cat).stdout
    assert "by bob" in ok(["dataset", "show", "shapes"], cat).stdout
    refused(["dataset", "rm", "shapes"], cat, 3, "may not remove dataset shapes:1", "belongs to bob")
    ok(["dataset", "rm", "shapes"], bob)

    refused(["notify", "add", "http://127.0.0.1:9/hook"], bob, 3, "may not add webhooks")
    hook = ok(["notify", "add", "https://hooks.example.org/T0/secret-part"], ada).stdout.split()[-1]
    ok(["gc", "--dry-run"], bob)  # looking is anyone's
    refused(["gc"], bob, 3, "may not run the retention policy")
    ok(["gc"], ada)

    log = audit_lines(ada)
    seen = {(e["actor"], e["action"], e["target"]) for e in log}
    assert {("bob", "sweep.create", sweep), ("bob", "dataset.register", "shapes:1"),
            ("bob", "dataset.remove", "shapes"), ("ada", "hook.add", hook)} <= seen
    assert {"storage.gc"} <= {e["action"] for e in log}
    assert "secret-part" not in json.dumps(log)  # a hook URL's own secret stays out of the log
    assert not [e for e in log if e["action"] == "job.submit"]  # trials are not logged one by one: the sweep is


@pytest.mark.slow
def test_models_and_deployments_have_owners(redis_conn: Any, job_env: dict[str, str], tmp_path: Path,
                                            exported_run: Path) -> None:
    from tests.fixtures_app import seed_finished_job

    job = seed_finished_job(redis_conn, exported_run)  # made before users: the operator's
    crew = People(job_env, tmp_path)
    crew.add("ada", "admin")
    crew.add("bob", "submitter", as_="ada")
    crew.add("cat", "submitter", as_="ada")
    ada, bob, cat = (crew.env[n] for n in ("ada", "bob", "cat"))
    assert api.job_status(redis_conn, job)["owner"] == "operator"
    refused(["model", "register", job, "--name", "digits"], {**crew.base}, 3, "TRAINER_TOKEN")
    ok(["model", "register", job, "--name", "digits"], bob)
    assert "owner bob" in ok(["model", "list"], cat).stdout
    assert json.loads(ok(["model", "list", "--mine", "--json"], cat).stdout) == []
    assert json.loads(ok(["model", "show", "digits:1", "--json"], cat).stdout)["owner"] == "bob"
    refused(["model", "alias", "digits", "production", "1"], cat, 3, "belongs to bob")
    ok(["model", "alias", "digits", "production", "1"], bob)
    dep = ok(["deploy", "digits@production"], bob).stdout.split()[-1]
    rows = json.loads(ok(["deployments", "--json"], cat).stdout)
    assert [(d["id"], d["owner"]) for d in rows] == [(dep, "bob")]
    assert json.loads(ok(["deployments", "--mine", "--json"], cat).stdout) == []
    refused(["undeploy", dep], cat, 3, f"may not stop deployment {dep}", "belongs to bob")
    refused(["model", "rm", "digits"], cat, 3, "may not remove model digits:1")
    ok(["undeploy", dep], ada)
    ok(["model", "rm", "digits"], bob)
    seen = {(e["actor"], e["action"]) for e in audit_lines(ada)}
    assert {("bob", "model.register"), ("bob", "model.alias"), ("bob", "deployment.create"),
            ("ada", "deployment.stop"), ("bob", "model.remove")} <= seen
