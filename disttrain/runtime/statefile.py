"""State dicts on disk without pickle: a JSON skeleton plus the tensors in a safetensors file.

Everything disttrain itself puts into a checkpoint (loop counters and data position, the LR
schedule, the EMA of weights, later the hooks' state) goes through `save_state` /
`load_state`. Nothing read back can run code: JSON holds plain numbers, strings, lists and
dicts; safetensors holds raw tensors. Values of any other type are refused when saving.

    save_state(ckpt / "states" / "scheduler", scheduler.state_dict())
    scheduler.load_state_dict(load_state(ckpt / "states" / "scheduler"))

JSON cannot express tuples, non-string dict keys, non-finite floats or tensors, so those are
tagged (`{"__tuple__": [...]}`, `{"__items__": [[k, v], ...]}`, `{"__float__": "nan"}`,
`{"__tensor__": "t3"}`) and restored exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disttrain import files

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__")


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tag = "__tensor__" if torch.is_tensor(value) else "__ndarray__"
        tensor = value.detach().cpu() if torch.is_tensor(value) else torch.from_numpy(np.array(value))
        tensors[key] = tensor.contiguous().clone()  # safetensors refuses views that share storage
        return {tag: key}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in value.items()]}
    raise TypeError(f"cannot store {where or 'the state'} ({type(value).__name__}) without pickling it: state "
                    f"dicts saved by disttrain hold tensors, numbers, strings, lists and dicts only")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tensor__":
            return tensors[inner]
        if tag == "__ndarray__":
            return tensors[inner].numpy()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in inner)
        if tag == "__items__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
        if tag == "__float__":
            return float(inner)
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(stem: str | os.PathLike, state: Any) -> list[Path]:
    """Write `state` as `<stem>.json` (+ `<stem>.safetensors` when it holds tensors); the paths written."""
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "")
    written = [files.write_text(stem.with_suffix(".json"), json.dumps(skeleton))]
    if tensors:
        path = stem.with_suffix(".safetensors")
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        written.append(path)
    return written


def load_state(stem: str | os.PathLike) -> Any:
    """The state `save_state` wrote under `stem` (never unpickles)."""
    from safetensors.torch import load_file

    stem = Path(stem)
    skeleton = json.loads(stem.with_suffix(".json").read_text())
    tensor_file = stem.with_suffix(".safetensors")
    tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    return _decode(skeleton, tensors)
