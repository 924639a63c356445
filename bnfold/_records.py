"""Shared helpers for the frozen, JSON-serialisable records every stage returns."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any


def to_jsonable(value: Any) -> Any:
    """Convert records, enums, tuples and floats into plain JSON values (NaN/inf become strings)."""
    if isinstance(value, Record):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _fields(value: Any) -> dict[str, Any]:
    return {
        field.name: to_jsonable(getattr(value, field.name))
        for field in dataclasses.fields(value)
        if field.metadata.get("json", True)
    }


class Record:
    """Mixin for frozen dataclasses: ``to_dict()`` and ``to_json()``."""

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def not_serialised() -> Any:
    """Field metadata marking a field (e.g. the model itself) as left out of JSON."""
    return {"json": False}
