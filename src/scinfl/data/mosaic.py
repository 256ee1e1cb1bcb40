"""Multi-omics mosaic sites: a site is a MuData (several modalities) or an AnnData holding one modality.

Each modality's features are agreed, from var names only, over the sites that hold that modality (the
per-modality schema of :func:`~scinfl.data.build_schema`, ``join="inner"`` or ``"outer"``, from what each
site publishes: :func:`describe_mosaic_site`), and each site's
cells are read as one row per cell: every modality's aligned features (zeros where the cell lacks the
modality) followed by one presence flag per modality (:class:`MosaicMatrix`). Values are read from each
modality's ``.X``, or where its registration says (an AnnData site registered with ``layer`` or
``use_raw``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._warnings import warn
from .loader import AlignedMatrix, check_finite
from .schema import (
    FederationSchema,
    Join,
    SiteFields,
    build_schema,
    check_label_coding,
    check_unique_features,
    column_categories,
    feature_source,
    label_coding,
    validate_fields,
)

__all__ = [
    "DEFAULT_MODALITY",
    "MosaicMatrix",
    "build_mosaic_schema",
    "describe_mosaic_site",
    "is_mudata",
    "modality_var_names",
    "site_modalities",
]

DEFAULT_MODALITY = "rna"  # what an AnnData site of a mosaic federation holds unless told otherwise
_SEPARATOR = ":"  # schema var names are "<modality>:<feature>" (a gene and a protein may share a name)


def is_mudata(data: Any) -> bool:
    """Whether ``data`` is a ``mudata.MuData`` (without importing mudata when it is not installed)."""
    try:
        from mudata import MuData
    except ImportError:  # pragma: no cover - mudata is a dependency
        return False
    return isinstance(data, MuData)


def modality_values(adata: AnnData, site: str):
    """A modality's matrix and feature names: where its registration says (``layer``, ``.raw``), else ``.X``."""
    entry = adata.uns.get("scinfl", {})
    registration = entry.get("registration", {}) if isinstance(entry, Mapping) else {}
    fields = validate_fields(
        adata,
        site,
        SiteFields(layer=registration.get("layer"), use_raw=bool(registration.get("use_raw", False))),
    )
    return feature_source(adata, fields)


def site_modalities(data, site: str, modality: str | None = None) -> dict[str, tuple[AnnData, np.ndarray]]:
    """One site's modalities: name -> (its AnnData, the row of every site cell in it, -1 where absent).

    A MuData gives each of its modalities (a cell may lack some: ``mdata.obsmap``); an AnnData holds one
    modality, ``modality`` (else its registration's, else :data:`DEFAULT_MODALITY`).
    """
    if is_mudata(data):
        if modality is not None:
            raise ValueError(
                f"Site {site!r} is a MuData: its modalities are named by its .mod ({', '.join(data.mod)}); "
                "a modality is named for AnnData sites only."
            )
        if not len(data.mod):
            raise ValueError(f"Site {site!r} is a MuData without modalities.")
        out = {}
        for name, adata in data.mod.items():
            rows = np.asarray(data.obsmap[name]).astype(np.int64) - 1  # obsmap: 1-based, 0 = absent
            out[str(name)] = (adata, rows)
        return out
    if not isinstance(data, AnnData):
        raise TypeError(f"Site {site!r} is a {type(data).__name__}, not an AnnData or a MuData.")
    if modality is None:
        entry = data.uns.get("scinfl", {})
        registration = entry.get("registration", {}) if isinstance(entry, Mapping) else {}
        modality = registration.get("modality", DEFAULT_MODALITY)
    if not isinstance(modality, str) or not modality or _SEPARATOR in modality:
        raise ValueError(f"Site {site!r}: a modality is a non-empty name without ':', got {modality!r}.")
    return {modality: (data, np.arange(data.n_obs, dtype=np.int64))}


def modality_var_names(schema: FederationSchema, modality: str) -> tuple[str, ...]:
    """The features of ``modality`` in a mosaic schema, in order (without the modality prefix)."""
    prefix = f"{modality}{_SEPARATOR}"
    return tuple(name[len(prefix) :] for name in schema.var_names if name.startswith(prefix))


def _components(held: Mapping[str, list[str]]) -> list[set[str]]:
    """Groups of modalities linked by sites that measure them together."""
    groups: list[set[str]] = []
    for modalities in held.values():
        linked = set(modalities)
        for group in [g for g in groups if g & linked]:
            linked |= group
            groups.remove(group)
        groups.append(linked)
    return groups


def describe_mosaic_site(
    data, site: str, modalities: Mapping[str, tuple[AnnData, np.ndarray]], *, label_key: str | None = None
) -> dict[str, Any]:
    """What a mosaic site publishes: each modality's feature names, its label categories, its cell count."""
    described = {}
    for name, (adata, _) in modalities.items():
        if adata.n_obs == 0:
            raise ValueError(f"Site {site!r}: modality {name!r} has no cells.")
        names = pd.Index(modality_values(adata, site)[1]).astype(str)
        if not len(names):
            raise ValueError(f"Site {site!r}: modality {name!r} has no features.")
        check_unique_features(names, site)
        described[name] = list(names)
    return {
        "modalities": described,
        "categories": column_categories(data, site, label_key, what="label column") if label_key else [],
        "label_coding": label_coding(data, label_key),
        "label_key": label_key,
        "n_obs": int(data.n_obs),
    }


