"""Prompt files: .txt (one prompt a line), .jsonl ("prompt" or "caption" field), .csv (same columns).

Shared by `sample.py --model sd15` (prompt i -> image i) and `eval.t2i.score` (image i <- prompt i).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

PROMPT_FIELDS = ("prompt", "caption")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt (one a line), .jsonl ("prompt" / "caption" field) or .csv ("prompt" / "caption" column).

    Raises:
        FileNotFoundError: no such file. ValueError: unknown suffix, a record without the field, empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        prompts = text.splitlines()
        while prompts and not prompts[-1].strip():
            prompts.pop()
    elif path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                prompts.append(_prompt_field(json.loads(line), f"{path}:{n}"))
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        prompts = [_prompt_field(row, f"{path}:{n}") for n, row in enumerate(reader, 2)]
    else:
        raise ValueError(f"unknown prompt file type {path.suffix!r} ({path}): use .txt, .jsonl or .csv.")
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def _prompt_field(record: dict, where: str) -> str:
    for field in PROMPT_FIELDS:
        if isinstance(record, dict) and record.get(field) is not None:
            return str(record[field])
    raise ValueError(f"{where}: no 'prompt' or 'caption' field.")
