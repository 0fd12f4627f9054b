"""Every exception the worker package raises on purpose; each message is meant for the user."""
from __future__ import annotations

from core.errors import FieldErrors


class WorkerError(Exception):
    """Base class of the worker package's errors."""


class SubmissionError(FieldErrors, WorkerError):
    """A job was refused at submission (bad config, dataset, GPU count, ...); nothing was enqueued. CLI exit 2.
    `errors`: one FieldError per bad key (config keys, or the options gpus, priority, timeout, dataset)."""


class NoSuchJobError(WorkerError):
    """No job with this id exists (or the id is malformed)."""


class InvalidJobStateError(WorkerError):
    """The operation does not apply to the job in its current state (e.g. delete while running)."""


class RedisUnavailableError(WorkerError):
    """Redis cannot be reached or refused the credentials."""


class InsecureRedisError(RedisUnavailableError):
    """A password-less Redis URL (no TLS client certificate either) off loopback, without REDIS_ALLOW_INSECURE=1."""


class EmbeddedRedisError(WorkerError):
    """The embedded Redis cannot start (port taken by something else, binary missing, ...)."""


class ArtifactError(WorkerError):
    """The artifact store cannot be read or written, or an artifact name is not one of the job's files."""


class JobFailed(WorkerError):
    """Raised by the RQ job function so RQ records the failure; our status hash holds the details."""


class NoSuchSweepError(WorkerError):
    """No sweep with this id exists (or the id is malformed)."""


class DatasetError(WorkerError):
    """A dataset registration or removal was refused (bad name, unreachable or empty source, no class folders, in use,
    ...); nothing was registered or removed. CLI exit 2."""


class NoSuchDatasetError(DatasetError):
    """No registered dataset (or version) has this name; the message lists what exists."""


class ModelError(WorkerError):
    """A model registry operation was refused (bad name, no such job, version or alias, job not exported, in use);
    nothing was changed. CLI exit 2."""


class NoSuchModelError(ModelError):
    """No registered model, version or alias has this name; the message lists what exists."""


class PermissionDeniedError(WorkerError):
    """The acting user's role (or ownership, or per-user limit) does not allow this; nothing was changed. CLI exit 3.
    The message names the user, the role and what would allow it."""


class UserError(WorkerError):
    """A user-management request was refused (bad name or role, no such user, unknown token); CLI exit 2."""
