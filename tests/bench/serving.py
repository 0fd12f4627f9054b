"""Serving rows: one ONNX model version served three ways, side by side, under a real load generator (ab).

(a) `python -m worker serve NAME@production` (dynamic batching, following the alias), (b) the same with `--no-batching`,
(c) `mlflow models serve -m models:/NAME/N --env-manager local` of the version the registry mirrored into a real
`mlflow server` (the peer MLflow users already have; its default single uvicorn worker). Each at 1, 8 and 32 concurrent
keep-alive clients (`ab -k -c C -t T`, one sample per request, the servers' order rotating every repetition):
throughput and p50/p99 latency. Beside them, ONNX Runtime in-process at batch 1 on the same file (the floor of (a)'s
latency at 1 client), and an alias moved under load: seconds from `model alias` to the first answer from the new
version, and the requests that failed meanwhile.

The model: ResNet-18 with the small-image stem at 16×16 RGB, trained one epoch on synthetic data and exported in FP32
(tests/fixtures_runs.synthetic_torchvision_run's recipe, with the export on and `export.int8: false`). Chosen because
batching matters for it: its compute per sample (~10 ms on this CPU) dwarfs the server's per-request cost, and ONNX
Runtime runs a batch of 32 in about half the time per sample of 32 single runs (its last stages see 2×2 and 4×4
feature maps: matrix products far too thin at batch 1); while a request stays small (768 floats, ~15 KB of JSON), so
JSON does not dominate. The INT8 file the export would otherwise recommend gains less from batching (1.0–1.5× per
sample here), and a tiny model (simple_cnn) is the other extreme: the request's JSON costs more than the model.

Beside throughput, the servers' own CPU per request (user + system of the process tree over each ab run): on a shared
machine the requests/s follow the CPU share the scheduler gives the server, the CPU per request follows the work.

Targets (the issue): (a) ≥ 3× (c) and ≥ 2× (b) in throughput at 32 clients; (a)'s p50 at 1 client within 2 ms of
in-process ONNX Runtime; alias move ≤ 2 s with no failed request. Needs `ab` (Debian: apt-get install apache2-utils).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tests.bench.harness import ROOT, Row, Section, log

MODEL = "bench-resnet18"
IMAGE_SIZE = 16
CLIENTS = (1, 8, 32)
SERVERS = ("a", "b", "c")
LABELS = {"a": "(a) worker serve, batching", "b": "(b) worker serve --no-batching", "c": "(c) mlflow models serve"}
START_TIMEOUT = 240.0
"""Seconds a server may take to answer its health route (mlflow's first start migrates its sqlite store)."""


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """This process's environment with `values` (ArtifactStore() and the registry read it), restored after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train(run: Path) -> None:
    from core.config import load_config
    from core.train import train

    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_size=100", "data.synthetic_classes=4",
                             f"data.synthetic_image_size={IMAGE_SIZE}", "model.name=resnet18", "train.epochs=1",
                             "train.batch_size=16", "export.enabled=true", "export.int8=false",
                             "track.mlflow=false", "track.tensorboard=false"])
    train(cfg, run)


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], health: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    from worker.procutil import own_session_preexec

    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH also when it is not activated
    env = {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=own_session_preexec)  # noqa: PLW1509 - no threads of ours yet
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not _get_ok(health):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(cmd[:4])} did not start: {log_path.read_text()[-1500:]}")
                time.sleep(0.3)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait()


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far (mlflow serves from a uvicorn child)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _ab(url: str, body: Body, clients: int, seconds: float, tmp: Path, pid: int) -> dict[str, float]:
    """One ab run: requests/s, p50/p99 (ms, from its CSV of percentiles), complete and failed requests, and the
    server's CPU milliseconds per request (what load on a shared machine does not change much)."""
    csv = tmp / "ab.csv"
    cpu_before = _cpu_seconds(pid)
    headers = [arg for name, value in body.headers.items() for arg in ("-H", f"{name}: {value}")]
    proc = subprocess.run(["ab", "-q", "-k", "-c", str(clients), "-t", f"{seconds:g}", "-n", "200000", "-s", "60",
                           "-e", str(csv), "-p", str(body.path), "-T", body.content_type, *headers, url],
                          capture_output=True, text=True, timeout=seconds + 120, check=False)
    out = proc.stdout
    cpu = _cpu_seconds(pid) - cpu_before

    def field(name: str) -> float:
        m = re.search(rf"^{name}:\s+([\d.]+)", out, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    if proc.returncode != 0 or "Requests per second" not in out:
        raise RuntimeError(f"ab failed on {url}: {proc.stderr[-500:] or out[-500:]}")
    pct = dict(tuple(map(float, line.split(","))) for line in csv.read_text().splitlines()[1:])
    complete = field("Complete requests")
    return {"rps": field("Requests per second"), "p50": pct[50.0], "p99": pct[99.0], "complete": complete,
            "failed": field("Failed requests") + field("Non-2xx responses"), "cpu_ms": cpu * 1000 / max(complete, 1)}


IN_PROCESS_PAUSE = 0.002
"""Seconds between in-process runs: a caller's pause, as a client's round trip gives the server between requests."""


def _in_process_p50(model: Any, x: np.ndarray, runs: int) -> list[float]:
    """ms of each in-process run, one at a time with a short pause between them, as the server's inference thread
    sleeps between a client's requests.

    Only a quiet machine makes the gap rows meaningful: at load average 10-15 on 2 cores these runs measured 17-24 ms
    (7.4 ms quiet), with or without the pause, while the server answered in 9-22 ms: a negative "overhead" that
    compares the scheduler's treatment of two processes, not the server's work."""
    model.infer(x)
    times = []
    for _ in range(runs):
        time.sleep(IN_PROCESS_PAUSE)
        t = time.perf_counter()
        model.infer(x)
        times.append((time.perf_counter() - t) * 1000)
    return times


async def _alias_move(url: str, body: bytes, move: Any, new_version: str, clients: int, before_s: float,
                      after_s: float, timeout_s: float) -> tuple[float | None, int, int]:
    """Load `url` with `clients` keep-alive clients; after `before_s` call `move()` (in a thread); keep going until
    `after_s` past the first answer from `new_version`. (seconds from the move to that answer, requests, failed)."""
    import aiohttp

    results: list[tuple[float, int, str | None]] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    data = await resp.json(content_type=None)
                    results.append((time.perf_counter(), resp.status,
                                    data.get("model_version") if isinstance(data, dict) else None))
            except (TimeoutError, aiohttp.ClientError, ValueError):
                results.append((time.perf_counter(), 0, None))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await asyncio.sleep(before_s)
        moved_at = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, move)
        first: float | None = None
        while time.perf_counter() < moved_at + timeout_s:
            new = [t for t, status, v in results if status == 200 and v == new_version and t >= moved_at]
            if new:
                first = min(new)
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(after_s)
        stop.set()
        await asyncio.gather(*tasks)
    failed = sum(1 for _, status, _ in results if status != 200)
    return (None if first is None else first - moved_at), len(results), failed


def _batch_stats(base: str) -> tuple[float, float]:
    """(samples, model runs) so far from the server's /metrics (inference_batch_size's sum and count)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = re.search(r"^inference_batch_size_sum ([\d.e+]+)", text, re.MULTILINE)
    runs = re.search(r"^inference_batch_size_count ([\d.e+]+)", text, re.MULTILINE)
    return (float(total.group(1)) if total else 0.0), (float(runs.group(1)) if runs else 0.0)


def bench_serving(quick: bool, redis_url: str) -> list[Row]:
    if shutil.which("ab") is None:
        raise RuntimeError("ab (ApacheBench) is not installed: apt-get install apache2-utils")
    from tests.fixtures_app import seed_finished_job
    from tests.test_tracking import mlflow_server
    from worker.artifacts import ArtifactStore
    from worker.connection import connect
    from worker.models import register, set_alias
    from worker.serving import model as loader

    seconds, reps = (3.0, 1) if quick else (6.0, 3)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        _train(tmp / "run")
        log(f"serving: trained and exported ResNet-18 @ {IMAGE_SIZE} px in {time.perf_counter() - t:.0f} s")
        with mlflow_server(tmp / "mlflow", _free_port()) as mlflow_url:
            env = {"REDIS_URL": redis_url, "ARTIFACTS_DIR": str(tmp / "artifacts"), "TRAINER_VAR_DIR": str(tmp / "var"),
                   "MLFLOW_TRACKING_URI": mlflow_url, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
            env = {k: v for k, v in env.items() if v}
            with _env(env):
                conn = connect(redis_url)
                job = seed_finished_job(conn, tmp / "run")
                v1 = register(conn, job, MODEL)
                v2 = register(conn, job, MODEL)  # the alias moves to it under load
                if v1.mlflow is None:
                    raise RuntimeError("the version was not mirrored into MLflow (see the warning above)")
                set_alias(conn, MODEL, "production", v1.version)
                store = ArtifactStore()
                in_process = loader.load(v1, store)
            log(f"serving: registered {v1.ref} and {v2.ref} (serves {v1.deploy}); MLflow {v1.mlflow['uri']}")
            sub_env = {**os.environ, **env}
            ports = {s: _free_port() for s in SERVERS}
            worker = [sys.executable, "-m", "worker", "serve"]
            with contextlib.ExitStack() as stack:
                pids = {}
                pids["a"] = stack.enter_context(_process(
                    [*worker, f"{MODEL}@production", "--port", str(ports["a"])], sub_env,
                    f"http://127.0.0.1:{ports['a']}/v2/health/ready", tmp / "a.log")).pid
                pids["b"] = stack.enter_context(_process(
                    [*worker, v1.ref, "--port", str(ports["b"]), "--no-batching"], sub_env,
                    f"http://127.0.0.1:{ports['b']}/v2/health/ready", tmp / "b.log")).pid
                pids["c"] = stack.enter_context(_process(
                    [sys.executable, "-m", "mlflow", "models", "serve", "-m", v1.mlflow["uri"], "--env-manager",
                     "local", "-h", "127.0.0.1", "-p", str(ports["c"])], sub_env,
                    f"http://127.0.0.1:{ports['c']}/ping", tmp / "c.log")).pid
                moves = [functools.partial(set_alias, conn, MODEL, "production", v.version) for v in (v2, v1, v2)]
                return _measure(tmp, ports, pids, in_process, seconds, reps, quick,
                                list(zip(moves, [str(v.version) for v in (v2, v1, v2)])))


@dataclasses.dataclass(frozen=True)
class Body:
    """A request body ab posts, with its content type and extra headers."""
    path: Path
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def _bodies(tmp: Path, x: np.ndarray) -> dict[str, Body]:
    """The same sample as (a)/(b)'s v2 JSON, MLflow's JSON, and v2 with the binary tensor data extension (what
    tritonclient.http sends by default: the JSON part, then the raw FP32, answered in binary)."""
    from worker.serving.protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH

    v2 = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    mlflow_body = {"inputs": x.tolist()}  # MLflow's tensor input: the array nested as its shape
    raw = x.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    bodies = {"v2": Body(tmp / "v2.json"), "mlflow": Body(tmp / "mlflow.json"),
              "binary": Body(tmp / "v2.bin", BINARY_CONTENT_TYPE, {HEADER_LENGTH: str(len(head))})}
    bodies["v2"].path.write_text(json.dumps(v2))
    bodies["mlflow"].path.write_text(json.dumps(mlflow_body))
    bodies["binary"].path.write_bytes(head + raw)
    return bodies


def _check_answers(urls: dict[str, str], bodies: dict[str, Body], expected: np.ndarray) -> None:
    """Every server answers the body with the in-process logits (else the comparison compares nothing)."""
    binary = bodies["binary"]
    req = urllib.request.Request(urls["a"], data=binary.path.read_bytes(),
                                 headers={"Content-Type": binary.content_type, **binary.headers})
    with urllib.request.urlopen(req, timeout=60) as resp:
        raw, split = resp.read(), int(resp.headers[next(iter(binary.headers))])
    if not np.allclose(np.frombuffer(raw[split:], "<f4"), expected.ravel(), atol=1e-3):
        raise RuntimeError(f"{LABELS['a']} answers the binary request with {np.frombuffer(raw[split:], '<f4')[:4]}")
    for s, url in urls.items():
        body = bodies["mlflow" if s == "c" else "v2"].path.read_bytes()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = json.loads(resp.read())
        if s == "c":  # MLflow's ONNX flavour answers {"predictions": {output name: array}}
            predictions = data["predictions"]
            got = np.asarray(predictions["logits"] if isinstance(predictions, dict) else predictions, np.float32)
        else:
            got = np.asarray(data["outputs"][0]["data"], np.float32)
        if not np.allclose(got.ravel(), expected.ravel(), atol=1e-3):
            raise RuntimeError(f"{LABELS[s]} answers {got.ravel()[:4]}, in-process {expected.ravel()[:4]}")


def _json_decode_ms(body: bytes, runs: int = 50) -> float:
    """Median ms to decode one v2 request body as the server does (its JSON parser, then the data as a float32
    array)."""
    from worker.serving.protocol import parse_json

    times = []
    for _ in range(runs):
        t = time.perf_counter()
        np.asarray(parse_json(body)["inputs"][0]["data"], dtype=np.float32)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _batching_ceiling(model: Any, x: np.ndarray, quick: bool) -> Row:
    """ONNX Runtime's CPU per sample at batch 1 over batch 32, in-process on the served file: the most (a) can gain
    over (b) when the cores are the limit (then requests/s follow CPU per request, and batching divides only the
    model's share of it). CPU time (process_time, every ORT thread) rather than wall time, as load moves the latter."""
    big = np.repeat(x, 32, axis=0)
    per_sample = {}
    for batch in (x, big):
        model.infer(batch)
        cpu = []
        for _ in range((3 if quick else 9) * (32 if len(batch) == 1 else 1)):
            t = time.process_time()
            model.infer(batch)
            cpu.append((time.process_time() - t) * 1000 / len(batch))
        per_sample[len(batch)] = statistics.median(cpu)
    return Row("ORT CPU per sample, batch 1 / batch 32 (in-process: the ceiling of (a) vs (b))",
               per_sample[1] / per_sample[32], None, "×",
               note=f"{per_sample[1]:.2f} vs {per_sample[32]:.2f} ms CPU per sample")


def _measure(tmp: Path, ports: dict[str, int], pids: dict[str, int], in_process: Any, seconds: float, reps: int,
             quick: bool, moves: list[tuple[Any, str]]) -> list[Row]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    bodies = _bodies(tmp, x)
    urls = {"a": f"http://127.0.0.1:{ports['a']}/v2/models/{MODEL}/infer",
            "b": f"http://127.0.0.1:{ports['b']}/v2/models/{MODEL}/infer",
            "c": f"http://127.0.0.1:{ports['c']}/invocations"}
    _check_answers(urls, bodies, in_process.infer(x))
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    local: list[float] = []
    """In-process ORT p50 (ms) of each repetition, measured just before (a)'s 1-client runs: the gap rows pair them."""
    for c in CLIENTS:
        for rep in range(reps):
            order = SERVERS[rep % 3:] + SERVERS[:rep % 3]
            for s in order:
                if c == 1 and s == "a":
                    local.append(statistics.median(_in_process_p50(in_process, x, 100 if quick else 300)))
                before = _batch_stats(urls[s].split("/v2/")[0]) if s == "a" else (0.0, 0.0)
                r = _ab(urls[s], bodies["mlflow" if s == "c" else "v2"], c, seconds, tmp, pids[s])
                if c == 1 and s == "a":  # the same sample in the binary extension: no JSON numbers to decode
                    runs.setdefault(("a-binary", 1), []).append(_ab(urls[s], bodies["binary"], c, seconds, tmp,
                                                                    pids[s]))
                if s == "a":
                    after = _batch_stats(urls[s].split("/v2/")[0])
                    r["batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1.0)
                runs.setdefault((s, c), []).append(r)
                log(f"serving: {LABELS[s]}, {c} clients: {r['rps']:.1f} req/s, p50 {r['p50']:.1f} ms, "
                    f"p99 {r['p99']:.1f} ms, failed {r['failed']:.0f}, server CPU {r['cpu_ms']:.2f} ms/request"
                    + (f", mean batch {r['batch']:.1f}" if "batch" in r else ""))
    rows: list[Row] = []
    med: dict[tuple[str, int], dict[str, float]] = {}
    for (s, c), rs in runs.items():
        med[(s, c)] = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "cpu_ms", "batch")
                       if k in rs[0]}
        med[(s, c)]["failed"] = sum(r["failed"] for r in rs)
        med[(s, c)]["spread"] = f"{min(r['rps'] for r in rs):.0f}–{max(r['rps'] for r in rs):.0f}"
    for s in SERVERS:
        for c in CLIENTS:
            m = med[(s, c)]
            rows.append(Row(f"{LABELS[s]}, {c} client{'s' if c > 1 else ''}", m["rps"], None, "req/s",
                            note=f"runs {m['spread']} req/s; p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms, "
                                 f"{m['failed']:.0f} failed, "
                                 f"server CPU {m['cpu_ms']:.2f} ms/request"
                                 + (f", mean batch {m['batch']:.1f}" if "batch" in m else "")))
    a32, b32, c32 = (med[(s, 32)]["rps"] for s in SERVERS)
    rows.append(Row("(a) vs (c) throughput, 32 clients", a32 / c32, 3.0, "×",
                    note=f"{a32:.1f} vs {c32:.1f} req/s"))
    rows.append(Row("(a) vs (b) throughput, 32 clients", a32 / b32, 2.0, "×",
                    note=f"{a32:.1f} vs {b32:.1f} req/s"))
    cpu = {s: med[(s, 32)]["cpu_ms"] for s in SERVERS}
    rows.append(Row("server CPU per request, (b) / (a), 32 clients", cpu["b"] / cpu["a"], None, "×",
                    note=f"(a) {cpu['a']:.2f}, (b) {cpu['b']:.2f}, (c) {cpu['c']:.2f} ms/request"))
    rows.append(_batching_ceiling(in_process, x, quick))
    rows.append(Row("JSON decode of one infer request (768 floats)", _json_decode_ms(bodies["v2"].path.read_bytes()),
                    None, "ms", higher_is_better=False, note=f"{bodies['v2'].path.stat().st_size / 1024:.0f} KB body"))
    for key, name in (("a", "(a) p50 at 1 client minus in-process ORT p50 (batch 1)"),
                      ("a-binary", "(a) p50 at 1 client, binary tensor data, minus in-process ORT p50")):
        gaps = [r["p50"] - ort for r, ort in zip(runs[(key, 1)], local)]  # each run less its own in-process p50
        rows.append(Row(name, statistics.median(gaps), 2.0, "ms", higher_is_better=False,
                        note=f"median of {len(gaps)} paired runs (gaps {', '.join(f'{g:.2f}' for g in gaps)} ms); "
                             f"served p50 {statistics.median(r['p50'] for r in runs[(key, 1)]):.2f} ms, in-process "
                             f"{statistics.median(local):.2f} ms; "
                             + ("ab posting the v2 JSON" if key == "a" else
                                "ab posting the binary extension (tritonclient's default), answered in binary")))
    tooks, total, failed = [], 0, 0
    for move, version in moves:
        took, n, bad = asyncio.run(_alias_move(urls["a"], bodies["v2"].path.read_bytes(), move, version, 8, 1.0, 0.5, 15.0))
        log(f"serving: alias moved to version {version}: first answer from it after {took} s; {bad} of {n} failed")
        tooks.append(float("inf") if took is None else took)
        total, failed = total + n, failed + bad
    rows.append(Row("alias move → first answer from the new version (8 clients)", statistics.median(tooks), 2.0, "s",
                    higher_is_better=False, note=f"median of {len(tooks)} moves: "
                    + ", ".join("never" if t == float("inf") else f"{t:.2f}" for t in tooks) + " s"))
    rows.append(Row("failed requests during the alias moves", failed, 0, "requests", higher_is_better=False,
                    note=f"of {total}"))
    return rows


SECTION = Section("serving", "serving rows", bench_serving, (
    Row("(a) vs (c) throughput, 32 clients", None, 3.0, "×"),
    Row("(a) vs (b) throughput, 32 clients", None, 2.0, "×"),
    Row("(a) p50 at 1 client minus in-process ORT p50 (batch 1)", None, 2.0, "ms", higher_is_better=False),
    Row("(a) p50 at 1 client, binary tensor data, minus in-process ORT p50", None, 2.0, "ms", higher_is_better=False),
    Row("alias move → first answer from the new version (8 clients)", None, 2.0, "s", higher_is_better=False),
    Row("failed requests during the alias moves", None, 0, "requests", higher_is_better=False)), redis=True)
