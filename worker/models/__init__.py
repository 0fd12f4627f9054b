"""The model registry (README "Models and deployments"): versions of a named model made from finished jobs, aliases,
and the references `NAME`, `NAME:VERSION`, `NAME@ALIAS` that serving and deployments resolve.

Modules: registry (the Redis records and the copied files).
"""
from __future__ import annotations

from worker.models.registry import (
    MODELS_PREFIX,
    ModelRef,
    ModelVersion,
    aliases,
    describe,
    list_models,
    model_versions,
    parse_ref,
    register,
    remove,
    remove_alias,
    resolve,
    set_alias,
    summary,
)

__all__ = ["MODELS_PREFIX", "ModelRef", "ModelVersion", "aliases", "describe", "list_models", "model_versions",
           "parse_ref", "register", "remove", "remove_alias", "resolve", "set_alias", "summary"]
