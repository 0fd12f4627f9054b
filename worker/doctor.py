"""`python -m worker doctor [--json]`: can this machine serve jobs? Each check prints what it found and, when it is not
fine, the fix.

Checks: Python and package versions against requirements.txt; the torch build against the CUDA driver; the GPUs
(name, memory, free); the distributed backends (a one-rank gloo, and NCCL where there are GPUs, all-reduce in a child
process); Redis (reachable with its password, version, persistence); the artifact store (written, read back and
removed from here) and whether it is the store the live workers use (the id in its `store-id` file); free disk where
datasets and run folders go; the address this worker advertises for multi-node jobs (`WORKER_ADDR` or the default
route's source address: an address of this machine that accepts connections, not loopback).

A check is `ok`, `warn` (the machine can serve, but something is off), `fail` (it cannot) or `skip` (not applicable
here). Exit code 0 when nothing failed, 1 otherwise.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from worker.defaults import (
    DOCTOR_DISK_WARN_GB,
    DOCTOR_PROBE_TIMEOUT,
    MIN_REDIS_VERSION,
    REPO_ROOT,
)

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

SERVING_PACKAGES = ("torch", "torchvision", "numpy", "pillow", "pyyaml", "pydantic", "onnx", "onnxruntime", "redis",
                    "rq", "fsspec", "psutil")
"""Packages a worker cannot run a job without: missing one fails the check; any other missing one is a warning."""


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


def _pip_fix(name: str, version: str) -> str:
    return f"pip install '{name}=={version}'  (or: pip install -r requirements.txt)"


# ----------------------------------------------------------------------------------------------------- checks
def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 11):
        return Check("python", FAIL, f"Python {version} ({sys.executable})", "use Python 3.11 or newer (README "
                     "\"Quick start\": python3 -m venv .venv && . .venv/bin/activate)")
    return Check("python", OK, f"Python {version} ({sys.executable})")


def requirements(path: Path | None = None) -> dict[str, str]:
    """`name==version` pins of requirements.txt (names normalised as pip does)."""
    out = {}
    for line in (path or REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def check_packages() -> Check:
    missing, different = [], []
    for name, want in requirements().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append((name, want))
            continue
        if have.split("+")[0] != want.split("+")[0]:
            different.append((name, want, have))
    needed = [m for m in missing if m[0] in SERVING_PACKAGES]
    data = {"missing": [m[0] for m in missing], "different": {n: {"want": w, "have": h} for n, w, h in different}}
    if needed:
        return Check("packages", FAIL, "missing: " + ", ".join(f"{n}=={w}" for n, w in needed),
                     "pip install -r requirements.txt", data)
    if missing or different:
        parts = [f"{n} {h} (requirements.txt pins {w})" for n, w, h in different]
        parts += [f"{n} not installed" for n, _ in missing]
        return Check("packages", WARN, "; ".join(parts), "pip install -r requirements.txt (other versions may give "
                     "other results than the other workers)", data)
    return Check("packages", OK, f"all {len(requirements())} pins of requirements.txt installed", data=data)


def nvidia_smi() -> tuple[str | None, list[dict[str, Any]]]:
    """(driver version, [{index, name, memory_mb, free_mb}]) from nvidia-smi; (None, []) without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, []
    try:
        res = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError):
        return None, []
    gpus, driver = [], None
    for line in res.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 5:
            driver = parts[4]
            gpus.append({"index": int(parts[0]), "name": parts[1], "memory_mb": int(float(parts[2])),
                         "free_mb": int(float(parts[3]))})
    return driver, gpus


