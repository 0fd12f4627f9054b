"""Sweeps (worker/sweeps/) against the real test Redis and real `python -m worker run` processes training digits on
CPU (small images, 2-3 epochs):

- a 6-trial sweep, 2 in parallel on 2 workers, one of which is SIGKILLed mid-sweep (a replacement starts): 6 trials
  end, none is counted twice, at most 2 trials are ever queued or running, and the best is the max over the complete
  trials' own reports;
- a sweep built to prune (median pruner, an lr of 1e-6 that cannot learn): a trial ends `pruned` before its last
  epoch and its worker is free within 10 s;
- `sweep-cancel` with a trial running and one queued: both end `cancelled` within seconds, no rank survives;
- every bad input through the CLI (exit 2, nothing written or enqueued).
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures_worker import DIGITS, run_cli, run_trial, wait_for
from worker import api, keys
from worker.__main__ import main as cli
from worker.errors import SubmissionError
from worker.sweeps.space import Param, apply_params, grid_size, parse_space

FAST = ["export.enabled=false", "train.log_every=4", "data.image_size=16"]
"""Every trial: digits at 16 px, no export."""


def written(conn: Any) -> dict[str, int]:
    """Everything "nothing enqueued" keeps at zero: sweeps, jobs, RQ queues and records."""
    return {
        "sweep keys": sum(1 for _ in conn.scan_iter(match="trainer:sweep*")),
        "job keys": sum(1 for _ in conn.scan_iter(match="trainer:job*")),
        "rq queues": sum(conn.llen(k) for k in conn.scan_iter(match="rq:queue:*")),
        "rq jobs": sum(1 for _ in conn.scan_iter(match="rq:job:*")),
    }


def start_worker(spawn: Any, env: dict[str, str]) -> Any:
    return spawn.python(["worker", "run", "--cpu", "--slots", "1"], env, name="worker")


def explain(conn: Any, sweep_id: str, spawn: Any) -> Any:
    def text() -> str:
        st = api.sweep_status(conn, sweep_id)
        st.pop("config", None)
        procs = "\n".join(f"--- {p.args}\n{spawn.output(p)[-2500:]}" for p in spawn.procs)
        return f"sweep: {json.dumps(st, default=str)[:6000]}\nprocesses:\n{procs}"
    return text


# ------------------------------------------------------------------------------------------------- the space file
def test_space_file_parses_to_optuna_distributions() -> None:
    raw = yaml.safe_load(Path("configs/spaces/digits.yaml").read_text())
    params = parse_space(raw)
    assert [p.key for p in params] == list(raw)
    lr = params[0]
    assert lr.kind == "float" and lr.log and lr.values_to_check() == [1e-4, 3e-2]
    assert params[1].distribution().choices == (32, 64, 128)
    assert grid_size(params) is None  # continuous lr
    assert grid_size([Param("train.epochs", "int", 1, 3), Param("a.b", "choice", choices=(1, 2))]) == 6
    assert Param("model.dropout", "float", 0.0, 0.5, step=0.25).grid() == [0.0, 0.25, 0.5]
    cfg = apply_params({"optim": {"lr": 1.0}}, {"optim.lr": 1e-5, "train.epochs": 2})
    assert cfg == {"optim": {"lr": 1e-5}, "train": {"epochs": 2}}  # values as values: 1e-5 is not YAML text


# ------------------------------------------------------------------------------------------------------ bad input
def _space(tmp_path: Path, content: Any) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


BAD_CASES = [
    # (space, extra CLI args, message fragment)
    ({"optim.lrr": {"float": [1e-4, 1e-2]}}, [], "optim.lrr: unknown key"),
    ({"optim.lr": {"float": [1e-4, 20.0]}}, [], "optim.lr=20.0"),
    ({"train.batch_size": {"choice": [64, 5000]}}, [], "larger than the train split"),
    ({"data.augment": {"choice": ["classic", "fancy"]}}, [], "data.augment"),
    ({"model.freeze": {"choice": ["none", "backbone"]}}, [], "model.pretrained: true"),
    ({"train.batch_size": {"choice": []}}, [], "non-empty list"),
    ({"optim.lr": {"float": [1e-2, 1e-4]}}, [], "low > high"),
    ({"optim.lr": {"float": [0.0, 1e-2], "log": True}}, [], "log range needs low > 0"),
    ({"optim.lr": {"range": [1e-4, 1e-2]}}, [], "exactly one of float, int, choice"),
    ({"optim.lr": {"float": [1e-4, 1e-2]}}, ["--trials", "0"], "trials: must be a whole number of at least 1"),
    ({"optim.lr": {"float": [1e-4, 1e-2]}}, ["--parallel", "0"], "parallel: must be a whole number of at least 1"),
    ({"optim.lr": {"float": [1e-4, 1e-2]}}, ["--trials", "1001"], "trials: must be a whole number of at least 1 and at most 1000"),
    ({"optim.lr": {"float": [1e-4, 1e-2]}}, ["--parallel", "65"], "parallel: must be a whole number of at least 1 and at most 64"),
    ({"optim.lr": {"float": [1e-4, 1e-2]}}, ["--metric", "test_acc"], "no epoch event carries 'test_acc'"),
    ({"optim.lr": {"float": [1e-4, 1e-2]}}, ["--sampler", "grid"], "optim.lr is a continuous range"),
    ({"train.epochs": {"int": [1, 2]}}, ["--sampler", "grid", "--trials", "3"], "the grid has 2 point(s)"),
    ("optim.lr: [1e-4", [], "not valid YAML"),
    ({}, [], "expected a mapping"),
]


@pytest.mark.parametrize("space,args,message", BAD_CASES, ids=[c[2][:30] for c in BAD_CASES])
def test_bad_input_exits_2_and_writes_nothing(space: Any, args: list[str], message: str, redis_conn: Any,
                                              job_env: dict[str, str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", str(DIGITS), "--space", _space(tmp_path, space), "--trials", "4", "--parallel", "2", *args]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert set(written(redis_conn).values()) == {0}, written(redis_conn)


def test_bad_input_through_a_real_process(redis_conn: Any, job_env: dict[str, str], tmp_path: Path) -> None:
    out = run_cli(["worker", "sweep", str(DIGITS), "--space", _space(tmp_path, {"optim.lr": {"float": [1, 50]}}),
                   "--trials", "2"], job_env)
    assert out.returncode == 2 and "optim.lr=50.0" in out.stderr, out
    out = run_cli(["worker", "sweep-status", "20250101-120000-abcdef"], job_env)
    assert out.returncode == 2 and "no such sweep" in out.stderr, out
    assert set(written(redis_conn).values()) == {0}


def test_api_refuses_the_same_as_the_cli(redis_conn: Any, job_env: dict[str, str]) -> None:
    """The dashboard's door (worker.api.create_sweep with a dict space, no local paths)."""
    with pytest.raises(SubmissionError, match="low > high"):
        api.create_sweep(str(DIGITS), {"optim.lr": {"float": [0.1, 0.01]}}, connection=redis_conn, trials=2,
                         parallel=1)
    with pytest.raises(SubmissionError, match="data.path"):
        api.create_sweep({"data": {"name": "cifar10", "path": "/etc"}}, {"optim.lr": {"float": [0.01, 0.1]}},
                         connection=redis_conn, trials=2, parallel=1)
    assert set(written(redis_conn).values()) == {0}


