"""The engines: every way to deliver the round loop's messages, by name (``engine=`` of ``tl`` and ``pp``).

An engine runs a training federation (:attr:`~scinfl.federation.Engine.train`) and a federated preprocessing step
(:attr:`~scinfl.federation.Engine.statistics`) over its transport; the round loop and the statistics recipes are the same on
every engine. ``scinfl.tl`` and ``scinfl.pp`` only ask :func:`get_engine` for one by name, so a new
transport is one module that defines an ``ENGINE`` (and its tests), named once in ``_BUILT_IN`` below, or
registered from outside with :func:`register_engine`.

A built-in engine's module is imported on first use: ``engine="flower"`` needs Flower installed, and an
in-process run never imports it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .preprocessing import PreprocessingResult
    from .rounds import FederationRun

__all__ = ["Engine", "engine_names", "get_engine", "register_engine"]


@dataclass(frozen=True)
class Engine:
    """A transport, as ``tl`` and ``pp`` use it.

    Attributes
    ----------
    name
        What ``engine=`` names it.
    train
        ``train(sites, keys, spec, *, progress, initial_state=, checkpoint_dir=, resume=, signature=)``: the
        finished :class:`~scinfl.federation.FederationRun` of ``spec`` over ``sites`` (name -> data), each
        site holding ``keys[name]``. The options are :func:`~scinfl.federation.federate`'s.
    statistics
        ``statistics(sites, spec, step, options)``: the
        :class:`~scinfl.federation.preprocessing.PreprocessingResult` of a preprocessing ``step`` (its
        recipe's ``options``) over ``sites``.
    """

    name: str
    train: Callable[..., FederationRun]
    statistics: Callable[..., PreprocessingResult]


# Built-in engines: name -> (the module that defines its ENGINE, and the extra it needs with the package
# that extra installs, if any).
_BUILT_IN: dict[str, tuple[str, tuple[str, str] | None]] = {
    "local": ("scinfl.federation.local", None),
    "flower": ("scinfl.federation.flower.engine", ("flower", "flwr")),
}
_REGISTERED: dict[str, Engine] = {}


def register_engine(engine: Engine) -> None:
    """Make ``engine`` available by its name (a transport of your own; it may not shadow a built-in)."""
    if not isinstance(engine, Engine):
        raise TypeError(f"register_engine takes a scinfl.federation.Engine, got {type(engine).__name__}.")
    if engine.name in _BUILT_IN:
        raise ValueError(f"Engine {engine.name!r} is built in; register yours under another name.")
    _REGISTERED[engine.name] = engine


def engine_names() -> list[str]:
    """Every engine ``engine=`` may name."""
    return [*_BUILT_IN, *_REGISTERED]


def get_engine(name: str) -> Engine:
    """The engine called ``name``; an unknown name, or one whose package is not installed, is an error
    that says what to do."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILT_IN:
        raise ValueError(f"Unknown engine {name!r}; available: {', '.join(map(repr, engine_names()))}.")
    module, needs = _BUILT_IN[name]
    if needs is not None and importlib.util.find_spec(needs[1]) is None:
        raise ImportError(f"engine={name!r} needs {needs[1]}: pip install 'scinfl[{needs[0]}]'.")
    return importlib.import_module(module).ENGINE
