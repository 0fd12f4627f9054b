"""The artifact store: run folders and uploaded datasets, in a local folder or behind any fsspec URL.

- A plain path (`ARTIFACTS_DIR`, default `var/artifacts/`) is *local*: workers on this machine train straight into
  `jobs/<id>/run/` and read datasets in place.
- A URL (`s3://bucket/prefix`, `gs://...`, even `file:///shared/dir`) is *remote*: workers train into a local cache
  folder and upload the run folder after every epoch and at the end; datasets are downloaded once per worker machine
  into the cache (`worker.paths.dataset_cache_dir()`, keyed by content hash).

Layout inside the store:
    datasets/<sha256>.zip          an uploaded dataset (a folder is zipped on upload)
    jobs/<job id>/run/...          the run folder (config.yaml, checkpoints/, report.json, export/, job.log, ...)

Only names built here from validated job ids and from the store's own listings reach a filesystem; an artifact is
opened by (job id, name) where the name must be one the listing returned.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any

from core import runfolder as rf
from worker import keys
from worker.defaults import (
    ARTIFACTS_DIR,
    ARTIFACTS_DIR_ENV,
    REPO_ROOT,
    UPLOAD_MAX_BYTES,
    UPLOAD_MAX_BYTES_ENV,
)
from worker.errors import ArtifactError
from worker.paths import dataset_cache_dir, runs_cache_dir

DATASET_REF_PREFIX = "artifact:"
"""A config's `data.path` that starts with this names a dataset in the store (`artifact:datasets/<sha>.zip`)."""

NAMED_ARTIFACTS = {
    "report": rf.REPORT,
    "onnx": rf.exported(rf.ONNX),
    "int8": rf.exported(rf.INT8_ONNX),
    "pt": rf.exported(rf.STATE_DICT),
    "bundle": rf.exported(rf.BUNDLE),
    "labels": rf.LABELS,
    "config": rf.CONFIG,
    "metrics": rf.METRICS,
    "last_checkpoint": rf.LAST_CHECKPOINT,
    "best_checkpoint": rf.BEST_CHECKPOINT,
    "log": rf.JOB_LOG,
}
"""Short names for the files clients ask for most (dashboard download buttons), relative to the run folder."""