def build_mosaic_schema(
    descriptions: Mapping[str, Mapping[str, Any]], *, join: Join = "inner"
) -> FederationSchema:
    """Agree each modality's features over the sites that hold it, and the label categories.

    Parameters
    ----------
    descriptions
        Site name -> :func:`describe_mosaic_site` of that site.
    join
        Per modality: ``"inner"`` (features every site holding it has) or ``"outer"`` (all, zero-filled).

    Returns
    -------
    A :class:`FederationSchema` whose ``var_names`` are ``"<modality>:<feature>"`` and whose
    ``modalities`` are ``(name, n_features)`` in input order.
    """
    held = {site: list(d["modalities"]) for site, d in descriptions.items()}
    groups = _components(held)
    if len(groups) > 1:
        largest = max(groups, key=len)
        stray = next(g for g in groups if g is not largest)
        stray_sites = [site for site, mods in held.items() if set(mods) & stray]
        raise ValueError(
            f"Site(s) {', '.join(map(repr, stray_sites))} hold modality {', '.join(map(repr, sorted(stray)))}, "
            f"which no site measures together with the other modalities ({', '.join(map(repr, sorted(largest)))}): "
            "their cells could not be placed in the joint latent. Check the modality names (the modality "
            "registered for AnnData sites, .mod for MuData sites)."
        )
    order: list[str] = []
    for mods in held.values():
        order += [m for m in mods if m not in order]
    var_names: list[str] = []
    layout: list[tuple[str, int]] = []
    for modality in order:
        holders = {
            site: {"var_names": d["modalities"][modality]}
            for site, d in descriptions.items()
            if modality in d["modalities"]
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            schema = build_schema(holders, join=join)
        for warning in caught:
            warn(f"Modality {modality!r}: {warning.message}")
        var_names += [f"{modality}{_SEPARATOR}{name}" for name in schema.var_names]
        layout.append((modality, schema.n_features))
    label_keys = {d.get("label_key") for d in descriptions.values()}
    if len(label_keys) > 1:
        raise ValueError(f"Sites disagree on the label column: {sorted(map(str, label_keys))}.")
    check_label_coding(descriptions, next(iter(label_keys)))
    return FederationSchema(
        var_names=tuple(var_names),
        categories=tuple(sorted(set().union(*(d.get("categories", ()) for d in descriptions.values())))),
        label_key=next(iter(label_keys)),
        layer=None,
        use_raw=False,
        join=join,
        modalities=tuple(layout),
    )


class MosaicMatrix:
    """One site's cells as mosaic rows: each modality's aligned features, then a presence flag per modality.

    Parameters
    ----------
    modalities
        :func:`site_modalities` of the site.
    schema
        The mosaic schema (:func:`build_mosaic_schema`); modalities of the site the schema lacks are ignored.
    n_obs
        The site's cell count.
    site
        The site's name, in errors.
    """

    def __init__(
        self,
        modalities: Mapping[str, tuple[AnnData, np.ndarray]],
        schema: FederationSchema,
        n_obs: int,
        site: str = "query",
    ) -> None:
        self.n_obs = int(n_obs)
        self.layout = schema.modalities
        self.n_features = sum(n for _, n in self.layout) + len(self.layout)
        self._parts: list[tuple[int, int, int, AlignedMatrix, np.ndarray]] = []
        held, start = [], 0
        for i, (name, n) in enumerate(self.layout):
            if name in modalities:
                adata, rows = modalities[name]
                values, var_names = modality_values(adata, site)
                check_unique_features(var_names, site, used=pd.Index(modality_var_names(schema, name)))
                matrix = AlignedMatrix(values, var_names, modality_var_names(schema, name))
                if len(rows) != self.n_obs:
                    raise ValueError(f"Site {site!r}: modality {name!r} maps {len(rows)} cells of {n_obs}.")
                self._parts.append((i, start, start + n, matrix, rows))
                held.append(name)
            start += n
        self.n_flag_start = start
        self.modalities = tuple(held)
        self.site = site

    def check_finite(self) -> None:
        """Raise naming the site if a modality's matrix holds NaN or infinite values."""
        for i, *_, matrix, _ in self._parts:
            try:
                check_finite(matrix.matrix, self.site)
            except ValueError as err:
                raise ValueError(f"Modality {self.layout[i][0]!r}: {err}") from None

    def present(self, name: str) -> tuple[int, int]:
        """``(features of modality name the site has, features of that modality in the schema)``."""
        for i, *_, matrix, _ in self._parts:
            if self.layout[i][0] == name:
                return matrix.n_present, matrix.n_features
        return 0, dict(self.layout)[name]

    @property
    def measured(self) -> np.ndarray:
        """One flag per input column: the features the site measures (and the presence flags)."""
        flags = np.zeros(self.n_features, dtype=bool)
        flags[self.n_flag_start :] = True
        for _, start, stop, matrix, _ in self._parts:
            flags[start:stop] = matrix.measured
        return flags

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` as dense float32 mosaic rows."""
        index = np.asarray(index, dtype=np.int64)
        out = np.zeros((len(index), self.n_features), dtype=np.float32)
        for i, start, stop, matrix, rows in self._parts:
            positions = rows[index]
            has = np.flatnonzero(positions >= 0)
            if not len(has):
                continue
            order = np.argsort(positions[has], kind="stable")  # sorted reads
            block = matrix.rows(positions[has][order])
            out[has[order], start:stop] = block
            out[has, self.n_flag_start + i] = 1.0
        return out
