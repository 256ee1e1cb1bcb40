"""Federation over Flower (``engine="flower"``): scinfl's ServerApp and ClientApp, simulation, deployment.

A consortium's Flower App is a ``pyproject.toml`` whose components point here::

    [tool.flwr.app.components]
    serverapp = "scinfl.flower_apps:server_app"
    clientapp = "scinfl.flower_apps:client_app"

and whose ``[tool.flwr.app.config]`` is the run spec (:func:`~scinfl.federation.flower.run_config.run_config`).
See ``docs/across_sites.md``. Needs ``pip install 'scinfl[flower]'``. Submodules are imported on use, so
that a ClientApp process imports only :mod:`.client` and what it needs.
"""

from __future__ import annotations

__all__ = ["GridTransport", "run_config", "simulate", "simulate_statistics"]


def __getattr__(name: str):
    if name == "GridTransport":
        from .server import GridTransport

        return GridTransport
    if name == "run_config":
        from .run_config import run_config

        return run_config
    if name == "simulate":
        from .simulation import simulate

        return simulate
    if name == "simulate_statistics":
        from .simulation import simulate_statistics

        return simulate_statistics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
