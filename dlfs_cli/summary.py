"""summary.json: what a run folder says about itself, in one typed definition.

Written by the run (tracking.RunFolder, as train() and the Trainer go) and by a sweep for a job that never
trained (sweep.job_failed); read by `dlfs runs`, a sweep's summary.csv, `dlfs reproduce` and resume.
A field is written once it has been set, in the order it was first set (None: not recorded). Keys this
version does not know (a newer dlfs's, a user's) are kept as read and written back.

No torch here: `dlfs runs` reads hundreds of these.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Summary:
    """The fields of summary.json; every one may be absent (None)."""

    # completed | running | diverged | interrupted | failed | skipped (a sweep's job not started);
    # `dlfs runs` also shows killed (running, but no process holds the folder), unknown and unreadable
    status: str | None = None
    model: str | None = None  # model.name
    data: str | None = None  # data.name
    epochs: int | None = None  # trainer.epochs: the epochs asked for
    seed: int | None = None
    device: str | None = None  # the device it trained on, resolved (cpu, cuda:0, mps)
    deterministic: bool | None = None  # trainer.deterministic
    tf32: bool | None = None  # trainer.tf32: TensorFloat-32 matmuls on a GPU
    world_size: int | None = None  # processes that trained it (torchrun's ranks; 1 alone)
    threads: int | None = None  # torch's CPU threads (rank 0's)
    versions: dict[str, str | None] | None = None  # python, torch, dlfs, git (None outside a checkout)
    # the final metrics: val_* of the latest validation, test_* of the test split after the last epoch
    # (val_loss, val_accuracy, test_loss, test_accuracy, ...); a run with data.val_fraction=0 has test_* only
    metrics: dict[str, float] | None = None
    epochs_completed: int | None = None  # as far as last.pt goes
    started_at: str | None = None  # local time, %Y-%m-%dT%H:%M:%S%z, when the run first started
    duration_s: float | None = None  # seconds spent by every process that trained it, resumes included
    parameters: int | None = None  # the model's parameter count
    step: int | None = None  # optimizer steps, as far as last.pt goes
    from_run: str | None = None  # dlfs train from=PATH: the run whose config this one started from
    best: dict[str, Any] | None = None  # best.pt: epoch, step and val_loss of the lowest validation loss
    stopped_early: dict[str, Any] | None = None  # early stopping ended the run: epoch, best_epoch, reason
    figures: list[str] | None = None  # the figures drawn, relative to the run folder
    figures_error: str | None = None  # why the figures could not be drawn (the run stays completed)
    error: str | None = None  # why the run did not complete, on one line
    # keys this version does not know, as read; and the order the keys were first set in
    unknown: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _order: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def update(self, **fields: Any) -> Summary:
        """Set fields by name (returns self); a name that is not a field of summary.json is a TypeError."""
        for name, value in fields.items():
            if name not in FIELDS:
                raise TypeError(f"summary.json has no field {name!r} (its fields: {', '.join(FIELDS)})")
            setattr(self, name, value)
            if name not in self._order:
                self._order.append(name)
        return self

    def drop(self, *names: str) -> None:
        """Forget fields: they are no longer written."""
        for name in names:
            setattr(self, name, None)
            if name in self._order:
                self._order.remove(name)

    def to_dict(self) -> dict[str, Any]:
        """The fields set (in the order set, then any others assigned directly), with the unknown keys."""
        out = {k: self.unknown[k] if k in self.unknown else getattr(self, k) for k in self._order}
        out |= {k: getattr(self, k) for k in FIELDS if k not in out and getattr(self, k) is not None}
        return out | {k: v for k, v in self.unknown.items() if k not in out}

    @classmethod
    def from_dict(cls, data: Any) -> Summary:
        """A summary.json's content; ValueError when it is not an object or a field has the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        summary = cls()
        for key, value in data.items():
            if key in FIELDS:
                if not _fits(value, _TYPES[key]):
                    raise ValueError(f"{key} is {json.dumps(value)[:60]}, not {_TYPES[key]}")
                setattr(summary, key, value)
            else:
                summary.unknown[key] = value
            summary._order.append(key)
        return summary

    @classmethod
    def load(cls, path: Path) -> Summary:
        """Read summary.json: OSError when it cannot be read, ValueError when it is not a summary."""
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        """Written atomically: a reader never sees half of it."""
        from dlfs_cli.tracking import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


FIELDS = tuple(f.name for f in dataclasses.fields(Summary) if f.name not in ("unknown", "_order"))
_TYPES = {name: typing.get_type_hints(Summary)[name] for name in FIELDS}


def _fits(value: Any, annotation: Any) -> bool:
    """isinstance for the annotations above (a JSON number may be written without a fraction; a bool is no number)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in args)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values())
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    return isinstance(value, annotation)
