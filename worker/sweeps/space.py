"""A sweep's search space: the SPACE.yaml file (or the dashboard's form) → typed parameters → Optuna distributions.

    optim.lr:          {float: [1.0e-4, 1.0e-1], log: true}
    model.dropout:     {float: [0.0, 0.5], step: 0.1}
    train.epochs:      {int: [2, 4]}
    train.batch_size:  {choice: [32, 64, 128]}

Keys are dotted config keys (core/config.py). Every bound and every choice is checked up front with the same
validation a job gets at submission (`worker.submit.validate_config` and the batch-size rule), so a value the sampler
picks later can never be refused: a range is checked at both ends (the schema's limits are intervals), and the ends
and choices of all parameters are checked together (every combination, when there are at most
MAX_COMBINATIONS; else each value on its own against the base config).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

from core.config import load_yaml, set_dotted
from core.errors import ConfigError
from worker.errors import SubmissionError

KINDS = ("float", "int", "choice")
"""What a parameter is: a float range, an integer range, or a list of choices."""

MAX_COMBINATIONS = 512
"""Up to this many combinations of range ends and choices are validated together (cross-field rules included)."""

Scalar = bool | int | float | str | None


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config key."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Scalar, ...] = ()

    def values_to_check(self) -> list[Scalar]:
        """The values whose validity implies every sampled value's: both ends of a range, every choice."""
        if self.kind == "choice":
            return list(self.choices)
        return [self.low, self.high] if self.low != self.high else [self.low]

    def grid(self) -> list[Scalar] | None:
        """Every value a grid search visits, or None when the range is continuous (a float without `step`)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            return None
        n = int(math.floor((float(self.high) - float(self.low)) / float(self.step) + 1e-9))
        return [round(float(self.low) + i * float(self.step), 12) for i in range(n + 1)]

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def to_dict(self) -> dict[str, Any]:
        """The space-file form of this parameter (what the sweep's record keeps)."""
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        out: dict[str, Any] = {self.kind: [self.low, self.high]}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


def _number(key: str, kind: str, value: Any) -> float | int:
    if isinstance(value, str):  # YAML reads `1e-4` (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SubmissionError(f"space: {key}: bounds of {kind!r} must be numbers, got {value!r}")
    if kind == "int":
        if float(value) != int(value):
            raise SubmissionError(f"space: {key}: bounds of 'int' must be whole numbers, got {value!r}")
        return int(value)
    return float(value)


def parse_param(key: Any, spec: Any) -> Param:
    """One `key: {float|int: [low, high], log, step} | {choice: [...]}` entry; SubmissionError naming the key."""
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise SubmissionError(f"space: {key!r} is not a dotted config key (e.g. optim.lr)")
    if not isinstance(spec, dict):
        raise SubmissionError(f"space: {key}: expected a mapping such as {{float: [low, high]}}, got {spec!r}")
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise SubmissionError(f"space: {key}: give exactly one of {', '.join(KINDS)}, got {sorted(map(str, spec))}")
    kind = kinds[0]
    allowed = {"choice"} if kind == "choice" else {kind, "log", "step"}
    extra = sorted(str(k) for k in spec if k not in allowed)
    if extra:
        raise SubmissionError(f"space: {key}: unknown option(s) {', '.join(extra)}; {kind} takes "
                              f"{', '.join(sorted(allowed))}")
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise SubmissionError(f"space: {key}: choice must be a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise SubmissionError(f"space: {key}: choices must be plain values (number, text, true/false), "
                                      f"got {c!r}")
        if len({repr(c) for c in choices}) != len(choices):
            raise SubmissionError(f"space: {key}: choices repeat a value: {choices!r}")
        return Param(key, kind, choices=tuple(choices))
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise SubmissionError(f"space: {key}: {kind} must be [low, high], got {bounds!r}")
    low, high = (_number(key, kind, b) for b in bounds)
    if low > high:
        raise SubmissionError(f"space: {key}: low > high ({low!r} > {high!r})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SubmissionError(f"space: {key}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise SubmissionError(f"space: {key}: a log range needs low > 0, got {low!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(key, kind, step)
        if step <= 0:
            raise SubmissionError(f"space: {key}: step must be > 0, got {step!r}")
        if log and kind == "float":
            raise SubmissionError(f"space: {key}: a float range takes either log or step, not both")
        if log and kind == "int" and step != 1:
            raise SubmissionError(f"space: {key}: a log int range needs step 1, got {step!r}")
    return Param(key, kind, low, high, log, step)


def parse_space(raw: Any) -> list[Param]:
    """The parameters of a space mapping (the YAML file's content), in file order."""
    if not isinstance(raw, dict) or not raw:
        raise SubmissionError("space: expected a mapping of dotted config keys to {float|int: [low, high]} or "
                              "{choice: [...]}, got " + ("nothing" if not raw else type(raw).__name__))
    params = [parse_param(k, v) for k, v in raw.items()]
    keys = [p.key for p in params]
    for a in keys:
        for b in keys:
            if a != b and b.startswith(a + "."):
                raise SubmissionError(f"space: {a} and {b} overlap (one is inside the other)")
    return params


def load_space(path: str | Path) -> list[Param]:
    """Parse SPACE.yaml; SubmissionError when it is missing or malformed."""
    try:
        raw = load_yaml(path, what="space file")
    except ConfigError as err:
        raise SubmissionError(str(err)) from None
    return parse_space(raw)


def space_to_dict(params: list[Param]) -> dict[str, Any]:
    return {p.key: p.to_dict() for p in params}


def apply_params(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict with the dotted keys set to the sampled values (values as values: no text)."""
    out = copy.deepcopy(config)
    for key, value in values.items():
        try:
            set_dotted(out, key, value)
        except ValueError as err:
            raise SubmissionError(f"space: {key}: {err} of the config") from None
    return out


def validate_space(params: list[Param], base: dict[str, Any], check: Any) -> None:
    """Run `check(config_dict)` (the submission's validation) on the base config with the values of
    `values_to_check()` set: every combination when few enough, else each parameter's values on their own.
    `check` raises SubmissionError; the message is prefixed with the values that were set."""
    per_param = [[(p.key, v) for v in p.values_to_check()] for p in params]
    combos = math.prod(len(v) for v in per_param)
    if combos <= MAX_COMBINATIONS:
        candidates = (dict(c) for c in itertools.product(*per_param))
    else:
        candidates = ({k: v} for values in per_param for k, v in values)
    for values in candidates:
        try:
            check(apply_params(base, values))
        except SubmissionError as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise SubmissionError(f"space: with {shown}: {err}") from None


def grid_size(params: list[Param]) -> int | None:
    """How many points a grid search has, or None when a parameter is continuous."""
    grids = [p.grid() for p in params]
    if any(g is None for g in grids):
        return None
    return math.prod(len(g) for g in grids)  # type: ignore[arg-type]