def check_torch(smi: tuple[str | None, list[dict[str, Any]]]) -> Check:
    try:
        import torch
    except ImportError as err:
        return Check("torch", FAIL, f"cannot import torch: {err}", "pip install -r requirements.txt")
    driver, smi_gpus = smi
    built_for = torch.version.cuda
    data = {"torch": torch.__version__, "cuda_build": built_for, "driver": driver,
            "cuda_available": bool(torch.cuda.is_available())}
    desc = f"torch {torch.__version__}, " + (f"built for CUDA {built_for}" if built_for else "CPU-only build")
    if driver:
        desc += f"; NVIDIA driver {driver}, {len(smi_gpus)} GPU(s)"
    if smi_gpus and not built_for:
        return Check("torch", FAIL, desc + ": this machine has GPUs but torch cannot use them",
                     "install a CUDA build of the pinned torch, e.g. pip install --force-reinstall "
                     f"'torch=={torch.__version__.split('+')[0]}' --index-url https://download.pytorch.org/whl/cu128 "
                     "(pick the CUDA version your driver supports: nvidia-smi shows it)", data)
    if smi_gpus and not torch.cuda.is_available():
        return Check("torch", FAIL, desc + ": CUDA is not usable (driver older than the CUDA torch was built for, or "
                     "no permission on /dev/nvidia*)", f"update the NVIDIA driver to one supporting CUDA {built_for}, "
                     "or install a torch build for an older CUDA", data)
    if not smi_gpus and not torch.cuda.is_available():
        return Check("torch", OK, desc + "; no GPU: this machine serves jobs as CPU ranks", data=data)
    return Check("torch", OK, desc, data=data)


def check_gpus(smi: tuple[str | None, list[dict[str, Any]]]) -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("gpus", SKIP, "no GPU visible to torch (a CPU worker)")
    gpus = []
    smi_by_index = {g["index"]: g for g in smi[1]}
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"index": i, "name": props.name, "memory_mb": total // 2**20, "free_mb": free // 2**20,
                     "capability": f"{props.major}.{props.minor}"})
    desc = "; ".join(f"{g['index']}: {g['name']} {g['memory_mb']} MiB, {g['free_mb']} MiB free" for g in gpus)
    busy = [g for g in gpus if g["free_mb"] < 0.5 * g["memory_mb"]]
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and len(gpus) < len(smi_by_index):
        desc += f" (CUDA_VISIBLE_DEVICES={hidden}: {len(smi_by_index)} on the machine)"
    if busy:
        return Check("gpus", WARN, desc, "another process holds more than half the memory of GPU "
                     + ", ".join(str(g["index"]) for g in busy) + " (nvidia-smi shows which); give the worker the "
                     "others with --gpus", {"gpus": gpus})
    return Check("gpus", OK, desc, data={"gpus": gpus})


