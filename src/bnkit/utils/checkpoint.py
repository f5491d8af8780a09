"""Read checkpoints safely: torch files with ``weights_only=True``, safetensors files by hand.

Nothing here unpickles code: ``torch.load(..., weights_only=True)`` accepts only tensors,
containers and plain values, and a safetensors file is a JSON header followed by raw
little-endian tensor bytes (https://github.com/huggingface/safetensors#format), read here
without the ``safetensors`` package (a test uses that package as the oracle).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["extract_state_dict", "load_checkpoint", "read_safetensors"]

# safetensors dtype codes -> torch dtypes (those this torch has).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        _ST_DTYPES[_code] = getattr(torch, _name)

# Where training code usually puts the state_dict inside a checkpoint dict, in order of preference.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema", "model_ema",
                   "state_dict_ema", "ema_state_dict", "weights", "params")

_MAX_HEADER = 100 * 1024 * 1024


def _not_safetensors(path: Path, why: str) -> ValueError:
    return ValueError(f"not a checkpoint bnkit can read: {path} looks like safetensors but {why}")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, as CPU tensors (``__metadata__`` is ignored)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise _not_safetensors(path, "it is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise _not_safetensors(path, f"its header length {n} exceeds the file")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _not_safetensors(path, f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _not_safetensors(path, f"the entry {name!r} is malformed ({exc!r})") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(body) or end - begin != numel * itemsize:
            raise _not_safetensors(path, f"the entry {name!r} has offsets {begin}..{end} that do not fit")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype)
        if sys.byteorder == "big" and itemsize > 1:
            t = t.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1).view(dtype)
        out[name] = t.reshape(shape)
    return out


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a torch checkpoint (``weights_only=True``) or a safetensors file from ``path``.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` ("not a checkpoint
    ...") for anything that is not a file either format can read safely.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise ValueError(f"not a checkpoint: {path} is not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a checkpoint bnkit can read safely (weights_only=True refused it): {path}: "
                         f"{first}") from None
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, ... for non-checkpoints
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a checkpoint: {path}: {first}") from None


def _is_state_dict(obj: Any, strict: bool = True) -> bool:
    # strict: every value is a tensor (what module.state_dict() returns); else: some are.
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    test = all if strict else any
    return test(isinstance(v, Tensor) for v in obj.values())


def extract_state_dict(obj: Any, where: str = "object") -> dict[str, Tensor]:
    """The state_dict inside ``obj``: a module, a state_dict, or a dict holding one under a common key.

    A dict whose values are all tensors is the state_dict; otherwise the first of
    :data:`STATE_DICT_KEYS` that holds a module or a state_dict is used; otherwise the
    tensor entries of the dict itself, if any. Raises ``ValueError`` ("not a checkpoint
    ...") when there is no state_dict to find.
    """
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_state_dict(inner, strict=False):
                return extract_state_dict(inner, f"{where}[{key!r}]")
        if _is_state_dict(obj, strict=False):
            return {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise ValueError(f"not a checkpoint with a state_dict: {where} has no tensors at the top level and "
                         f"none under {', '.join(repr(k) for k in STATE_DICT_KEYS[:4])}, ... (its keys: {keys})")
    raise ValueError(f"not a checkpoint: {where} is a {type(obj).__name__}, not a state_dict or a dict holding one")
