"""The ``ModelFamily`` record: everything the generic code needs to know about one kind of pretrained model.

A family module (``models/families/<name>.py``, not starting with ``_``) defines ``FAMILY = ModelFamily(...)``;
the registry (``models/families/__init__.py``) finds it. The generic code dispatches through the record:

- ``models/factory.build_model``: ``detect`` (before loading, from ``ModelRef``) then ``load``;
- ``arch/layers``: ``units`` (the skippable layers of a denoiser, in forward order);
- ``arch/skip``: ``skip`` (the replacement forward of one layer);
- ``arch/flops``: ``flops_inputs`` (one forward's inputs, or None: counted through the model's eps function);
- ``report/export`` and ``report/write``: ``export`` and ``pipeline_class`` (which snippet applies a schedule);
- ``preflight``: ``subfolder`` (where the denoiser sits in a pipeline folder) and ``flow``.

The registry, this module and a family's module import no torch, diffusers or NumPy (``tests/test_families.py``
checks it in a fresh interpreter): names, ``flow``, ``subfolder`` and detection cost nothing, so preflight reads
them first. A family's heavy callables (``load``, ``units``, ``skip``, ``flops_inputs``, ``open_folder``,
``snippet``) are ``lazy("module:name")`` references, or small functions that import their implementation inside
the body; its model classes live in a private module (``_dit_model.py``) that only those import.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from autodiff_opt.config import ModelConfig

Unit = tuple[str, str, str]
"""One skippable layer as a family lists it: (readable name, layer kind, submodule path)."""

ExportStyle = Literal["unet", "text_to_image", "pipeline"]
"""How ``report/export`` applies a schedule: a plain UNet loop (diffusers scheduler or flow Euler), Stable
Diffusion's pipeline, or the model's own diffusers pipeline (``pipeline_class``, VP or flow by ``flow``)."""


class ModelRef:
    """What detection reads before loading: the configured model settings and, read once when asked, the
    ``_class_name`` of the folder's (or the hub repo's) ``model_index.json``."""

    def __init__(self, model_cfg: ModelConfig | None = None, *, pretrained: str | None = None) -> None:
        """``model_cfg``: the ``model`` settings; or only ``pretrained`` (a folder or hub id)."""
        from autodiff_opt.models.sources import resolve_pretrained

        self.cfg = model_cfg
        self.pretrained = str(model_cfg.pretrained if pretrained is None else pretrained)
        self.root = resolve_pretrained(self.pretrained)
        self._index: dict[str, Any] | None = None

    def _read_index(self) -> dict[str, Any]:
        from autodiff_opt.models.sources import looks_like_path

        path = Path(self.root).expanduser() / "model_index.json"
        if not path.is_file() and not (Path(self.root).exists() or looks_like_path(self.root)):
            try:  # a hub id: its model_index.json, cached or downloaded (offline and uncached: none)
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(self.root, "model_index.json"))
            except Exception:  # not on the hub, offline and not cached: the loaders report it
                return {}
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def index(self) -> dict[str, Any]:
        """The pipeline's model_index.json ({} for a plain model folder, or when it cannot be read)."""
        if self._index is None:
            self._index = self._read_index()
        return self._index

    @property
    def pipeline_class(self) -> str | None:
        name = self.index.get("_class_name")
        return str(name) if name else None

    def setting(self, name: str) -> Any:
        """A ``model`` setting (None when absent or when only ``pretrained`` was given)."""
        if self.cfg is None:
            return None
        return getattr(self.cfg, name, None)


def has_index_class(pipeline_class: str) -> Callable[[Any], bool]:
    """A family's ``detect``: the folder's (or hub repo's) model_index.json names ``pipeline_class``."""
    return lambda ref: ref.pipeline_class == pipeline_class


@functools.lru_cache(maxsize=None)
def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    found = getattr(importlib.import_module(module), name)
    if not callable(found):
        raise TypeError(f"lazy({target!r}) names {type(found).__name__}, not a callable")
    return found  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Lazy:
    """A callable named by ``"package.module:name"``, imported on its first call (then kept): what a family's
    record holds for the parts that need torch or diffusers, so reading the record imports neither."""

    target: str

    def resolve(self) -> Callable[..., Any]:
        """The named callable (imports its module)."""
        return _resolve(self.target)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _resolve(self.target)(*args, **kwargs)


def lazy(target: str) -> Lazy:
    """``lazy("autodiff_opt.models.families._unet:unet_units")``: the function, imported when first called."""
    if target.count(":") != 1:
        raise ValueError(f"lazy({target!r}): name the callable as 'package.module:name'")
    return Lazy(target)


@dataclass(frozen=True)
class ModelFamily:
    """One kind of pretrained model, in one module (docs/architecture.md, "Adding a model family").

    name: the family's name (``DiffusionModel.kind`` where the model class has one).
    detect: True when the configured model (``ModelRef``) is this family's; families are asked in
        ``priority`` order (lower first), so a generic fallback (plain UNets) takes a high number.
    load: ``load(model_cfg, device, dtype, cache_dir) -> DiffusionModel``.
    denoiser_classes: diffusers class names of the denoiser (a subclass matches through its bases), so a
        bare network is recognised without its settings.
    units: ``units(denoiser, "blocks" | "sub_blocks") -> [(name, kind, path), ...]`` in forward order.
    skip: ``skip(module, kind) -> f(module, *args, **kwargs)`` replacing one layer's forward, or None when
        the module is not one of this family's layers.
    flops_inputs: keyword inputs of one forward at batch 1 (``denoiser(**inputs)``), or None: the cost is
        counted through the model's own eps function (what it wraps around the network included).
    flow: a rectified flow (True), VP noise prediction (False), or None: the scheduler config says.
    export: the snippet style (``ExportStyle``); ``pipeline_class`` names the diffusers pipeline.
    snippet: a family's own export, ``snippet(genome, source, solver, model, model_cfg, clip_x0) -> code``
        (None: the schedule runs through ``autodiff_opt.apply``); when set, it replaces the ``export`` style.
    subfolder: the denoiser's folder inside a pipeline folder.
    open_folder: for a ``pipeline`` family, ``open_folder(root, prompts, *, guidance_scale, decode_batch_size,
        device, dtype, name, image_size)`` loads the checked local pipeline folder (``pipelines.py``).
    transformer: its layers are transformer blocks (diffusers' block caches can hook them).
    """

    name: str
    summary: str
    detect: Callable[[ModelRef], bool]
    load: Callable[..., Any]
    denoiser_classes: tuple[str, ...]
    units: Callable[[Any, str], list[Unit]]
    skip: Callable[[Any, str | None], Callable[..., Any] | None]
    flops_inputs: Callable[[Any], dict[str, Any]] | None
    flow: bool | None
    export: ExportStyle
    pipeline_class: str | None = None
    subfolder: str = "unet"
    transformer: bool = False
    priority: int = 50
    open_folder: Callable[..., Any] | None = None
    snippet: Callable[..., str | None] | None = None

    def owns(self, module: Any) -> bool:
        """The denoiser is one of this family's classes (or a subclass of one)."""
        return any(cls.__name__ in self.denoiser_classes for cls in type(module).__mro__)
