"""MIL state ops (iOS 18) in numpy: ``read_state``, ``write_state`` and ``slice_update``.

A saved program never holds coremltools' ``coreml_update_state``: on save it is written as
``write_state(input=state, data=value)`` followed by ``read_state(input=state)`` (when its result
is used), and that is what runs here. A state argument is a :class:`StateBuffer`, the slot of one
state in the caller's :class:`targets.coreml.executor.ExecutorState` (Core ML's ``MLState``):
``write_state`` replaces its array, ``read_state`` returns it. Ops never modify an array in place
(``slice_update`` returns a new one), so a value read earlier keeps the content it was read with.
"""

from __future__ import annotations

import numpy as np

from targets.coreml.executor.ops_tensor import _slice_by_index


class StateBuffer:
    """One state's current value (held like any other value of its dtype: see ExecutorState)."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: np.ndarray):
        self.name, self.value = name, value


def _read_state(input):
    return input.value


def _write_state(input, data):
    data = np.asarray(data)
    if data.shape != input.value.shape:
        raise ValueError(f"state {input.name!r} has shape {input.value.shape}, the program writes {data.shape}")
    input.value = data.astype(input.value.dtype, copy=False)


def _coreml_update_state(state, value):
    """coremltools' in-memory form (``write_state`` then ``read_state``), should a program hold it."""
    _write_state(state, value)
    return state.value


def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """``x`` with ``x[slices] = update`` (slices as iOS 15 ``slice_by_index`` reads them), as a new array."""
    x = np.asarray(x)
    out = x.copy()
    view = _slice_by_index(out, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    update = np.asarray(update)
    if view.size != update.size:
        raise ValueError(f"update of shape {update.shape} for a slice of shape {view.shape}")
    # a basic-indexing view: writing through it writes into ``out``
    view[...] = update.reshape(view.shape)
    return out


OPS = {"read_state": _read_state, "write_state": _write_state, "coreml_update_state": _coreml_update_state,
       "slice_update": _slice_update}
