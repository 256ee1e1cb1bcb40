"""``train_federated(task="mosaic")``: multi-omics sites, prepared for the shared federation code."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..data import MosaicMatrix, build_mosaic_schema, is_mudata, site_modalities
from ..data.schema import scinfl_entry
from ..nn import MOSAIC_LIKELIHOODS
from ..train import ModelConfig

__all__ = ["MosaicSites", "refuse_mudata"]


def refuse_mudata(sites: Mapping[str, Any], task: str, modalities: Mapping[str, str] | None) -> None:
    """For tasks other than ``"mosaic"``: MuData sites and ``modalities=`` are errors that say what to do."""
    for name, data in sites.items():
        if is_mudata(data):
            raise ValueError(
                f"Site {name!r} is a MuData: multi-omics sites train with task='mosaic' (got task={task!r})."
            )
    if modalities is not None:
        raise ValueError(f"modalities= names the modality of AnnData sites of task='mosaic' (got {task!r}).")


class MosaicSites:
    """The sites of a mosaic federation: each one's modalities, the agreed schema, their likelihoods.

    Parameters
    ----------
    sites
        Site name -> MuData or AnnData.
    modalities
        Site name -> modality, for AnnData sites (default: their registration's, else ``"rna"``).
    likelihood
        One likelihood for every modality, or modality -> likelihood (``"gaussian"`` for modalities not
        named).
    label_key, join, key_added
        As for :func:`~scinfl.tl.train_federated`.
    options
        The other options of the call, to refuse those a mosaic does not support.
    """

    def __init__(
        self,
        sites: Mapping[str, Any],
        modalities: Mapping[str, str] | None,
        *,
        likelihood: str | Mapping[str, str],
        label_key: str | None,
        join: str,
        key_added: str,
        options: Mapping[str, Any],
    ) -> None:
        unsupported = {
            "engine": ("local", "engine='flower' does not run mosaic federations yet; use engine='local'"),
            "dp": (None, "dp= (DP-SGD) does not train mosaic networks yet"),
            "init": (None, "init= does not start mosaic networks yet"),
            "spatial_key": (None, "spatial_key= has no mosaic version"),
            "layer": (None, "a mosaic reads each modality's .X: layer= is not supported"),
            "use_raw": ((None, False), "a mosaic reads each modality's .X: use_raw= is not supported"),
        }
        for option, (allowed, message) in unsupported.items():
            value = options.get(option)
            if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                error = NotImplementedError if option in ("engine", "dp", "init") else ValueError
                raise error(f"task='mosaic': {message}.")
        modalities = dict(modalities or {})
        unknown = sorted(set(modalities) - set(sites))
        if unknown:
            raise ValueError(f"modalities= names sites that are not given: {', '.join(map(repr, unknown))}.")
        self.modalities = {}
        for name, data in sites.items():
            scinfl_entry(data, name, key_added)  # the outputs' .uns entry must be a dict: checked first
            if label_key is not None and label_key not in data.obs:
                raise ValueError(f"Site {name!r}: label column {label_key!r} is missing from .obs.")
            if data.n_obs == 0:
                raise ValueError(f"Site {name!r} has no cells.")
            self.modalities[name] = site_modalities(data, name, modalities.get(name))
        self.schema = build_mosaic_schema(sites, self.modalities, label_key=label_key, join=join)
        if isinstance(likelihood, str):
            likelihoods = {name: likelihood for name, _ in self.schema.modalities}
        else:
            extra = sorted(set(likelihood) - {name for name, _ in self.schema.modalities})
            if extra:
                raise ValueError(
                    f"likelihood= names modalities no site holds: {', '.join(map(repr, extra))}."
                )
            likelihoods = {name: likelihood.get(name, "gaussian") for name, _ in self.schema.modalities}
        for name, value in likelihoods.items():
            if value not in MOSAIC_LIKELIHOODS:
                raise ValueError(
                    f"Modality {name!r}: likelihood must be one of {', '.join(map(repr, MOSAIC_LIKELIHOODS))}, "
                    f"got {value!r}."
                )
        self.likelihoods = likelihoods
        self.matrices = {
            name: MosaicMatrix(self.modalities[name], self.schema, data.n_obs, name)
            for name, data in sites.items()
        }
        for matrix in self.matrices.values():
            matrix.check_finite()

    def configure(self, config: ModelConfig) -> ModelConfig:
        """The model config of the mosaic network. LayerNorm: a batch may hold one cell of a modality."""
        layout = tuple((name, n, self.likelihoods[name]) for name, n in self.schema.modalities)
        return dataclasses.replace(
            config,
            n_features=sum(n for _, n, _ in layout) + len(layout),
            modalities=layout,
            likelihood="gaussian",  # the embedding task's; a mosaic's are per modality, in modalities
            norm="layer",
        )

    def params(self) -> dict[str, Any]:
        """What ``model.params`` records of the mosaic (JSON- and h5ad-writable)."""
        return {
            "modalities": {site: list(mods) for site, mods in self.modalities.items()},
            "likelihood": dict(self.likelihoods),
        }
