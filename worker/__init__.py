"""Managed training jobs: Redis, RQ queues, submission, the worker process, the torchrun launcher, streaming and the
artifact store. Dashboard-facing functions are in `worker.api`; the Redis key layout is in docs/redis.md.

Importing the package is cheap (no Redis, RQ or torch): `python -m worker.guard` relies on it.
"""
