"""Users, roles, tokens and the audit log on a real Redis (worker/users.py, worker/audit.py)."""
from __future__ import annotations

import io
import json

import pytest

from worker import audit, users
from worker.errors import PermissionDeniedError, UserError
from worker.users import Action, Role


def test_no_users_means_the_operator_is_admin(redis_conn, monkeypatch):
    monkeypatch.delenv(users.TOKEN_ENV, raising=False)
    monkeypatch.setenv(users.TOKEN_FILE_ENV, "/nonexistent/token")
    actor = users.cli_actor(redis_conn)
    assert actor.name == users.OPERATOR and actor.is_admin


def test_roles_tokens_and_ownership(redis_conn, monkeypatch, tmp_path):
    monkeypatch.delenv(users.TOKEN_ENV, raising=False)
    monkeypatch.setenv(users.TOKEN_FILE_ENV, str(tmp_path / "token"))
    _, admin_token = users.add_user(redis_conn, "ada", "admin")
    _, bob_token = users.add_user(redis_conn, "bob", "submitter", email="Bob@Example.org")
    vic, _ = users.add_user(redis_conn, "vic", Role.VIEWER)
    with pytest.raises(PermissionDeniedError, match="TRAINER_TOKEN"):
        users.cli_actor(redis_conn)  # users exist: the CLI must say who it is
    users.save_token(bob_token)
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    me = users.cli_actor(redis_conn)
    assert me.name == "bob" and me.role is Role.SUBMITTER
    assert me.may(Action.SUBMIT) and me.may(Action.MANAGE, owner="bob")
    with pytest.raises(PermissionDeniedError, match="belongs to ada"):
        me.require(Action.MANAGE, "cancel job 1", owner="ada")
    with pytest.raises(PermissionDeniedError, match="needs the submitter role"):
        vic.actor().require(Action.SUBMIT, "submit jobs")
    assert users.by_email(redis_conn, "bob@example.ORG").name == "bob"
    new = users.rotate_token(redis_conn, "bob")
    with pytest.raises(UserError, match="unknown token"):
        users.by_token(redis_conn, bob_token)
    assert users.by_token(redis_conn, new).name == "bob"
    with pytest.raises(UserError, match="last admin"):
        users.set_role(redis_conn, "ada", "viewer")
    users.remove_user(redis_conn, "bob")
    with pytest.raises(UserError, match="unknown token"):
        users.by_token(redis_conn, new)
    assert [u.name for u in users.list_users(redis_conn)] == ["ada", "vic"]
    assert "token_sha256" not in users.get_user(redis_conn, "ada").public()
    stored = b"".join(k + v for k, v in redis_conn.hgetall("trainer:users").items())
    assert admin_token.encode() not in stored  # only the token's hash is kept


def test_bad_names_and_roles_are_refused(redis_conn):
    with pytest.raises(UserError, match="invalid user name"):
        users.add_user(redis_conn, "bad name", "admin")
    with pytest.raises(UserError, match="unknown role 'root'"):
        users.add_user(redis_conn, "ok", "root")
    assert not users.any_users(redis_conn)


def test_audit_log_records_and_exports_json_lines(redis_conn):
    ada = users.Actor("ada", Role.ADMIN, source="dashboard", address="10.0.0.7")
    audit.record(redis_conn, ada, audit.AuditAction.JOB_SUBMIT, "20250101-120000-abcdef", gpus=1)
    audit.record(redis_conn, users.OPERATOR_ACTOR, audit.AuditAction.USER_ADD, "bob", role="submitter")
    got = list(audit.entries(redis_conn))
    assert [(e.actor, e.action, e.target) for e in got] == [
        ("ada", "job.submit", "20250101-120000-abcdef"), ("operator", "user.add", "bob")]
    assert got[0].address == "10.0.0.7" and got[0].detail == {"gpus": 1}
    assert [e.actor for e in audit.entries(redis_conn, limit=1)] == ["operator"]
    out = io.StringIO()
    assert audit.export_jsonl(redis_conn, out, actor="ada") == 1
    line = json.loads(out.getvalue())
    assert line["action"] == "job.submit" and line["source"] == "dashboard"


def test_a_call_without_an_actor_gets_no_power_once_users_exist(redis_conn):
    assert users.acting(redis_conn, None) is users.OPERATOR_ACTOR
    users.add_user(redis_conn, "ada", "admin")
    with pytest.raises(PermissionDeniedError, match="no acting user"):
        users.acting(redis_conn, None)
