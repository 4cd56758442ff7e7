"""Tensors out of PyTorch zip archives (`torch.save` files and TorchScript models), without torch.

Both archive kinds are a zip of `<name>/data.pkl` (a pickle) and `<name>/data/<key>` (one raw
little-endian storage per key). The pickle names its tensors through persistent ids
`('storage', <dtype>Storage, key, location, numel)` and rebuilds them with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`; a TorchScript model
pickles its modules as objects of `__torch__.*` classes whose state holds the parameters.

The unpickler here resolves only those names, to numpy: tensors, storages, parameters,
TorchScript module objects (as inert state holders), OrderedDict and the int/float/bool list
builders. Any other global in the pickle (`os.system`, `builtins.eval`, a class of some
package) is refused before anything is called, so a tampered file cannot run code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
SCRIPT_CLASS_PREFIX = "__torch__."


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names something other than tensors and containers."""


class ScriptModule:
    """A TorchScript module object: only its attributes (parameters, buffers, submodules,
    flags), none of its code."""

    class_name = ""

    def __setstate__(self, state: dict) -> None:
        self.attributes = dict(state)


def _script_class(class_name: str) -> type:
    # NEWOBJ creates the object without arguments; BUILD hands it its state.
    return type(class_name.rpartition(".")[2], (ScriptModule,), {"class_name": class_name})


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    if not size:  # a 0-d tensor
        return storage[offset:offset + 1].reshape(()).copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
    return data


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    **{("torch", name): np.dtype(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, read_storage, source: str):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        if module.startswith(SCRIPT_CLASS_PREFIX) or module == SCRIPT_CLASS_PREFIX[:-1]:
            return _script_class(f"{module}.{name}")
        raise RefusedGlobal(f"{self._source}: refused to unpickle {module}.{name}: only "
                            "tensors and containers are read from PyTorch files, and a file "
                            "naming anything else may run code when loaded")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], np.dtype)):
            raise RefusedGlobal(f"{self._source}: unexpected persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        return self._read_storage(str(key), dtype, int(numel))


def _archive_root(names: list[str], source: str) -> str:
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(f"{source}: not a PyTorch zip archive (expected one <name>/data.pkl, "
                         f"found {len(pickles)})")
    return pickles[0].split("/")[0]


def load(path: str | os.PathLike) -> Any:
    """The unpickled contents of a PyTorch zip archive, every tensor a numpy array and every
    TorchScript module a `ScriptModule`. Raises ValueError for a file that is not one and
    `RefusedGlobal` (an UnpicklingError) for a pickle naming anything else."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch zip archive (a legacy pickle needs torch)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = _archive_root(names, str(path))
        big_endian = f"{root}/byteorder" in names and \
            archive.read(f"{root}/byteorder").strip() == b"big"

        def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            raw = archive.read(f"{root}/data/{key}")
            array = np.frombuffer(raw, dtype, count=numel)
            return array.byteswap() if big_endian and dtype.itemsize > 1 else array

        return _TensorUnpickler(archive.read(f"{root}/data.pkl"), read_storage,
                                str(path)).load()


def script_state_dict(module: ScriptModule, prefix: str = "") -> dict[str, np.ndarray]:
    """A TorchScript module's tensors by dotted path, as `torch.jit.load(f).state_dict()`
    names them (parameters and buffers of every submodule)."""
    tensors = {}
    for name, value in module.attributes.items():
        if isinstance(value, np.ndarray):
            tensors[prefix + name] = value
        elif isinstance(value, ScriptModule):
            tensors.update(script_state_dict(value, f"{prefix}{name}."))
    return tensors


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a TorchScript model or of a `torch.save`d state dict (a Lightning-style
    `{"state_dict": ...}` unwrapped), as numpy arrays, without torch."""
    loaded = load(path)
    if isinstance(loaded, ScriptModule):
        return script_state_dict(loaded)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, np.ndarray)
                                               for v in loaded.values()):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    return dict(loaded)
