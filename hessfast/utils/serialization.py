"""Plain-JSON conversion shared by every result type and the harness.

One convention everywhere: a non-finite float (NaN, +-Inf) is written as JSON ``null`` (JSON has
no NaN); readers turn ``None`` back into NaN. Tensors and numpy values become lists and plain
numbers; anything else that JSON cannot hold is written as its ``str``.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON types (dict keys as strings, non-finite floats as None)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, int):
        return x
    return str(x)



class JSONFile:
    """``save(path)`` / ``load(path)`` for a result type with ``to_dict()`` and, to be read back, ``from_dict``.

    The file is the JSON of :func:`jsonable` ``(self.to_dict())``: plain data that needs no pickle to read.
    """

    def save(self, path) -> None:
        """Write ``to_dict()`` as JSON (non-finite floats as null)."""
        with open(path, "w") as f:
            json.dump(jsonable(self.to_dict()), f, indent=1)

    @classmethod
    def load(cls, path):
        """Read a file written by :meth:`save` (``from_dict`` checks its format)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))
