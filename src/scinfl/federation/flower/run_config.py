"""The run configs of scinfl's Flower apps: what ``flwr run`` gives the consortium's ServerApp.

A training run's config is the run spec (:meth:`~scinfl.federation.RunSpec.to_run_config`) with where the
ServerApp writes; a preprocessing step's names the step, its recipe's options and the statistics spec.
:func:`app_pyproject` writes a consortium's whole Flower App around one. None of it holds a key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from ..secure import MIN_COHORT
from ..spec import RunSpec
from ..statistics import StatisticsSpec

__all__ = ["MODEL_DIR", "app_pyproject", "preprocessing_run_config", "run_config", "statistics_run_config"]

MODEL_DIR = "model"  # where scinfl.flower_apps.server_app writes the model, inside output-dir


def run_config(spec: RunSpec, output_dir: str | os.PathLike[str], *, resume: bool = False) -> dict[str, Any]:
    """The run config of scinfl's ServerApp: the run spec (:meth:`~scinfl.federation.RunSpec.to_run_config`)
    with ``output-dir`` (absolute, on the ServerApp's machine) and ``resume``."""
    return {**spec.to_run_config(), "output-dir": str(Path(output_dir).absolute()), "resume": bool(resume)}


def preprocessing_run_config(
    step: str,
    sites: Sequence[str],
    output_dir: str | os.PathLike[str],
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    secure_aggregation: bool = True,
    min_cohort: int = MIN_COHORT,
    min_cells: int = 20,
    timeout: float = 600.0,
    **options: Any,
) -> dict[str, Any]:
    """The run config of scinfl's ServerApp for one federated preprocessing step on a deployment.

    ``step`` is ``"highly_variable_genes"``, ``"scale"`` or ``"pca"``; ``options`` are its recipe's
    (:mod:`scinfl.federation.preprocessing`: e.g. ``flavor="seurat_v3", n_top_genes=2000``; for a PCA on
    chosen genes, ``genes=[...]`` and ``mask_var="highly_variable"``). ``batch_key="site"`` makes each
    site a batch. The ServerApp writes ``<output_dir>/<step>.npz``; each site applies it with
    :func:`scinfl.pp.apply_preprocessing`. The SuperNodes' ``--node-config`` names each site's file, as for
    training.
    """
    spec = StatisticsSpec(
        sites=tuple(sites),
        layer=layer,
        batch_key=None if batch_key == "site" else batch_key,
        batches_are_sites=batch_key == "site",
        secure_aggregation=secure_aggregation,
        min_cohort=min_cohort,
        min_cells=min_cells,
        timeout=timeout,
    )
    return statistics_run_config(step, spec, options, output_dir)


def statistics_run_config(
    step: str, spec: StatisticsSpec, options: Mapping[str, Any], output_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """The run config of a preprocessing ``step`` over ``spec``'s sites (see :func:`preprocessing_run_config`)."""
    return {
        "preprocess": step,
        "preprocess-options": json.dumps(dict(options)),
        "preprocess-spec": json.dumps(spec.to_dict()),
        "output-dir": str(Path(output_dir).absolute()),
    }


def app_pyproject(
    config: Mapping[str, Any], *, name: str = "scinfl-consortium", publisher: str = "consortium"
) -> str:
    """A consortium's whole Flower App: a ``pyproject.toml`` pointing at scinfl's ServerApp and ClientApp.

    ``[tool.flwr.app.config]`` is ``config`` (:func:`run_config`): every setting, since ``flwr run
    --run-config`` may only override keys declared there. It holds the key's fingerprint, never the key.
    """
    document = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": name,
            "version": "1.0.0",
            "description": "A consortium's scinfl federation (the apps come from the scinfl package).",
            "license": "BSD-3-Clause",
            "dependencies": ["scinfl[flower]"],
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {
                        "serverapp": "scinfl.flower_apps:server_app",
                        "clientapp": "scinfl.flower_apps:client_app",
                    },
                    "config": dict(config),
                }
            },
        },
    }
    return tomli_w.dumps(document)