# ------------------------------------------------------------------------------------ the loop, without training
SPACE = {"optim.lr": {"float": [1e-3, 1e-1], "log": True}, "train.batch_size": {"choice": [32, 64]}}


def test_cancel_ends_the_sweep_and_every_queued_trial(redis_conn: Any, job_env: dict[str, str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    sweep_id = api.create_sweep(str(DIGITS), SPACE, connection=redis_conn, trials=5, parallel=3,
                                allow_local_paths=True)
    assert api.sweep_status(redis_conn, sweep_id)["counts"]["queued"] == 3
    run_trial(redis_conn, api.sweep_trials(redis_conn, sweep_id)[0]["job"], [0.5])  # one ended before the cancel
    assert cli(["sweep-cancel", sweep_id]) == 0 and "cancelled" in capsys.readouterr().out
    st = api.sweep_status(redis_conn, sweep_id)
    assert st["state"] == "cancelled" and st["final"] and st["ended_at"]
    assert st["counts"]["cancelled"] == 2 and st["counts"]["queued"] == 0 and st["ended"] == 3
    assert [r["optuna_state"] for r in st["trials_table"]] == ["complete", "fail", "fail"]  # told once each
    assert not redis_conn.sismember(keys.active_sweeps(), sweep_id)
    queued = [i.decode() for k in redis_conn.scan_iter(match="rq:queue:*") for i in redis_conn.lrange(k, 0, -1)]
    assert queued == [st["trials_table"][0]["job"]]  # only the "ran" trial's entry (no worker dequeued it here)
    assert cli(["sweep-cancel", sweep_id]) == 0  # a second cancel changes nothing


def test_advance_enqueues_an_orphaned_ask_and_tells_each_trial_once(redis_conn: Any, job_env: dict[str, str]) -> None:
    from worker.sweeps.space import parse_space
    from worker.sweeps.study import load_study
    from worker.sweeps import advance, read_sweep

    sweep_id = api.create_sweep(str(DIGITS), SPACE, connection=redis_conn, trials=3, parallel=1, pruner="none",
                                allow_local_paths=True)
    rec = read_sweep(redis_conn, sweep_id)
    study = load_study(redis_conn, sweep_id, rec)
    study.ask({p.key: p.distribution() for p in parse_space(rec["space"])})  # asked, then its asker "died"
    assert advance(redis_conn, sweep_id)
    rows = api.sweep_trials(redis_conn, sweep_id)
    assert [r["state"] for r in rows] == ["queued", "queued"]  # the orphan got its job; parallel 1 asks no third
    run_trial(redis_conn, rows[0]["job"], [0.4, 0.6])
    run_trial(redis_conn, rows[1]["job"], [0.7], state=api.JobState.PRUNED)
    for _ in range(3):  # the worker that ended it, the heartbeat scan, another scan: told once
        assert advance(redis_conn, sweep_id)
    rows = api.sweep_trials(redis_conn, sweep_id)
    assert [r["optuna_state"] for r in rows] == ["complete", "pruned", "running"]
    assert rows[0]["value"] == 0.6 and rows[0]["intermediate"] == {}  # no monitor ran: only the tell
    run_trial(redis_conn, rows[2]["job"], [0.3])
    assert advance(redis_conn, sweep_id)
    st = api.sweep_status(redis_conn, sweep_id)
    assert st["state"] == "finished" and st["best_trial"] == 0 and st["best_value"] == 0.6
    assert len(redis_conn.hgetall(keys.sweep_trials(sweep_id))) == 3

    # a holder that stalled past the lock's TTL enqueues a trial another process already enqueued: its job is
    # cancelled and the trial keeps its one job
    from worker.sweeps.driver import _enqueue

    assert _enqueue(redis_conn, rec, 0, rows[0]["params"], None) == rows[0]["job"]
    twins = [j for j in api.list_jobs(redis_conn) if j.get("sweep") == sweep_id and j.get("trial") == 0]
    assert sorted(j["state"] for j in twins) == ["cancelled", "finished"]


def test_a_sweep_whose_every_trial_fails_fails_with_the_first_error(redis_conn: Any, job_env: dict[str, str]) -> None:
    from worker.record import mark_final, mark_started
    from worker.sweeps import advance

    sweep_id = api.create_sweep(str(DIGITS), SPACE, connection=redis_conn, trials=2, parallel=1,
                                allow_local_paths=True)
    for i in range(2):
        job = [r["job"] for r in api.sweep_trials(redis_conn, sweep_id) if r["state"] == "queued"][0]
        mark_started(redis_conn, job, "w", job)
        mark_final(redis_conn, job, "w", api.JobState.FAILED, {"error": f"boom {i}"})
        advance(redis_conn, sweep_id)
    st = api.sweep_status(redis_conn, sweep_id)
    assert st["state"] == "failed" and st["error"].endswith("boom 0") and st["best_trial"] is None


@pytest.mark.parametrize("pruner", ["median", "hyperband", "none"])
def test_the_monitor_reports_epochs_and_asks_the_pruner(redis_conn: Any, job_env: dict[str, str], pruner: str) -> None:
    """What a worker's job loop does for a trial (TrialMonitor.poll), over trials whose events are streamed here."""
    from worker.record import mark_final, mark_started
    from worker.streaming import RedisEventSink
    from worker.sweeps import TrialMonitor, advance

    sweep_id = api.create_sweep(str(DIGITS), SPACE, connection=redis_conn, trials=4, parallel=4, pruner=pruner,
                                allow_local_paths=True, overrides=["train.epochs=3"])
    jobs = [r["job"] for r in api.sweep_trials(redis_conn, sweep_id)]
    verdicts = []
    for number, (job, accs) in enumerate(zip(jobs, ([0.8, 0.9, 0.95], [0.7, 0.85, 0.9], [0.75, 0.8, 0.9],
                                                    [0.05]))):
        mark_started(redis_conn, job, "w", job)
        monitor = TrialMonitor(redis_conn, sweep_id, number, job)
        sink = RedisEventSink(redis_conn, job)
        for epoch, acc in enumerate(accs, 1):
            sink.emit("epoch", {"epoch": epoch, "epochs": 3, "val_acc": acc})
            time.sleep(0.3)  # the sink sends a non-step event at once, from its own thread
            verdicts.append((number, epoch, monitor.poll()))
        sink.close()
        assert not monitor.broken
        if number < 3:
            mark_final(redis_conn, job, "w", api.JobState.FINISHED, {})
            advance(redis_conn, sweep_id)
    rows = api.sweep_trials(redis_conn, sweep_id)
    assert rows[0]["intermediate"] == {1: 0.8, 2: 0.9, 3: 0.95}  # every epoch reported once
    assert all(v is None for n, e, v in verdicts if n < 3 and e == 3)  # never at a trial's last epoch
    last = verdicts[-1][2]
    if pruner == "median":
        assert last and "median pruner at epoch 1" in last, verdicts
    if pruner == "none":
        assert all(v is None for _, _, v in verdicts)


def test_sweep_dashboard_says_how_to_install_optuna_dashboard(redis_conn: Any, job_env: dict[str, str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("optuna")
    try:
        import optuna_dashboard  # noqa: F401
        pytest.skip("optuna-dashboard is installed here (docs/sweeps.md: checked by hand with 0.21.0)")
    except ImportError:
        pass
    sweep_id = api.create_sweep(str(DIGITS), SPACE, connection=redis_conn, trials=1, parallel=1,
                                allow_local_paths=True)
    assert cli(["sweep-dashboard", sweep_id]) == 2
    assert "pip install optuna-dashboard" in capsys.readouterr().err
    assert cli(["sweep-dashboard", "20250101-120000-abcdef"]) == 2  # an unknown sweep, before any import


# ---------------------------------------------------------------------------------------------- real sweeps
@pytest.mark.slow  # 40-57 s on 2 idle cores; the default suite stays near its 20-minute aim
def test_digits_sweep_on_two_workers_survives_a_killed_worker(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                                              tmp_path: Path) -> None:
    space = _space(tmp_path, {"optim.lr": {"float": [1e-3, 1e-2], "log": True},
                              "train.batch_size": {"choice": [32, 64]}})
    out = run_cli(["worker", "sweep", str(DIGITS), "--space", space, "--trials", "6", "--parallel", "2",
                   "--name", "digits lr", "--seed", "7",
                   *sum((["--set", s] for s in [*FAST, "train.epochs=3", "data.image_size=24"]), [])],
                  job_env)
    assert out.returncode == 0, out
    sweep_id = out.stdout.split()[-1]
    st = api.sweep_status(redis_conn, sweep_id)
    assert st["state"] == "running" and st["counts"]["queued"] == 2  # the CLI enqueued the first `parallel` trials

    first, second = start_worker(spawn, job_env), start_worker(spawn, job_env)
    peak = 0

    def running_on(worker: Any) -> str | None:
        for t in api.sweep_status(redis_conn, sweep_id)["trials_table"]:
            job = api.job_status(redis_conn, t["job"]) if t["job"] else {}
            mine = str(worker.pid) in (job.get("worker") or "")
            if job.get("state") == "running" and job.get("epoch", 0) >= 1 and mine:
                return t["job"]
        return None

    victim_job = wait_for(lambda: running_on(first) or running_on(second), 150, "a trial past its first epoch",
                          explain=explain(redis_conn, sweep_id, spawn))
    victim = first if running_on(first) == victim_job else second
    victim.send_signal(signal.SIGKILL)  # the worker dies mid-trial (24 px: an epoch or more is left, even idle);
    # its guard takes the training process along
    start_worker(spawn, job_env)  # a replacement, so 2 trials can run again

    def done() -> bool:
        nonlocal peak
        st = api.sweep_status(redis_conn, sweep_id, with_trials=False)
        peak = max(peak, st["counts"]["queued"] + st["counts"]["running"])
        return st["final"]

    wait_for(done, 300, "the sweep to finish", interval=0.5, explain=explain(redis_conn, sweep_id, spawn))
    st = api.sweep_status(redis_conn, sweep_id)
    assert st["state"] == "finished", st
    assert peak <= 2
    rows = st["trials_table"]
    assert [r["number"] for r in rows] == list(range(6))  # Optuna has exactly 6 trials: none asked twice
    assert len({r["job"] for r in rows}) == 6 and st["ended"] == 6
    assert {r["state"] for r in rows} <= {"finished", "pruned"}, rows
    tagged = [j for j in api.list_jobs(redis_conn) if j.get("sweep") == sweep_id]
    assert sorted(j["trial"] for j in tagged) == list(range(6))  # every trial is one ordinary job, tagged
    recovered = api.job_status(redis_conn, victim_job)
    assert recovered["recoveries"] == 1 and recovered["state"] in ("finished", "pruned"), recovered
    epochs = [e["epoch"] for e in api.epoch_events(redis_conn, victim_job)]
    assert epochs == sorted(set(epochs))  # the resumed trial reported each epoch once

    complete = [r for r in rows if r["state"] == "finished"]
    own = {r["number"]: api.job_status(redis_conn, r["job"])["best_val_acc"] for r in complete}
    assert st["best_value"] == pytest.approx(max(own.values()))
    assert own[st["best_trial"]] == pytest.approx(st["best_value"])
    assert st["best_job"] == rows[st["best_trial"]]["job"]
    for r in complete:
        job = api.job_status(redis_conn, r["job"])
        assert job["config"]["optim"]["lr"] == pytest.approx(r["params"]["optim.lr"])
        assert job["config"]["train"]["batch_size"] == r["params"]["train.batch_size"]

    listed = json.loads(run_cli(["worker", "sweeps", "--json"], job_env).stdout)
    assert [(s["id"], s["state"], s["ended"]) for s in listed] == [(sweep_id, "finished", 6)]
    text = run_cli(["worker", "sweep-status", sweep_id], job_env).stdout
    assert f"best       trial {st['best_trial']}" in text and "6/6 trials ended" in text


@pytest.mark.slow  # 40-57 s on 2 idle cores; the default suite stays near its 20-minute aim
def test_a_trial_that_cannot_learn_is_pruned(redis_conn: Any, job_env: dict[str, str], spawn: Any) -> None:
    # seed 2 draws lr 0.003, 0.003, then 1e-6 twice: two complete trials set the median (the pruner's startup),
    # then the trials that cannot learn fall below it at their first epoch
    sweep_id = api.create_sweep(str(DIGITS), {"optim.lr": {"choice": [0.003, 1e-6]}}, connection=redis_conn,
                                trials=4, parallel=1, sampler="random", pruner="median", seed=2,
                                overrides=[*FAST, "train.epochs=3", "data.image_size=32"],  # ~1.4 s an epoch idle:
                                allow_local_paths=True)  # the stop lands well inside the next epoch
    start_worker(spawn, job_env)
    wait_for(lambda: api.sweep_status(redis_conn, sweep_id, with_trials=False)["final"], 240, "the sweep to finish",
             interval=0.5, explain=explain(redis_conn, sweep_id, spawn))
    st = api.sweep_status(redis_conn, sweep_id)
    assert st["state"] == "finished" and st["counts"]["complete"] == 2 and st["counts"]["pruned"] == 2, st
    stopped_early = 0
    for row in st["trials_table"][2:]:
        job = api.job_status(redis_conn, row["job"])
        assert job["state"] == "pruned" and job["error_kind"] == "Pruned" and row["params"]["optim.lr"] == 1e-6
        assert "median pruner at epoch 1" in job["error"], job  # decided at its first epoch
        stopped_early += job["epoch"] < job["epochs"]  # and stopped before its last one
        last_epoch = api.events_since(redis_conn, row["job"], types={"epoch"})[-1]
        reported_at = int(last_epoch["id"].split("-")[0]) / 1000
        assert job["ended_at"] - reported_at < 10, (job, last_epoch)  # its worker was free within 10 s
        assert row["optuna_state"] == "pruned"
    assert stopped_early >= 1
    assert st["best_trial"] in (0, 1) and st["best_value"] > 0.5


def test_cancel_stops_the_running_trial_and_drops_the_queued_one(redis_conn: Any, job_env: dict[str, str],
                                                                 spawn: Any, test_token: str) -> None:
    from tests.test_worker_jobs import rank_processes

    sweep_id = api.create_sweep(str(DIGITS), SPACE, connection=redis_conn, trials=4, parallel=2, pruner="none",
                                overrides=[*FAST, "train.epochs=3"], allow_local_paths=True)
    start_worker(spawn, job_env)
    wait_for(lambda: api.sweep_status(redis_conn, sweep_id, with_trials=False)["counts"]["running"] == 1, 120,
             "a trial to run", explain=explain(redis_conn, sweep_id, spawn))
    out = run_cli(["worker", "sweep-cancel", sweep_id], job_env)
    assert out.returncode == 0 and "cancelled" in out.stdout, out
    wait_for(lambda: not api.sweep_status(redis_conn, sweep_id, with_trials=False)["counts"]["running"], 15,
             "the running trial to stop", explain=explain(redis_conn, sweep_id, spawn))
    told = lambda: all(r["optuna_state"] != "running" for r in api.sweep_trials(redis_conn, sweep_id))  # noqa: E731
    wait_for(told, 15, "its worker to tell Optuna", explain=explain(redis_conn, sweep_id, spawn))
    st = api.sweep_status(redis_conn, sweep_id)
    assert st["state"] == "cancelled" and st["counts"]["cancelled"] == 2 and st["ended"] == 2, st
    assert [r["optuna_state"] for r in st["trials_table"]] == ["fail", "fail"]  # no third trial was asked
    wait_for(lambda: not rank_processes(test_token), 10, "no training process left")
