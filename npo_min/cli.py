"""What every command line of the project shares: one-line errors, flag checks, output checks, resume files.

    if __name__ == "__main__":
        run(main)            # known errors -> "error: ..." on stderr, exit code 2; Ctrl-C -> exit code 130

Rules this module enforces (README "What is checked"):
  - bad input is one line `error: <problem>, <file>, <fix>` and exit code 2, never a traceback;
  - a flag that has no meaning for its value (NaN, Inf, a negative Huber c) or for the chosen model
    (digits --data) is refused before any work;
  - every file a command will write is checked before any work (`check_out`): existing files need
    --overwrite, the model folders in weights/ need --overwrite even for new files, and a folder's
    args.json written by another script is never replaced (it records that script's run).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint import CheckpointError, atomic_write, check_writable

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights"  # the shipped base models: written only with --overwrite
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
KNOWN_ERRORS = (CheckpointError, ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                NotADirectoryError)


class Interrupted(Exception):
    """Ctrl-C during work, after the command saved what it could; the message says how to go on."""


def run(main: Callable, argv: list[str] | None = None) -> None:
    """Call `main(argv)` and turn known errors into one line on stderr and an exit code.

    Exit codes: 0 success; 2 bad input (CheckpointError, ValueError, missing / existing / unwritable
    files, as argparse's own errors); 130 Ctrl-C (the message says how to resume, if anything was saved).
    Other exceptions are bugs and keep their traceback.
    """
    try:
        main(argv)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        print("interrupted: files already written are complete (atomic writes); nothing else was saved.", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except KNOWN_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None


def _one_line(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, OSError) and e.filename and not text.startswith(str(e.filename)) and str(e.filename) not in text:
        text = f"{e.filename}: {e.strerror or text}"
    return text.strip() or type(e).__name__


def check_finite_flags(args, names: Iterable[str]) -> None:
    """Refuse NaN / Inf in the named float flags of an argparse namespace (None = unset is fine).

    Raises ValueError: `--name must be a finite number (got nan)`.
    """
    for name in names:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number (got {value}).")


def check_range(args, name: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    """Refuse a flag outside [low, high] ((low, high] with low_open). Raises ValueError naming the flag and range."""
    value = getattr(args, name)
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        rng = f"{'(' if low_open else '['}{lo}, {hi}]"
        raise ValueError(f"--{name.replace('_', '-')} must be in {rng} (got {value:g}).")


def refuse_changed(args, defaults: dict, reason: str) -> None:
    """Refuse flags set away from their default because they do not apply (e.g. digits --data).

    defaults: {attribute: default value}; reason: why they do not apply, ending the message.
    Raises ValueError naming the flags.
    """
    changed = [f"--{k.replace('_', '-')}" for k, v in defaults.items() if getattr(args, k) != v]
    if changed:
        raise ValueError(f"{' / '.join(changed)} {'does' if len(changed) == 1 else 'do'} not apply: {reason}")


def check_out(paths: Iterable[str | os.PathLike], overwrite: bool, script: str) -> list[Path]:
    """Check every file a command will write, before any work. Returns them as Paths.

    - existing files need `overwrite` (checkpoint.check_writable), folders must be writable;
    - a file in a model folder of weights/ (one that holds files: the shipped models, downloaded checkpoints)
      needs `overwrite` even if it is new; a new folder under weights/ is fine;
    - an existing args.json written by another script is refused even with `overwrite`: it is the
      record of that script's run (e.g. sample.py --out <a training folder>).

    Raises FileExistsError / PermissionError with the fix.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        folder = _model_folder(path)
        if not overwrite and folder is not None:
            raise PermissionError(f"{path} is inside {folder}, a model folder of the shipped weights/ folder: choose "
                                  "another --out, or pass --overwrite to write there on purpose.")
        if path.name == "args.json" and path.is_file():
            other = _args_script(path)
            if other and other != script:
                raise FileExistsError(f"{path.parent} holds the record of a {other} run ({path.name}): {script} "
                                      "must not replace it. Choose another --out.")
        check_writable(path, overwrite)
    return paths


def _model_folder(path: Path) -> Path | None:
    """The folder of weights/ that `path` would write into, if it already holds files (a shipped model, or a
    downloaded checkpoint); None for a path outside weights/ or a new / empty folder there."""
    try:
        parts = path.resolve().relative_to(SHIPPED.resolve()).parts
    except ValueError:
        return None
    top = SHIPPED / parts[0] if len(parts) > 1 else SHIPPED
    return top if top.is_dir() and any(top.iterdir()) else None


def _args_script(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("script")
    except (OSError, ValueError, AttributeError):
        return None


def write_args(path: str | os.PathLike, args, script: str) -> None:
    """args.json: the command's flags and the script that wrote them (what check_out compares)."""
    record = {"script": script, **vars(args)}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, default=str)))


# ----------------------------------------------------------------------------- resumable training state


def save_resume(path: str | os.PathLike, state: dict) -> None:
    """Write a resume checkpoint atomically (torch.save of tensors, numbers, strings, lists and dicts).

    A kill during the write leaves the previous checkpoint intact and a `.resume.pt.*.tmp` file, which
    `load_resume` ignores and `clean_temp` removes.
    """
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume(path: str | os.PathLike) -> dict:
    """Read a resume checkpoint with `torch.load(weights_only=True)` (no code runs).

    Raises CheckpointError: missing, truncated or not a resume checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no resume checkpoint {path}: it is written every --save-every steps under --out. "
                              "Start without --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / foreign file: torch raises several types
        raise CheckpointError(f"{path} is not a readable resume checkpoint ({type(e).__name__}: {e}). "
                              "Delete it and start without --resume.") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a resume checkpoint of train.py. Start without --resume.")
    return state


def clean_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove leftover `.NAME.*.tmp` files of atomic_write (from a killed run) in `folder`; returns them."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
