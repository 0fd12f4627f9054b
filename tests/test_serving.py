"""`python -m worker serve`: a real server process, real HTTP clients (plain HTTP: the Open Inference Protocol's JSON,
and its binary tensor data extension as tritonclient sends it), on a model version registered from a job that core
trained and exported.

What a client would notice: the v2 routes answer as the protocol says and agree with ONNX Runtime in-process;
classify agrees with the bundle's predict.py; every kind of bad request gets a 4xx naming the problem and the server
keeps serving; off loopback a bearer token is required; concurrent requests are batched; an alias moved under load
is served within seconds with no request failing.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.predict_template import classify, create_session, preprocess_image
from tests.conftest import free_port
from tests.fixtures_app import seed_finished_job
from tests.fixtures_worker import run_cli, wait_for


def call(url: str, body: bytes | None = None, *, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def infer_body(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> bytes:
    return json.dumps({"id": "t1", "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                               "data": x.ravel().tolist()}]}).encode()


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    boundary = "----t" + str(time.time_ns())
    parts = []
    for key, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


def ready(base: str) -> bool:
    try:
        return call(base + "/v2/health/ready")[0] == 200
    except OSError:  # not listening yet
        return False


def start_server(spawn: Any, env: dict[str, str], ref: str, *extra: str) -> tuple[Any, str]:
    port = free_port()
    proc = spawn.python(["worker", "serve", ref, "--port", str(port), *extra], env, name=f"serve-{port}")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(spawn.output(proc)[-3000:])
        return ready(base)
    wait_for(up, 120, "the inference server to be ready", interval=0.3)
    return proc, base


def registered(conn: Any, env: dict[str, str], run: Path, name: str = "digits") -> str:
    job_id = seed_finished_job(conn, run)
    res = run_cli(["worker", "model", "register", job_id, "--name", name], env)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[-1]


def samples(run: Path, n: int) -> list[Path]:
    return sorted((run / "samples").glob("*.png"))[:n]


def test_the_protocol_classify_and_bad_requests(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                               exported_run: Path) -> None:
    ref = registered(redis_conn, job_env, exported_run)
    proc, base = start_server(spawn, job_env, ref)
    pp = json.loads((exported_run / "export/preprocess.json").read_text())
    labels = json.loads((exported_run / "export/labels.json").read_text())

    assert call(base + "/v2/health/live") == (200, {"live": True})
    status, meta = call(base + "/v2/models/digits")
    c, h, w = (1 if pp["color_mode"] == "L" else 3), *pp["input_size"]
    assert status == 200 and meta["inputs"] == [{"name": pp["input_name"], "datatype": "FP32", "shape": [-1, c, h, w]}]
    assert meta["outputs"][0]["shape"] == [-1, len(labels)] and meta["versions"] == ["1"]

    images = [Image.open(p) for p in samples(exported_run, 6)]
    x = np.stack([preprocess_image(img, pp) for img in images])
    status, out = call(base + "/v2/models/digits/infer", infer_body(x, pp["input_name"]))
    assert status == 200 and out["model_name"] == "digits" and out["model_version"] == "1" and out["id"] == "t1"
    served = np.asarray(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
    session = create_session(exported_run / "export" / meta["parameters"]["file"])
    local = session.run(None, {pp["input_name"]: x})[0]
    assert np.abs(served - local).max() < 1e-4
    wide_id = json.loads(infer_body(x[:1], pp["input_name"]))
    wide_id["id"] = 2**70  # beyond 64-bit integers: still echoed
    status, out = call(base + "/v2/models/digits/infer", json.dumps(wide_id).encode())
    assert status == 200 and out["id"] == 2**70

    files = []
    for p in samples(exported_run, 3):
        files.append((p.name, p.read_bytes()))
    body, headers = multipart(files, {"top_k": "3"})
    status, top = call(base + "/v2/models/digits/classify", body, headers=headers)
    expected = classify(session, x[:3], labels, 3, pp["input_name"])
    assert status == 200 and [t["file"] for t in top] == [f[0] for f in files]
    assert [[e["label"] for e in t["top"]] for t in top] == [[e["label"] for e in row] for row in expected]

    bad = [
        (infer_body(x[:, :, :4, :4], pp["input_name"]), "does not match the model's"),
        (infer_body(x, pp["input_name"], "INT64"), "datatype 'INT64' is not supported"),
        (b"{not json", "not JSON"),
        (json.dumps({"inputs": []}).encode(), "must be a list of one tensor"),
        (json.dumps({"inputs": [{"datatype": "FP32", "shape": [1, c, h, w], "data": [1.0]}]}).encode(),
         f"needs {c * h * w}"),
        (json.dumps({"inputs": [{"datatype": "FP32", "shape": [1, c, h, w], "data": ["a"] * (c * h * w)}]}).encode(),
         "data must be numbers"),
        (json.dumps({"inputs": [{"datatype": "FP32", "shape": [1, c, h, w], "data": [float("nan")] * (c * h * w)}]}
                    ).encode(), "NaN or infinity"),
    ]
    for payload, message in bad:
        status, err = call(base + "/v2/models/digits/infer", payload)
        assert status == 400 and message in err["error"], (message, status, err)
    body, headers = multipart([("notes.txt", b"hello")])
    status, err = call(base + "/v2/models/digits/classify", body, headers=headers)
    assert status == 400 and "notes.txt: not a readable image" in err["error"]
    body, headers = multipart([(f"{i}.png", files[0][1]) for i in range(65)])
    status, err = call(base + "/v2/models/digits/classify", body, headers=headers)
    assert status == 400 and "65" in err["error"], err
    status, err = call(base + "/v2/models/other/infer", infer_body(x, pp["input_name"]))
    assert status == 404 and "serves 'digits'" in err["error"]
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 900000000\r\n\r\n{")
        assert b" 413 " in sock.recv(4096).split(b"\r\n", 1)[0] + b" "
    assert proc.poll() is None and call(base + "/v2/health/ready")[0] == 200
    status, text = call(base + "/metrics")
    assert status == 200 and 'inference_requests_total{route="infer",status="400"} 7.0' in text
    assert "inference_batch_size_count" in text and "inference_queue_depth" in text


def binary_body(x: np.ndarray, name: str, *, binary_output: bool = True, size: int | None = None) -> tuple[
        bytes, dict[str, str]]:
    """An infer request in the binary tensor data extension, as tritonclient.http sends one by default (its JSON part
    names the byte count, the raw little-endian FP32 follows; no outputs listed, so binary_data_output)."""
    raw = x.astype("<f4").tobytes()
    head = json.dumps({"id": "b1", "inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                                "parameters": {"binary_data_size": len(raw) if size is None else size}}],
                       "parameters": {"binary_data_output": binary_output}}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def test_the_binary_tensor_data_extension(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                          exported_run: Path) -> None:
    ref = registered(redis_conn, job_env, exported_run)
    proc, base = start_server(spawn, job_env, ref)
    assert "HTTP httptools, loop uvloop" in spawn.output(proc)  # requirements.txt's, named, not h11's fallback
    pp = json.loads((exported_run / "export/preprocess.json").read_text())
    x = np.stack([preprocess_image(Image.open(p), pp) for p in samples(exported_run, 4)])
    url = base + "/v2/models/digits/infer"
    assert "binary_tensor_data" in call(base + "/v2")[1]["extensions"]
    _, as_json = call(url, infer_body(x, pp["input_name"]))
    expected = np.asarray(as_json["outputs"][0]["data"], np.float32).reshape(as_json["outputs"][0]["shape"])

    body, headers = binary_body(x, pp["input_name"])
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as resp:
        raw, split = resp.read(), int(resp.headers["Inference-Header-Content-Length"])
    head = json.loads(raw[:split])
    out = head["outputs"][0]
    assert head["id"] == "b1" and out["parameters"]["binary_data_size"] == len(raw) - split == expected.nbytes
    assert np.array_equal(np.frombuffer(raw[split:], "<f4").reshape(out["shape"]), expected)

    body, headers = binary_body(x, pp["input_name"], binary_output=False)  # binary in, JSON out
    status, out = call(url, body, headers=headers)
    assert status == 200 and np.array_equal(np.asarray(out["outputs"][0]["data"], np.float32).reshape(x.shape[0], -1),
                                            expected)
    bad = [
        (binary_body(x, pp["input_name"], size=12), "needs"),
        (binary_body(x[:, :, :4, :4], pp["input_name"]), "does not match the model's"),
        ((body, {**headers, "Inference-Header-Content-Length": "99999999"}), "Inference-Header-Content-Length"),
        ((body, {**headers, "Inference-Header-Content-Length": "5"}), "not JSON"),
        ((infer_body(x, pp["input_name"]) + b"xx", {"Inference-Header-Content-Length": str(len(infer_body(
            x, pp["input_name"])))}), "no binary_data_size"),
    ]
    for (payload, hdrs), message in bad:
        status, err = call(url, payload, headers=hdrs)
        assert status == 400 and message in err["error"], (message, status, err)
    assert call(base + "/v2/health/ready")[0] == 200


def test_a_server_off_loopback_needs_its_token(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                              exported_run: Path) -> None:
    ref = registered(redis_conn, job_env, exported_run)
    port = free_port()
    proc = spawn.python(["worker", "serve", ref, "--host", "0.0.0.0", "--port", str(port)], job_env, name="open")
    base = f"http://127.0.0.1:{port}"
    token = wait_for(lambda: next((ln.split()[-1] for ln in spawn.output(proc).splitlines()
                                   if ln.startswith("bearer token")), None), 120, "the printed token")
    wait_for(lambda: ready(base), 60, "ready (the probe needs no token)")
    status, err = call(base + "/v2/models/digits")
    assert status == 401 and "bearer token" in err["error"]
    assert call(base + "/v2/models/digits", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(base + "/v2/models/digits", headers={"Authorization": f"Bearer {token}"})[0] == 200


@pytest.mark.slow  # a minute of load; `python -m tests.bench --only serving` measures the same move under ab
def test_batching_and_an_alias_moved_under_load(redis_conn: Any, job_env: dict[str, str], spawn: Any,
                                               exported_run: Path) -> None:
    registered(redis_conn, job_env, exported_run)
    registered(redis_conn, job_env, exported_run)  # digits:2, the version the alias moves to
    assert run_cli(["worker", "model", "alias", "digits", "production", "1"], job_env).returncode == 0
    _, base = start_server(spawn, job_env, "digits@production", "--max-delay-ms", "20")
    pp = json.loads((exported_run / "export/preprocess.json").read_text())
    x = np.stack([preprocess_image(Image.open(p), pp) for p in samples(exported_run, 1)])
    body = infer_body(x, pp["input_name"])
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, out = call(base + "/v2/models/digits/infer", body)
            results.append((time.monotonic(), status, out.get("model_version") if status == 200 else str(out)))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 40, 60, "requests under load")
        moved_at = time.monotonic()
        assert run_cli(["worker", "model", "alias", "digits", "production", "2"], job_env).returncode == 0
        wait_for(lambda: any(v == "2" for _, _, v in results), 30, "an answer from version 2")
        first_v2 = min(t for t, _, v in results if v == "2")
        wait_for(lambda: sum(1 for t, _, _ in results if t > first_v2) >= 40, 60, "more requests after the move")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:3]
    assert first_v2 - moved_at < 5.0  # the CLI's own start-up (~1-2 s here) is inside this window
    assert all(v == "2" for t, _, v in results if t > first_v2 + 1.0)
    _, text = call(base + "/metrics")
    count = float(text.split("inference_batch_size_count ")[1].split()[0])
    total = float(text.split("inference_batch_size_sum ")[1].split()[0])
    assert total == len(results) and count < total  # 8 clients, 20 ms window: batches of several requests
