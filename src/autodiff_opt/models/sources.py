"""Where a configured model comes from, read without loading it: an embedded asset (``builtin:NAME``), a local
path or a hub id, and what a local pipeline folder's ``model_index.json`` says.

Imports no torch, diffusers or NumPy: the model-family registry (``models/families``) detects a model's
family from these before anything heavy is imported; the loaders (``models/loading.py``, ``latent.py``) use them too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from autodiff_opt.core.errors import ModelLoadError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_PREFIX = "builtin:"


def resolve_pretrained(pretrained: str) -> str:
    """'builtin:NAME' -> the embedded asset folder; '~' expanded; anything else returned as is."""
    if pretrained.startswith(BUILTIN_PREFIX):
        name = pretrained[len(BUILTIN_PREFIX) :]
        path = ASSETS_DIR / name
        if not path.is_dir():
            known = sorted(p.name for p in ASSETS_DIR.iterdir() if p.is_dir()) if ASSETS_DIR.is_dir() else []
            raise ModelLoadError(f"no embedded model {name!r}: known ones are {known}")
        return str(path)
    return os.path.expanduser(pretrained)


def looks_like_path(ref: str) -> bool:
    """Hub ids look like 'org/name'; anything else (absolute, relative, a file name) is a local path."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") != 1 or ref.endswith((".pt", ".pth", ".ckpt", ".safetensors"))


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def is_text_to_image_pipeline(path: str | Path) -> bool:
    """A local pipeline folder whose model_index.json names a text encoder and a VAE."""
    index = Path(path).expanduser() / "model_index.json"
    if not index.is_file():
        return False
    components = read_json(index)
    return bool(components.get("text_encoder", [None])[0]) and bool(components.get("vae", [None])[0])
