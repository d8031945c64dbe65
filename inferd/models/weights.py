"""Weights files: safetensors, or a torch state_dict read with ``weights_only=True``.

Neither path unpickles arbitrary objects: safetensors is a JSON header and
raw tensor bytes, and ``torch.load(weights_only=True)`` accepts only tensors
and plain containers. A file that is missing, truncated, of another format or
of the wrong shape is an :class:`~inferd.failures.UnrecoverableError`: the
worker reports it and stays down instead of restarting into the same failure.

Both formats carry string metadata (the model's dimensions). In a state_dict
file it is the ``metadata`` entry beside ``state_dict``; a bare state_dict has none.
"""

from __future__ import annotations

from pathlib import Path

import torch

from inferd.failures import UnrecoverableError

SAFETENSORS = (".safetensors",)
STATE_DICT = (".pt", ".pth", ".bin")


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the metadata of a weights file."""
    path = Path(path)
    if not path.is_file():
        raise UnrecoverableError(f"weights file {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in SAFETENSORS:
            return _read_safetensors(path)
        if suffix in STATE_DICT:
            return _read_state_dict(path)
    except UnrecoverableError:
        raise
    except Exception as exc:  # any parser's complaint about a bad file
        raise UnrecoverableError(f"weights file {path}: unreadable: {type(exc).__name__}: {exc}") from exc
    raise UnrecoverableError(f"weights file {path}: unknown format {suffix!r}; "
                             f"expected {', '.join(SAFETENSORS + STATE_DICT)}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        metadata = dict(fh.metadata() or {})
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    return tensors, metadata


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise UnrecoverableError(f"weights file {path}: expected a dict, found {type(data).__name__}")
    if "state_dict" in data:
        tensors, metadata = data["state_dict"], data.get("metadata") or {}
    else:
        tensors, metadata = data, {}
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise UnrecoverableError(f"weights file {path}: the state_dict must map names to tensors")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnrecoverableError(f"weights file {path}: metadata must map names to strings")
    return dict(tensors), dict(metadata)


def write(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and metadata in the format the file's suffix names."""
    path = Path(path)
    suffix = path.suffix.lower()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    if suffix in SAFETENSORS:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
    elif suffix in STATE_DICT:
        torch.save({"state_dict": tensors, "metadata": metadata}, path)
    else:
        raise ValueError(f"{path}: unknown weights format {suffix!r}; use one of "
                         f"{', '.join(SAFETENSORS + STATE_DICT)}")
