"""Small registries that entries join by declaring themselves: heads, runtimes, explanation methods, dataset
layouts, backbone families. Adding one is one new entry (a decorated class or function) — the CLI choices, the
card and the factories read these tables.

This module imports neither torch nor timm: built-in entries live in the modules named by each registry's
``builtins`` and are imported on first lookup, so ``mpoxscope --help`` stays fast. A registry is also an
argparse ``choices`` container (give the option a ``metavar``, and list the names with ``%(choices)s``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mpoxscope.errors import MpoxscopeError

E = TypeVar("E")


class Registry(Generic[E]):
    """Name -> entry, in registration order (built-ins first)."""

    def __init__(self, kind: str, flag: str, builtins: tuple[str, ...] = ()) -> None:
        self.kind, self.flag, self.builtins = kind, flag, builtins
        self._entries: dict[str, E] = {}
        self._aliases: dict[str, str] = {}
        self._loaded = False

    def load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before importing: the modules register into this very registry
            for module in self.builtins:
                importlib.import_module(module)

    def add(self, name: str, entry: E, aliases: tuple[str, ...] = ()) -> E:
        """Register ``entry`` under ``name`` (lower case); a second entry of the same name replaces the first
        (a test or a plugin may override a built-in on purpose)."""
        key = name.strip().lower()
        self._entries[key] = entry
        for alias in aliases:
            self._aliases[alias.strip().lower()] = key
        return entry

    def remove(self, name: str) -> None:
        self._entries.pop(name.strip().lower(), None)

    def canonical(self, name: str) -> str | None:
        self.load()
        key = str(name).strip().lower()
        key = self._aliases.get(key, key)
        return key if key in self._entries else None

    def get(self, name: str) -> E:
        """The entry called ``name`` (case-insensitive, aliases accepted); one-line error naming the flag."""
        key = self.canonical(name)
        if key is None:
            raise MpoxscopeError(f"{self.flag}: unknown {self.kind} {name!r}; choose one of {', '.join(self)}")
        return self._entries[key]

    def names(self, where: Callable[[E], bool] | None = None) -> list[str]:
        self.load()
        return [n for n, e in self._entries.items() if where is None or where(e)]

    def items(self) -> list[tuple[str, E]]:
        self.load()
        return list(self._entries.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.canonical(name) is not None

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> E:
        return self.get(name)


class Choices:
    """argparse ``choices`` of a filtered registry, read when the option is parsed or its help is printed."""

    def __init__(self, registry: Registry, where: Callable[[Any], bool] | None = None) -> None:
        self.registry, self.where = registry, where

    def __iter__(self) -> Iterator[str]:
        return iter(self.registry.names(self.where))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self.registry.names(self.where)


class ListedHelp:
    """argparse help text whose ``{names}`` is filled from a registry only when the help is printed (for an
    option that takes several names, so cannot use ``choices``)."""

    def __init__(self, template: str, registry: Registry, where: Callable[[Any], bool] | None = None) -> None:
        self.template, self.registry, self.where = template, registry, where

    def __str__(self) -> str:
        return self.template.replace("{names}", ", ".join(self.registry.names(self.where)))

    def strip(self) -> str:
        return str(self).strip()

    def __mod__(self, params: Any) -> str:
        return str(self) % params


# ----- heads ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSpec:
    """A classification head: ``cls(in_channels, num_classes, **options)`` where ``options`` are the
    :class:`~mpoxscope.config.ModelConfig` fields (and ``grid_size``) its constructor names."""

    name: str
    cls: type
    summary: str
    options: tuple[str, ...] = ()


HEADS: Registry[HeadSpec] = Registry("head", "--head", builtins=("mpoxscope.models.agfn",))


def register_head(name: str, summary: str) -> Callable[[type], type]:
    """Class decorator: ``@register_head("agfn", "one line for --help and the model card")``. The
    constructor's keyword parameters are the options it is given (nothing else)."""
    import inspect

    def wrap(cls: type) -> type:
        params = inspect.signature(cls.__init__).parameters
        options = tuple(p for p in list(params)[3:] if params[p].kind in (inspect.Parameter.KEYWORD_ONLY,
                                                                            inspect.Parameter.POSITIONAL_OR_KEYWORD))
        HEADS.add(name, HeadSpec(name, cls, summary, options))
        return cls

    return wrap