_BACKEND_PROBE = """
import datetime, os, sys, torch, torch.distributed as dist
backend = sys.argv[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60), **({"device_id": device} if backend == "nccl" else {}))
t = torch.ones(4, device=device)
dist.all_reduce(t)
assert t.sum().item() == 4.0
dist.destroy_process_group()
print("ok")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_distributed() -> Check:
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return Check("distributed", FAIL, "this torch has no torch.distributed",
                     "install the official torch wheel (pip install -r requirements.txt)")
    backends = ["gloo"] + (["nccl"] if torch.cuda.is_available() else [])
    results: dict[str, str] = {}
    for backend in backends:
        if backend == "nccl" and not dist.is_nccl_available():
            results[backend] = "not built into this torch"
            continue
        try:
            res = subprocess.run([sys.executable, "-c", _BACKEND_PROBE, backend, str(_free_port())],
                                 capture_output=True, text=True, timeout=DOCTOR_PROBE_TIMEOUT, check=False)
            out = (res.stdout + res.stderr).strip()
            results[backend] = "ok" if res.returncode == 0 else (out.splitlines() or ["failed"])[-1][:300]
        except subprocess.TimeoutExpired:
            results[backend] = f"hung for {DOCTOR_PROBE_TIMEOUT:g} s"
    desc = "; ".join(f"{b}: {r}" for b, r in results.items())
    bad = [b for b, r in results.items() if r != "ok"]
    if bad:
        fix = ("NCCL: install the CUDA build of torch (it bundles NCCL); check `NCCL_DEBUG=INFO python -m worker "
               "doctor`" if "nccl" in bad else "gloo: the machine must allow TCP on the loopback interface")
        return Check("distributed", FAIL, desc, fix, results)
    return Check("distributed", OK, desc + " (a one-rank all-reduce)", data=results)


def check_redis_security() -> Check:
    """Who can queue jobs here: a Redis off loopback needs a password or a TLS client certificate (or the operator's
    REDIS_ALLOW_INSECURE=1, a warning)."""
    from worker.connection import allows_insecure, insecure_reason, is_loopback, redact, redis_url
    from worker.defaults import ALLOW_INSECURE_ENV

    url = redis_url()
    reason = insecure_reason(url)
    data = {"url": redact(url), "allow_insecure": allows_insecure()}
    if reason is None:
        how = "loopback" if is_loopback(urlsplit(url).hostname) or url.startswith("unix:") else "password or TLS"
        return Check("redis security", OK, f"{redact(url)}: {how}", data=data)
    fix = ("set a password on that Redis (requirepass) and put it in REDIS_URL=redis://:PASSWORD@HOST:6379/0, or "
           "use rediss:// with a client certificate")
    if allows_insecure():
        return Check("redis security", WARN, f"{reason} ({ALLOW_INSECURE_ENV}=1 allows it)", fix, data)
    return Check("redis security", FAIL, reason, fix + f" (or set {ALLOW_INSECURE_ENV}=1 on purpose)", data)


def check_redis() -> tuple[Check, Any]:
    """The Redis check, and the checked connection (None when unreachable)."""
    from worker.connection import check, connect, redact, redis_url
    from worker.errors import RedisUnavailableError

    url = redis_url()
    source = "REDIS_URL" if os.environ.get("REDIS_URL", "").strip() else "the embedded server (var/redis/password)"
    try:
        conn = check(connect(url))
        server = conn.info("server")
        persistence = conn.info("persistence")
    except RedisUnavailableError as err:
        return Check("redis", FAIL, str(err), "start Redis (`honcho start` or `python -m worker redis` on this "
                     "machine) or set REDIS_URL=redis://:PASSWORD@HOST:6379/0 (rediss:// for TLS) to the server the "
                     "other workers use; the password must be in the URL", {"url": redact(url)}), None
    except Exception as err:  # noqa: BLE001 - INFO refused (ACL) or a driver error: say it, do not crash
        return Check("redis", FAIL, f"Redis at {redact(url)}: {err}", "the Redis user needs INFO and the "
                     "commands RQ uses", {"url": redact(url)}), None
    version = str(server.get("redis_version", "?"))
    aof = bool(int(persistence.get("aof_enabled", 0) or 0))
    rdb = None
    try:
        rdb = bool((conn.config_get("save") or {}).get("save"))
    except Exception:  # noqa: BLE001 - managed Redis services often refuse CONFIG
        pass
    persistent = aof or bool(rdb)
    data = {"url": redact(url), "version": version, "aof": aof, "rdb": rdb}
    desc = (f"{redact(url)} ({source}): Redis {version}, persistence "
            + ("on (" + ", ".join(n for n, on in (("append-only", aof), ("snapshots", rdb)) if on) + ")"
               if persistent else ("off" if rdb is not None else "append-only off, snapshots unknown")))
    try:
        have = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        have = MIN_REDIS_VERSION
    if have < MIN_REDIS_VERSION:
        return Check("redis", FAIL, desc, f"Redis {'.'.join(map(str, MIN_REDIS_VERSION))} or newer is needed", data), conn
    if not persistent:
        return Check("redis", WARN, desc, "a Redis restart would lose every queued job and status: turn on "
                     "append-only persistence (`appendonly yes`; the embedded server has it)", data), conn
    return Check("redis", OK, desc, data=data), conn


def check_store() -> tuple[Check, Any]:
    """Write, read back and remove a probe file in the artifact store; (check, store or None)."""
    from worker.artifacts import ArtifactStore
    from worker.errors import ArtifactError

    try:
        store = ArtifactStore()
    except Exception as err:  # noqa: BLE001 - a bad URL or a missing fsspec backend (s3fs): say which
        return Check("store", FAIL, f"ARTIFACTS_DIR={os.environ.get('ARTIFACTS_DIR', '')!r}: {err}",
                     "set ARTIFACTS_DIR to a folder or an fsspec URL whose package is installed (s3:// needs s3fs)"), None
    key = f".doctor-{socket.gethostname()}-{os.getpid()}"
    payload = os.urandom(16).hex().encode()
    try:
        store.check_writable()
        if store.is_local:
            probe = Path(store.path(key))
            probe.write_bytes(payload)
            back = probe.read_bytes()
            probe.unlink()
        else:
            with store.fs.open(store.path(key), "wb") as fh:
                fh.write(payload)
            with store.fs.open(store.path(key), "rb") as fh:
                back = fh.read()
            store.fs.rm(store.path(key))
    except (ArtifactError, OSError) as err:
        return Check("store", FAIL, f"{store.url}: {err}", "give this machine write access to the store, or set "
                     "ARTIFACTS_DIR to a writable folder or URL (s3://bucket/prefix) that every worker shares",
                     {"url": store.url}), None
    if back != payload:
        return Check("store", FAIL, f"{store.url}: a file written here read back different",
                     "the store does not keep what is written to it: use another one", {"url": store.url}), None
    kind = "local folder" if store.is_local else "remote store"
    return Check("store", OK, f"{store.url} ({kind}): written, read back and removed from here",
                 data={"url": store.url}), store


def check_same_store(store: Any, conn: Any) -> Check:
    from worker.presence import list_workers

    if store is None or conn is None:
        return Check("shared store", SKIP, "needs a working artifact store and Redis (see above)")
    mine = store.identity()
    me = socket.gethostname()
    others = [w for w in list_workers(conn) if w.get("store_id") or w.get("artifacts")]
    if not others:
        return Check("shared store", OK, f"no live worker to compare with (this store's id {mine[:8]})",
                     data={"store_id": mine})
    differ = [w for w in others if (w.get("store_id") or None) != mine]
    data = {"store_id": mine, "workers": {w["name"]: w.get("store_id") for w in others}}
    if differ:
        names = ", ".join(f"{w['name']} on {w.get('hostname')} ({w.get('artifacts')})" for w in differ[:5])
        return Check("shared store", FAIL, f"{len(differ)} of {len(others)} live worker(s) use another artifact store "
                     f"than this machine's {store.url}: {names}", "set ARTIFACTS_DIR to the same store on every "
                     "machine (an fsspec URL such as s3://bucket/prefix; a local folder is one machine's only): a job "
                     "resumed or opened elsewhere would miss its files", data)
    local_elsewhere = store.is_local and any(w.get("hostname") != me for w in others)
    detail = f"the same store as the {len(others)} live worker(s) (id {mine[:8]})"
    if local_elsewhere:
        detail += " (a folder shared between machines, e.g. NFS)"
    return Check("shared store", OK, detail, data=data)


def check_disk(store: Any) -> Check:
    from worker.diskspace import min_free_bytes
    from worker.paths import cache_dir, runs_cache_dir

    places = {"datasets (cache)": cache_dir()}
    if store is not None and store.is_local:
        places["run folders (artifact store)"] = Path(store.base)
    else:
        places["run folders (cache)"] = runs_cache_dir()
    rows, worst = [], float("inf")
    for what, path in places.items():
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_gb = shutil.disk_usage(probe).free / 2**30
        worst = min(worst, free_gb)
        rows.append(f"{what} {path}: {free_gb:.1f} GiB free")
    desc = "; ".join(rows)
    data = {"min_free_gb": round(worst, 2)}
    floor = min_free_bytes() / 2**30  # DISK_MIN_FREE_GB, or its environment override
    if worst < floor:
        return Check("disk", FAIL, desc, f"free disk space (at least {floor:g} GiB; datasets are "
                     "unpacked and checkpoints written there), or point TRAINER_VAR_DIR at a bigger disk", data)
    if worst < DOCTOR_DISK_WARN_GB:
        return Check("disk", WARN, desc, f"less than {DOCTOR_DISK_WARN_GB:g} GiB: big datasets or many checkpoints "
                     "may not fit", data)
    return Check("disk", OK, desc, data=data)


def check_address() -> Check:
    """The address this worker advertises for multi-node jobs (`WORKER_ADDR`, else the default route's source
    address, as `python -m worker run` picks it): an address of this machine that accepts TCP connections, and not
    loopback when other machines must reach it (node 0 of a multi-node job hosts the rendezvous there)."""
    import ipaddress

    from worker.multinode import primary_address

    given = os.environ.get("WORKER_ADDR", "").strip()
    addr = given or primary_address()
    source = "WORKER_ADDR" if given else "the default route's source address"
    data = {"address": addr, "source": "WORKER_ADDR" if given else "default route"}
    try:
        with socket.socket() as srv:
            srv.bind((addr, 0))
            srv.listen(1)
            with socket.create_connection(srv.getsockname(), timeout=5):
                pass
    except OSError as err:
        return Check("address", FAIL, f"{addr} ({source}) is not an address of this machine that accepts "
                     f"connections: {err}", "set WORKER_ADDR (or --advertise-addr) to this machine's address on the "
                     "network the other workers use (ip -brief addr shows them)", data)
    try:
        loopback = ipaddress.ip_address(addr).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return Check("address", WARN, f"{addr} ({source}) is loopback: multi-node jobs cannot include this machine",
                     "set WORKER_ADDR to this machine's network address (only needed for jobs over several machines)",
                     data)
    return Check("address", OK, f"{addr} ({source}) accepts TCP connections here; other machines must reach it on "
                 "the ports docs/multinode.md lists", data=data)


# ------------------------------------------------------------------------------------------------------- run
def run_checks() -> list[Check]:
    checks = [check_python(), check_packages()]
    smi = nvidia_smi()

    def guarded(name: str, fn: Callable[[], Check]) -> Check:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - one broken probe must not hide the others' answers
            return Check(name, FAIL, f"the check itself failed: {type(err).__name__}: {err}")

    torch_check = guarded("torch", lambda: check_torch(smi))
    checks.append(torch_check)
    if torch_check.status != FAIL or torch_check.data:
        checks.append(guarded("gpus", lambda: check_gpus(smi)))
        checks.append(guarded("distributed", check_distributed))
    checks.append(guarded("redis security", check_redis_security))
    redis_check, conn = check_redis()
    store_check, store = check_store()
    checks += [redis_check, store_check, guarded("shared store", lambda: check_same_store(store, conn)),
               guarded("disk", lambda: check_disk(store)), guarded("address", check_address)]
    return checks


def report(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.status == FAIL for c in checks), "host": socket.gethostname(),
            "checks": [dataclasses.asdict(c) for c in checks]}


def print_report(checks: list[Check]) -> None:
    print(f"worker doctor on {socket.gethostname()}")
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {c.status.upper():<4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in (WARN, FAIL):
            print(f"  {'':<4}  {'':<{width}}  fix: {c.fix}")
    failed = [c.name for c in checks if c.status == FAIL]
    print("result: this machine can serve jobs" if not failed else
          f"result: this machine cannot serve jobs ({len(failed)} problem(s): {', '.join(failed)})")


def main(as_json: bool = False) -> int:
    checks = run_checks()
    if as_json:
        print(json.dumps(report(checks), indent=2, default=str))
    else:
        print_report(checks)
    return 0 if report(checks)["ok"] else 1