STORE_ID_KEY = "store-id"
"""A file at the store's root holding a random id made on first use: machines that read the same id share the store."""

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def zip_folder(folder: Path, dest: Path) -> None:
    """Deterministic zip of a folder (sorted names, fixed times, stored: images are compressed already).

    Symlinks are skipped, so a folder cannot smuggle files from elsewhere into the upload.
    """
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            rel = path.relative_to(folder).as_posix()
            info = zipfile.ZipInfo(f"{folder.name}/{rel}", date_time=_FIXED_ZIP_TIME)
            info.external_attr = 0o644 << 16
            with path.open("rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def upload_max_bytes() -> int:
    """The upload cap in bytes: env UPLOAD_MAX_BYTES when set (read on every call), else the default."""
    raw = os.environ.get(UPLOAD_MAX_BYTES_ENV, "").strip()
    if not raw:
        return UPLOAD_MAX_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        raise ArtifactError(f"{UPLOAD_MAX_BYTES_ENV}={raw!r} is not a number of bytes") from None
    if value <= 0:
        raise ArtifactError(f"{UPLOAD_MAX_BYTES_ENV}={raw!r} must be a positive number of bytes")
    return value


def store_url() -> str:
    """The artifact store this process uses: env `ARTIFACTS_DIR` (a folder or fsspec URL) or the default folder.
    Read on every call, so tests and honcho can point a process elsewhere."""
    return os.environ.get(ARTIFACTS_DIR_ENV, "").strip() or ARTIFACTS_DIR


class ArtifactStore:
    """One artifact store (see the module docstring); `ArtifactStore()` is the one of `store_url()`."""

    def __init__(self, url: str | os.PathLike[str] | None = None):
        raw = str(url or store_url())
        self.url = raw
        self.is_local = "://" not in raw
        if self.is_local:
            root = Path(raw).expanduser()
            self.root: Path | None = root if root.is_absolute() else REPO_ROOT / root
            self.fs: Any = None
            self.base = str(self.root)
        else:
            import fsspec

            self.root = None
            self.fs, base = fsspec.core.url_to_fs(raw)
            self.base = base.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # ------------------------------------------------------------------------------------------------- addressing
    def path(self, key: str) -> str:
        """Absolute path (local) or the fs path (remote) of a store key like `jobs/<id>/run/report.json`."""
        if ".." in key.split("/") or key.startswith("/"):
            raise ArtifactError(f"invalid artifact key {key!r}")
        return f"{self.base}/{key}" if key else self.base

    def uri(self, key: str) -> str:
        """What users see: a local path, or the URL (with the store's scheme)."""
        if self.is_local:
            return self.path(key)
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, (list, tuple)) else self.fs.protocol
        return f"{protocol}://{self.path(key)}"

    @staticmethod
    def run_key(job_id: str) -> str:
        return f"jobs/{keys.check_job_id(job_id)}/run"

    def local_run_dir(self, job_id: str) -> Path:
        """Where a worker on this machine writes the job's run folder (in the store itself when it is local)."""
        if self.is_local:
            return Path(self.path(self.run_key(job_id)))
        return runs_cache_dir() / keys.check_job_id(job_id) / "run"

    # --------------------------------------------------------------------------------------------------- datasets
    def upload_dataset(self, path: str | Path) -> dict[str, Any]:
        """Put a local .zip or folder into the store (content-addressed: the same data is stored once).

        Returns {"ref": "artifact:datasets/<sha>.zip", "sha256", "bytes", "name"}; `ref` goes into data.path.
        """
        src = Path(path)
        with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
            if src.is_dir():
                zipped = Path(tmp) / "dataset.zip"
                zip_folder(src, zipped)
            elif src.is_file():
                zipped = src
            else:
                raise ArtifactError(f"dataset {str(src)!r} is neither a file nor a folder")
            size = zipped.stat().st_size
            limit = upload_max_bytes()
            if size > limit:
                raise ArtifactError(f"dataset is {size / 1e9:.2f} GB; the upload limit is {limit / 1e9:.2f} GB "
                                    f"({UPLOAD_MAX_BYTES_ENV}); register a bigger one where it lives instead "
                                    "(python -m worker dataset add NAME s3://... or file:///...)")
            sha = _sha256_file(zipped)
            key = f"datasets/{sha}.zip"
            try:
                if not self.has_complete(key, size):
                    self.put_file(zipped, key)
            except OSError as err:
                raise ArtifactError(f"cannot write the dataset to the artifact store {self.url}: {err}") from None
        return {"ref": DATASET_REF_PREFIX + key, "sha256": sha, "bytes": size, "name": src.name}

    def fetch_dataset(self, ref: str) -> Path:
        """Local path of a stored dataset: in place for a local store, else downloaded once into the cache."""
        key = ref.removeprefix(DATASET_REF_PREFIX)
        name = key.removeprefix("datasets/")
        if not key.startswith("datasets/") or not name.endswith(".zip") or len(name) != 68 or "/" in name:
            raise ArtifactError(f"invalid dataset reference {ref!r}")
        if self.is_local:
            local = Path(self.path(key))
            if not local.is_file():
                raise ArtifactError(f"dataset {ref} is missing from the artifact store {self.url}")
            return local
        from core.data.cache_budget import touch
        from worker.caches import make_download_room

        local = dataset_cache_dir() / name
        if local.is_file() and touch(local):  # the LRU clock of the download cache
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(f".part{os.getpid()}")
        try:
            make_download_room(int(self.fs.size(self.path(key)) or 0), keep=local)  # DOWNLOAD_CACHE_GB
            self.fs.get_file(self.path(key), str(tmp))
        except (OSError, FileNotFoundError) as err:
            tmp.unlink(missing_ok=True)
            raise ArtifactError(f"cannot download dataset {ref} from {self.url}: {err}") from None
        if _sha256_file(tmp) != name[:-4]:
            tmp.unlink(missing_ok=True)
            raise ArtifactError(f"dataset {ref} downloaded from {self.url} does not match its hash")
        os.replace(tmp, local)  # atomic: two workers fetching at once both end with one complete file
        return local

    # ------------------------------------------------------------------------------------------------ file access
    def exists(self, key: str) -> bool:
        if self.is_local:
            return Path(self.path(key)).exists()
        return bool(self.fs.exists(self.path(key)))

    def put_file(self, local: Path, key: str) -> None:
        """Copy a local file to `key`, never leaving a torn file under the final name: a local store writes a temp
        file, fsyncs and renames it (`core.runfolder.replacing`); a remote one uploads, then compares the stored
        size with the local one and deletes the object when they differ or the upload failed. OSError on failure
        (a full disk: ENOSPC), with the previous file at `key`, if any, kept on a local store."""
        if self.is_local:
            dest = Path(self.path(key))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with rf.replacing(dest) as tmp:
                shutil.copyfile(local, tmp)
            return
        remote = self.path(key)
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        expected = local.stat().st_size
        try:
            self.fs.put_file(str(local), remote)
            stored = self.fs.size(remote)
            if stored != expected:
                raise OSError(f"{self.uri(key)}: stored {stored} bytes of {expected}")
        except BaseException:
            with contextlib.suppress(OSError, FileNotFoundError):
                self.fs.rm_file(remote)
            raise

    def has_complete(self, key: str, size: int) -> bool:
        """`key` exists with exactly `size` bytes (a content-addressed file torn by an old upload is not complete)."""
        try:
            if self.is_local:
                return Path(self.path(key)).stat().st_size == size
            return int(self.fs.size(self.path(key))) == size
        except (OSError, FileNotFoundError):
            return False

    def sync_up(self, job_id: str, local_dir: Path, state: dict[str, tuple[int, int]]) -> int:
        """Upload the files of `local_dir` that changed since the last call (`state` remembers size/mtime).

        No-op for a local store (the run folder is already in it). Returns the number of files uploaded.
        """
        if self.is_local or not local_dir.is_dir():
            return 0
        uploaded = 0
        prefix = self.run_key(job_id)
        for path in sorted(local_dir.rglob("*")):
            if not path.is_file() or path.is_symlink() or ".part" in path.name or path.name.endswith(".tmp"):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # replaced while we walked
                continue
            rel = path.relative_to(local_dir).as_posix()
            sig = (st.st_size, st.st_mtime_ns)
            if state.get(rel) == sig:
                continue
            self.put_file(path, f"{prefix}/{rel}")
            state[rel] = sig
            uploaded += 1
        return uploaded

    def sync_down(self, job_id: str, local_dir: Path) -> int:
        """Download a job's run folder from a remote store (a recovered job resumes from its last checkpoint)."""
        if self.is_local:
            return 0
        prefix = self.path(self.run_key(job_id))
        if not self.fs.exists(prefix):
            return 0
        n = 0
        for remote in self.fs.find(prefix):
            rel = remote[len(prefix):].lstrip("/")
            if not rel or ".." in rel.split("/"):
                continue
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(dest))
            n += 1
        return n

    def list_files(self, job_id: str) -> list[str]:
        """Relative paths of every file in the job's run folder (sorted); [] when there is none."""
        key = self.run_key(job_id)
        if self.is_local:
            root = Path(self.path(key))
            if not root.is_dir():
                return []
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                          if p.is_file() and not p.is_symlink() and ".part" not in p.name)
        prefix = self.path(key)
        if not self.fs.exists(prefix):
            return []
        return sorted(r[len(prefix):].lstrip("/") for r in self.fs.find(prefix) if ".part" not in r)

    def _checked_name(self, job_id: str, name: str) -> str:
        name = NAMED_ARTIFACTS.get(name, name)
        if name not in self.list_files(job_id):  # only names the listing produced ever reach the filesystem
            raise ArtifactError(f"job {job_id} has no artifact {name!r}")
        return name

    def open(self, job_id: str, name: str) -> IO[bytes]:
        """Open one of the job's files (`name`: a path from list_files or a short name like 'onnx') for reading."""
        name = self._checked_name(job_id, name)
        full = self.path(f"{self.run_key(job_id)}/{name}")
        return open(full, "rb") if self.is_local else self.fs.open(full, "rb")

    def read_bytes(self, job_id: str, name: str) -> bytes:
        with self.open(job_id, name) as fh:
            return fh.read()

    def local_path(self, job_id: str, name: str) -> Path | None:
        """A filesystem path of the artifact when the store is local (None for remote stores)."""
        name = self._checked_name(job_id, name)
        return Path(self.path(f"{self.run_key(job_id)}/{name}")) if self.is_local else None

    def artifact_uris(self, job_id: str, files: list[str] | None = None) -> dict[str, Any]:
        """{"run": uri of the run folder, "<short name>": uri, ...} for the well-known files that exist."""
        files = self.list_files(job_id) if files is None else files
        out: dict[str, Any] = {"run": self.uri(self.run_key(job_id))}
        present = set(files)
        for short, rel in NAMED_ARTIFACTS.items():
            if rel in present:
                out[short] = self.uri(f"{self.run_key(job_id)}/{rel}")
        return out

    def listing(self, prefix: str) -> list[tuple[str, int, float]]:
        """(key, bytes, modified as a Unix time) of every file under `prefix` (a key folder); [] when none."""
        if self.is_local:
            root = Path(self.path(prefix))
            if not root.is_dir():
                return []
            out = []
            for p in root.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    st = p.stat()
                    out.append((f"{prefix}/{p.relative_to(root).as_posix()}", st.st_size, st.st_mtime))
            return out
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        out = []
        for path, info in self.fs.find(base, detail=True).items():
            modified = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
            out.append((f"{prefix}/{path[len(base):].lstrip('/')}", int(info.get("size") or 0), stamp))
        return out

    def copy(self, src: str, dst: str) -> None:
        """Copy one file of the store to another key (server-side on a remote store; through `replacing` locally)."""
        if self.is_local:
            dest = Path(self.path(dst))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with rf.replacing(dest) as tmp:
                shutil.copyfile(self.path(src), tmp)
            return
        self.fs.makedirs(self.path(dst).rsplit("/", 1)[0], exist_ok=True)
        self.fs.copy(self.path(src), self.path(dst))

    def size(self, key: str) -> int:
        return Path(self.path(key)).stat().st_size if self.is_local else int(self.fs.size(self.path(key)))

    def read_key(self, key: str) -> bytes:
        """The bytes of any file of the store by key (callers build the key from checked names only)."""
        if self.is_local:
            return Path(self.path(key)).read_bytes()
        with self.fs.open(self.path(key), "rb") as fh:
            return fh.read()

    def remove_folder(self, prefix: str) -> None:
        """Delete every file under a key folder (missing is fine)."""
        try:
            if self.is_local:
                shutil.rmtree(self.path(prefix), ignore_errors=True)
            elif self.fs.exists(self.path(prefix)):
                self.fs.rm(self.path(prefix), recursive=True)
        except OSError as err:
            raise ArtifactError(f"cannot delete {prefix}/ from the artifact store {self.url}: {err}") from None

    def remove(self, key: str) -> None:
        """Delete one file of the store (missing is fine); ArtifactError when the store refuses."""
        try:
            if self.is_local:
                Path(self.path(key)).unlink(missing_ok=True)
            elif self.fs.exists(self.path(key)):
                self.fs.rm_file(self.path(key))
        except OSError as err:
            raise ArtifactError(f"cannot delete {key} from the artifact store {self.url}: {err}") from None

    def delete_job(self, job_id: str) -> None:
        """Remove the job's folder from the store (and this machine's cache of it)."""
        self.remove_folder(f"jobs/{keys.check_job_id(job_id)}")
        shutil.rmtree(runs_cache_dir() / job_id, ignore_errors=True)

    def identity(self) -> str:
        """The store's id (STORE_ID_KEY), created when missing. Workers advertise it, and `python -m worker doctor`
        compares it with theirs: two machines with a local folder each, or different buckets, see different ids."""
        import uuid

        key = self.path(STORE_ID_KEY)
        if self.is_local:
            path = Path(key)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # the first writer wins
                    with os.fdopen(fd, "w") as fh:
                        fh.write(uuid.uuid4().hex)
                except FileExistsError:
                    pass
            return path.read_text(encoding="utf-8").strip()
        if not self.fs.exists(key):
            self.fs.makedirs(self.base, exist_ok=True)
            with self.fs.open(key, "wb") as fh:
                fh.write(uuid.uuid4().hex.encode())
        with self.fs.open(key, "rb") as fh:  # read back: of two first writers, both keep the one that stayed
            return fh.read().decode().strip()

    def check_writable(self) -> None:
        """Write and remove a probe file; ArtifactError with the store's URL when that fails (full, read-only)."""
        key = f".probe-{os.getpid()}"
        try:
            if self.is_local:
                Path(self.base).mkdir(parents=True, exist_ok=True)
                probe = Path(self.path(key))
                probe.write_bytes(b"ok")
                probe.unlink()
            else:
                self.fs.makedirs(self.base, exist_ok=True)
                with self.fs.open(self.path(key), "wb") as fh:
                    fh.write(b"ok")
                self.fs.rm(self.path(key))
        except OSError as err:
            raise ArtifactError(f"the artifact store {self.url} is not writable: {err}") from None


def bytes_io(data: bytes) -> IO[bytes]:
    """A readable in-memory file (what the dashboard hands to a download button)."""
    return io.BytesIO(data)