# ----- runtimes ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuntimeSpec:
    """How to run a trained run. ``load(run_dir, device, onnx_file) -> predictor``. ``batch``: the predictor
    reads files and data sets (``predict_paths``, evaluate, cv); otherwise it only serves decoded images.
    ``explainable``: heat-maps can use the predictor's own torch model; otherwise the service loads one."""

    name: str
    load: Callable[..., Any]
    summary: str
    batch: bool = True
    explainable: bool = False
    takes_file: bool = False


RUNTIMES: Registry[RuntimeSpec] = Registry("runtime", "--runtime", builtins=("mpoxscope.engine.runtimes",))


def register_runtime(name: str, summary: str, *, batch: bool = True, explainable: bool = False,
                     takes_file: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator for a loader ``(run_dir: Path, device: str, onnx_file: Path | None) -> predictor``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        RUNTIMES.add(name, RuntimeSpec(name, fn, summary, batch, explainable, takes_file))
        return fn

    return wrap


# ----- explanation methods ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodSpec:
    """One explanation method and its capabilities, checked once by ``mpoxscope.explain.methods.explain``.

    ``compute(spec, model, batch, targets, layer, batch_size)`` -> (N, S, S) float maps in [0, 1], or
    ``(maps, parts)`` with ``parts`` (N, P, H, W) raw grids when ``parts`` is set (e.g. one map per attention
    head). The model is already frozen; ``targets`` is None for a method that is not ``class_specific``;
    ``layer`` is None unless ``needs_layer``. ``cam``: the pytorch-grad-cam class of a CAM method.
    ``available(model)``: None, or one line on why this model cannot be explained this way. ``slow``: left
    out of ``--method all`` and of the web service. ``always``: added to every panel the model allows
    (``--no-attention`` turns it off). ``title``: overlay title instead of "<name> for <class>".
    """

    name: str
    summary: str
    compute: Callable[..., Any] = field(repr=False)
    class_specific: bool = True
    uses_gradients: bool = False
    slow: bool = False
    needs_torch: bool = True
    needs_layer: bool = True
    cam: Any = None
    available: Callable[[Any], str | None] | None = field(default=None, repr=False)
    baseline: bool = False
    parts: bool = False
    always: bool = False
    title: str = ""


METHODS: Registry[MethodSpec] = Registry("method", "--method", builtins=("mpoxscope.explain.methods",
                                                                          "mpoxscope.explain.attention"))


def register_method(spec: MethodSpec, aliases: tuple[str, ...] = ()) -> MethodSpec:
    return METHODS.add(spec.name, spec, aliases)


# ----- dataset layouts ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayoutSpec:
    """A way images are laid out on disk. ``detect(root: Path) -> bool``; ``scan(root, groups)`` -> a list of
    :class:`mpoxscope.data.samples.Sample` (``groups``: file name -> patient from ``--groups-csv``, or None),
    or ``(samples, split_table)`` when the folders also fix the split."""

    name: str
    detect: Callable[[Any], bool]
    scan: Callable[..., Any]
    summary: str


LAYOUTS: Registry[LayoutSpec] = Registry("dataset layout", "data", builtins=("mpoxscope.data.samples",))


def register_layout(name: str, summary: str, detect: Callable[[Any], bool]) -> Callable[[Callable], Callable]:
    """Decorate ``scan(root, groups)``; ``detect(root)`` says whether ``root`` has this layout. Layouts are tried
    last-registered first, so a specific layout added later wins over a generic built-in one."""

    def wrap(scan: Callable) -> Callable:
        LAYOUTS.add(name, LayoutSpec(name, detect, scan, summary))
        return scan

    return wrap


# ----- backbone families -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackboneFamily:
    """How to cut one family of timm models into an ordered list of stages ending in a (B, C, H, W) grid.
    ``detect(model) -> bool``; ``stages(model) -> list[nn.Module]``. The last stage is where the CAMs read."""

    name: str
    detect: Callable[[Any], bool]
    stages: Callable[[Any], list]
    summary: str


BACKBONE_FAMILIES: Registry[BackboneFamily] = Registry("backbone family", "--backbone",
                                                      builtins=("mpoxscope.models.backbones",))


def register_backbone_family(name: str, summary: str, detect: Callable[[Any], bool]) -> Callable[[Callable], Callable]:
    """Decorate ``stages(model)``; ``detect(model)`` says whether a timm model belongs to the family. Families
    are tried last-registered first (a specific family added later wins); a model no family claims is one
    indivisible stage."""

    BACKBONE_FAMILIES.load()  # built-ins first, so an entry added later is tried before them

    def wrap(stages: Callable) -> Callable:
        BACKBONE_FAMILIES.add(name, BackboneFamily(name, detect, stages, summary))
        return stages

    return wrap
