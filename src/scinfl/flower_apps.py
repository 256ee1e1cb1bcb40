"""The Flower apps a consortium deploys: the components of its Flower App.

::

    [tool.flwr.app.components]
    serverapp = "scinfl.flower_apps:server_app"
    clientapp = "scinfl.flower_apps:client_app"

``server_app`` runs the round loop (:func:`scinfl.federation.federate`) over Flower's Grid with the run spec
of the run config and writes the selected model to ``<output-dir>/model``; ``client_app`` answers for the
site its SuperNode's ``--node-config`` names. Both are thin adapters over :mod:`scinfl.federation`; this
module sits at the top of the package (beside :mod:`scinfl.tl`) because the server writes a
:class:`~scinfl.FederatedModel`. See ``docs/across_sites.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .federation import FederationRun, RunSpec
from .federation.flower.client import make_client_app
from .federation.flower.run_config import MODEL_DIR
from .federation.flower.server import make_server_app
from .model import FederatedModel

__all__ = ["client_app", "save_model", "server_app"]

logger = logging.getLogger("scinfl")


def save_model(run: FederationRun, spec: RunSpec, output_dir: str | Path) -> Path:
    """Write the selected global model of ``run`` to ``<output_dir>/model``."""
    model = FederatedModel.from_run(run, spec, engine="flower")
    path = model.save(Path(output_dir) / MODEL_DIR, overwrite=True)
    logger.info("Selected round %d; model written to %s.", run.best_round, path)
    return path


server_app = make_server_app(save_model)
client_app = make_client_app()
