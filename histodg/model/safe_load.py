"""The one way histodg reads a PyTorch file a user gives it: as data, never as code.

    payload = read_torch_file(path, CheckpointError)

A `.pt` file is a pickle, and a pickle can name any Python callable to run while it loads: a
crafted `best.pt` passed from lab to lab would run code as the user. Every user-supplied file
(`predict` / `evaluate` / `adapt` checkpoints, `train --resume`'s `last.pt`, `train
--encoder-weights FILE`) is read with `torch.load(weights_only=True)`, which builds tensors,
numbers, strings, lists, tuples and dicts and refuses every other global; a file that names one
is refused in one line that says which. histodg writes only those types (`plain_data`), so its own
checkpoints need nothing else. Checkpoints written before that held numpy scalars and one numpy
array (the RNG state of `last.pt`): numpy's array and scalar constructors, which build values and
call nothing, are allowed so those files keep loading. weights_only is only sound from torch 2.6
on (CVE-2025-32434), which pyproject.toml requires.
"""
from __future__ import annotations

import pickle
import re

import numpy as np
import torch

from .. import HistodgError, exc_line


def _numpy_values() -> list:
    """The numpy globals a checkpoint of histodg before 0.2 may name: array and scalar
    reconstruction and their dtypes (values only; no callable that acts), under numpy 2's names
    and numpy 1's (`numpy.core`), since a file keeps the names of the numpy that wrote it."""
    core = getattr(np, "_core", None) or np.core
    rebuild, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float32, np.float64, np.bool_)]
    spelled = [(f, f"{mod}.multiarray.{name}") for f, name in ((rebuild, "_reconstruct"), (scalar, "scalar"))
               for mod in ("numpy.core", "numpy._core")]
    return [np.ndarray, np.dtype, *dtypes, *spelled]


_ALLOWED = False


def _allow_numpy_values() -> None:
    """Put numpy's value constructors on torch's allowlist, once per process (`safe_globals` as a
    context would change the process-wide list for the time of each load, racing other threads)."""
    global _ALLOWED
    if not _ALLOWED:
        torch.serialization.add_safe_globals(_numpy_values())
        _ALLOWED = True


def read_torch_file(path, error: type[HistodgError] = HistodgError, what: str = "PyTorch file"):
    """`torch.load(path)` as data (CPU tensors); `error(path, reason)` for a file that is not a
    readable `what` or that would run code."""
    _allow_numpy_values()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise error(path, f"refused: the file names Python code or objects ({found.group(1)}), not only tensors and "
                              f"plain data; a model file from elsewhere could run code when loaded, so histodg reads "
                              f"data only (if you trust its source, save its tensors alone: torch.save(state_dict, "
                              f"'weights.pt'))") from None
        why = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # e.g. "Unsupported operand 110": not a pickle of data
        raise error(path, f"not a readable {what} ({why.group(1)[:120] if why else exc_line(exc, 120)})") from None
    except Exception as exc:
        raise error(path, f"not a readable {what} ({exc_line(exc, 120)})") from None


def plain_data(value):
    """`value` with every numpy array and scalar made plain (lists, ints, floats, bools) and every
    tensor detached onto the CPU, so that `read_torch_file` reads it back on any machine."""
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_data(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, torch.Tensor):  # a model's state as it is on a GPU: saved on the CPU, without its graph
        return value.detach().cpu()
    return value
