"""No valid-looking input exhausts a process: each bound refuses with a message naming the key, the value and the
limit, and nothing is enqueued (sweep --trials/--parallel bounds: tests/test_sweeps.py's bad cases)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from core.config import MAX_BATCH_INPUT_BYTES, load_config
from core.errors import ConfigError
from tests.fixtures_worker import DIGITS, run_cli
from worker import keys
from worker.defaults import JOB_TIME_LIMIT_HOURS


def test_a_batch_bigger_than_memory_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, ["train.batch_size=65536", "data.image_size=1024"])
    assert err.value.errors[0].key == "train.batch_size" and "GiB of float32 input" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, ["train.eval_batch_size=8192", "data.image_size=512", "data.color_mode=RGB"])
    assert err.value.errors[0].key == "train.eval_batch_size"
    side = 224
    most = MAX_BATCH_INPUT_BYTES // (3 * side * side * 4)
    assert load_config(DIGITS, [f"train.batch_size={most}", f"data.image_size={side}", "data.color_mode=RGB"]).train.batch_size == most
    with pytest.raises(ConfigError):
        load_config(DIGITS, [f"train.batch_size={most + 1}", f"data.image_size={side}", "data.color_mode=RGB"])


def test_submission_refuses_it_and_enqueues_nothing(redis_conn: Any, job_env: dict[str, str]) -> None:
    res = run_cli(["worker", "submit", str(DIGITS), "--set", "train.batch_size=65536", "--set",
                   "data.image_size=1024"], job_env)
    assert res.returncode == 2 and "train.batch_size" in res.stderr and "GiB" in res.stderr, res.stderr
    assert redis_conn.zcard(keys.jobs_index()) == 0


def test_every_job_gets_a_default_time_limit(redis_conn: Any, job_env: dict[str, str]) -> None:
    def submitted_limit(env: dict[str, str], *sets: str) -> Any:
        args = [a for s in sets for a in ("--set", s)]
        res = run_cli(["worker", "submit", str(DIGITS), *args], env)
        assert res.returncode == 0, res.stderr
        status = json.loads(run_cli(["worker", "status", res.stdout.split()[-1], "--json"], env).stdout)
        return status["config"]["train"]["time_limit"]

    assert submitted_limit(job_env) == JOB_TIME_LIMIT_HOURS * 3600
    assert submitted_limit({**job_env, "JOB_TIME_LIMIT_HOURS": "0.5"}) == 1800
    assert submitted_limit({**job_env, "JOB_TIME_LIMIT_HOURS": "0"}) is None
    assert submitted_limit(job_env, "train.time_limit=60") == 60
