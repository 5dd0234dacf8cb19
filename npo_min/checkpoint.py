"""Checkpoint files: read, strict-load, fingerprint and write state dicts safely.

Every model file in npo_min names its modules after one official layout, so loading is
`load_into(model, state_dict)` after at most one small key map. Weights are read through
safetensors; a pickled `.ckpt`/`.pt`/`.bin` only through `torch.load(weights_only=True)`,
which refuses arbitrary Python objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# File names the diffusers / transformers folder layouts use, in order of preference.
FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
FOLDER_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def load_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """Read a state dict from a `.safetensors` file, a pickled checkpoint, or a diffusers folder.

    Args:
        path: a `.safetensors` file; a `.ckpt`/`.pt`/`.pth`/`.bin` file (read with
            `torch.load(weights_only=True)`, a `state_dict` entry is unwrapped); or a folder
            holding `diffusion_pytorch_model.safetensors` / `model.safetensors`, possibly sharded
            with an `*.index.json` (the diffusers / transformers layout).
        prefix: keep only keys starting with this prefix, with the prefix removed
            (e.g. `"model.diffusion_model."` for the UNet of an SD single-file checkpoint).

    Raises:
        CheckpointError: the path does not exist, has an unknown suffix, cannot be read (empty, truncated,
            not the format its suffix says), nothing matches prefix, or a tensor holds NaN / Inf.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Check the path (big checkpoints go under weights/).")
    if path.is_dir():
        sd = _load_folder(path, prefix)
    elif path.suffix == ".safetensors":
        sd = _load_safetensors(path, prefix)
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, foreign pickle, a refused global: torch raises several types
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {_first_line(e)}). "
                                  "Re-download or re-save it.") from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} does not hold a state dict (found {type(sd).__name__}).")
    else:
        raise CheckpointError(
            f"unknown checkpoint format {path.suffix!r} for {path}: expected .safetensors, a folder, "
            f"or one of {PICKLE_SUFFIXES}."
        )
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"no keys start with {prefix!r} in {path}: is this the right checkpoint?")
    check_finite(sd, path)
    return sd


def check_finite(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Finite or refuse: raise CheckpointError naming `source` and the first key holding NaN / Inf."""
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{source}: tensor {k!r} holds {n} NaN / Inf values; a diverged or corrupt "
                                  "checkpoint is never used. Re-train or re-download it.")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _safe_open(path: Path):
    """safe_open with a readable CheckpointError for missing / empty / truncated / non-safetensors files."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Check the path.")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError for a bad header
        raise CheckpointError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {_first_line(e)}): "
                              "empty, truncated or another format. Re-download or re-save it.") from None


def _load_safetensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    # Only the tensors under `prefix` are read: the UNet of a 4 GB single file costs its own size.
    with _safe_open(path) as f:
        try:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except Exception as e:  # a header that promises more bytes than the file holds
            raise CheckpointError(f"{path}: tensor data cannot be read ({type(e).__name__}: {_first_line(e)}): "
                                  "the file is truncated or corrupt. Re-download or re-save it.") from None


def _load_folder(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    for name in FOLDER_INDEXES:
        index = path / name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_load_safetensors(path / shard, prefix))
            return sd
    for name in FOLDER_FILES:
        if (path / name).exists():
            return _load_safetensors(path / name, prefix)
    raise CheckpointError(
        f"{path} is a folder without {' / '.join(FOLDER_FILES)} (or a sharded index): "
        "pass the model's own subfolder, e.g. .../unet"
    )


def checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a checkpoint file; a .safetensors header is read without the tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with _safe_open(path) as f:
            return list(f.keys())
    return list(load_state_dict(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a `.safetensors` header ({} if none)."""
    with _safe_open(Path(path)) as f:
        return dict(f.metadata() or {})


def check_keys(
    expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor], what: str
) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or wrong:
        def block(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    {shown}{more}"

        raise CheckpointError(
            f"checkpoint does not fit {what}:"
            + block("missing keys", missing)
            + block("unexpected keys", unexpected)
            + block("shape mismatches", wrong)
            + "\n  Is this checkpoint for this architecture and --model preset?"
        )


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str = "") -> None:
    """Strictly load `state_dict` into `module`, casting to the module's dtypes.

    Raises:
        CheckpointError: with a readable list of missing / unexpected keys and wrong shapes.
    """
    what = what or type(module).__name__
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_keys(expected, state_dict, what)
    module.load_state_dict(state_dict, strict=True, assign=False)


def build_loaded(
    cls, cfg, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, what: str = ""
) -> torch.nn.Module:
    """`cls(cfg)` built without random init (meta device), strictly loaded with `state_dict`, in
    `dtype`, eval mode. The module must have no non-persistent buffers (the checkpoint would not
    fill them).

    Raises:
        CheckpointError: as `load_into`.
    """
    with torch.device("meta"):
        model = cls(cfg)
    unfilled = sorted(set(dict(model.named_buffers())) - set(model.state_dict()))
    if unfilled:
        raise TypeError(f"{cls.__name__} has non-persistent buffers {unfilled}: build it normally, not on meta.")
    model = model.to_empty(device="cpu").to(dtype)  # uninitialised storage; every tensor is overwritten below
    load_into(model, state_dict, what or cls.__name__)
    return model.eval()


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of names, shapes and float32 values: identifies a base model for a delta."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early, before any work, if `path` exists (and overwrite is off) or cannot be written.

    Raises:
        FileExistsError: the file exists and `overwrite` is False (pass --overwrite to replace it).
        PermissionError: the parent folder cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another --out or pass --overwrite to replace it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the folder for {path}: {e}. Choose a writable --out.") from e
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"folder {path.parent} is not writable: choose a writable --out.")
    return path


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` then rename onto `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write tensors (contiguous, CPU) to a `.safetensors` file atomically, refusing to overwrite.

    Raises:
        FileExistsError / PermissionError: as check_writable. CheckpointError: a tensor holds NaN / Inf
            (nothing is written: a diverged model is never saved as valid).
    """
    path = check_writable(path, overwrite)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    check_finite(tensors, path)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path
