"""Federation over Flower (``engine="flower"``): scinfl's ServerApp and ClientApp, simulation, deployment.

A consortium's Flower App is a ``pyproject.toml`` whose components point here::

    [tool.flwr.app.components]
    serverapp = "scinfl.federation.flower.server:app"
    clientapp = "scinfl.federation.flower.client:app"

See ``docs/across_sites.md``. Needs ``pip install 'scinfl[flower]'``. Submodules are imported on use, so
that a ClientApp process imports only :mod:`.client` and what it needs.
"""

from __future__ import annotations

__all__ = ["RunSettings", "SiteFailureError", "load_checkpoint", "run_server", "simulate"]


def __getattr__(name: str):
    if name == "RunSettings":
        from .protocol import RunSettings

        return RunSettings
    if name in ("SiteFailureError", "load_checkpoint", "run_server"):
        from . import server

        return getattr(server, name)
    if name == "simulate":
        from .simulation import simulate

        return simulate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
