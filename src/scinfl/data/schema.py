"""The federation schema: which features, in which order, and which label categories.

Each site describes itself (:func:`describe_site`: var names, category names, counts) and the schema is
agreed from those descriptions only (:func:`build_schema`), never from expression values: building it
reveals nothing a site would not publish in a data dictionary. The same descriptions travel in Flower's
first exchange, so every engine agrees the same schema by the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._warnings import warn

__all__ = [
    "FederationSchema",
    "SiteFields",
    "build_schema",
    "check_unique_features",
    "column_categories",
    "describe_site",
    "feature_source",
    "label_codes",
    "scinfl_entry",
    "site_fields",
    "validate_fields",
]

Join = Literal["inner", "outer"]


@dataclass(frozen=True)
class SiteFields:
    """Where one site's features and labels live in its AnnData."""

    label_key: str | None = None
    layer: str | None = None
    use_raw: bool = False


def site_fields(
    adata: AnnData,
    site: str,
    *,
    label_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
) -> SiteFields:
    """Explicit arguments, else the site's registration (``pp.register_site``), else the defaults.

    Where the values are (``layer`` or ``use_raw``) is one choice: an explicit ``layer=`` or
    ``use_raw=True`` replaces the registered place, whichever it was.
    """
    registered = scinfl_entry(adata, site, "scinfl").get("registration", {})
    if layer is None and use_raw is None:
        layer, use_raw = registered.get("layer"), registered.get("use_raw", False)
    fields = SiteFields(
        label_key=label_key if label_key is not None else registered.get("label_key"),
        layer=layer,
        use_raw=bool(use_raw),
    )
    return validate_fields(adata, site, fields)


def scinfl_entry(adata: AnnData, site: str, key: str) -> Mapping[str, Any]:
    """``adata.uns[key]`` (where scinfl keeps its registration and outputs), or an empty dict.

    Raises naming the site if the entry is something other than a dict, which scinfl could not update.
    """
    entry = adata.uns.get(key, {})
    if not isinstance(entry, Mapping):
        raise TypeError(
            f"Site {site!r}: .uns[{key!r}] is a {type(entry).__name__}, but scinfl keeps a dict there "
            f"(its registration and outputs); rename or delete .uns[{key!r}] first."
        )
    return entry


def check_unique_features(names: pd.Index, site: str, used: pd.Index | None = None) -> None:
    """Raise naming the site if feature names repeat (among ``used``, if given): alignment would be ambiguous."""
    names = pd.Index(names).astype(str)
    duplicated = names[names.duplicated()].unique()
    if used is not None:
        duplicated = duplicated[duplicated.isin(used)]
    if len(duplicated):
        raise ValueError(
            f"Site {site!r}: duplicate feature names ({', '.join(duplicated[:5])}"
            f"{', ...' if len(duplicated) > 5 else ''}) make alignment ambiguous; "
            "call .var_names_make_unique() first."
        )


def validate_fields(adata: AnnData, site: str, fields: SiteFields) -> SiteFields:
    """Check that the label column, layer or ``.raw`` that ``fields`` name exist in the site's AnnData."""
    if fields.use_raw and fields.layer is not None:
        raise ValueError(f"Site {site!r}: use either layer={fields.layer!r} or use_raw=True, not both.")
    if fields.use_raw and adata.raw is None:
        raise ValueError(f"Site {site!r}: use_raw=True but the AnnData has no .raw.")
    if fields.layer is not None and fields.layer not in adata.layers:
        raise ValueError(
            f"Site {site!r}: layer {fields.layer!r} not found; its layers are {list(adata.layers) or 'none'}."
        )
    if fields.label_key is not None and fields.label_key not in adata.obs:
        raise ValueError(
            f"Site {site!r}: label column {fields.label_key!r} is missing from .obs "
            f"(columns: {', '.join(map(str, adata.obs.columns)) or 'none'})."
        )
    return fields


def feature_source(adata: AnnData, fields: SiteFields):
    """The matrix and the feature names that ``fields`` point at (``.X``, a layer, or ``.raw``)."""
    if fields.use_raw:
        return adata.raw.X, adata.raw.var_names
    if fields.layer is not None:
        return adata.layers[fields.layer], adata.var_names
    return adata.X, adata.var_names


@dataclass(frozen=True)
class FederationSchema:
    """What every site's data is aligned to: feature order, label categories, and where they came from.

    Agreed from what the sites publish (:func:`describe_site`): names, never values.
    """

    var_names: tuple[str, ...]
    categories: tuple[str, ...]
    label_key: str | None
    layer: str | None
    use_raw: bool
    join: Join
    # A multi-omics mosaic: (modality, n_features) in input order; var_names are "<modality>:<feature>".
    modalities: tuple[tuple[str, int], ...] = ()
    # Categorical .obs columns a task reads besides the labels (e.g. a perturbation's covariates): each
    # column's name and the union of its categories over the sites, sorted.
    covariates: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def n_features(self) -> int:
        return len(self.var_names)

    @property
    def n_classes(self) -> int:
        return len(self.categories)

    @property
    def fields(self) -> SiteFields:
        return SiteFields(label_key=self.label_key, layer=self.layer, use_raw=self.use_raw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "var_names": list(self.var_names),
            "categories": list(self.categories),
            "label_key": self.label_key,
            "layer": self.layer,
            "use_raw": self.use_raw,
            "join": self.join,
            "modalities": [list(m) for m in self.modalities],
            "covariates": {name: list(categories) for name, categories in self.covariates},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FederationSchema:
        return cls(
            var_names=tuple(str(v) for v in data["var_names"]),
            categories=tuple(str(c) for c in data["categories"]),
            label_key=data.get("label_key"),
            layer=data.get("layer"),
            use_raw=bool(data.get("use_raw", False)),
            join=data.get("join", "inner"),
            modalities=tuple((str(name), int(n)) for name, n in data.get("modalities", ())),
            covariates=tuple(
                (str(name), tuple(str(c) for c in categories))
                for name, categories in dict(data.get("covariates", {})).items()
            ),
        )


def column_categories(adata: AnnData, site: str, key: str, *, what: str = "column") -> list[str]:
    """The categories of ``.obs[key]`` (a categorical's own order, else the sorted distinct values).

    Raises naming the site if the column is missing or some cells have no value in it.
    """
    if key not in adata.obs:
        raise ValueError(
            f"Site {site!r}: {what} {key!r} is missing from .obs "
            f"(columns: {', '.join(map(str, adata.obs.columns)) or 'none'})."
        )
    values = adata.obs[key]
    n_missing = int(values.isna().sum())
    if n_missing:
        raise ValueError(
            f"Site {site!r}: {n_missing} cells have no value in {what} {key!r}; "
            "label them or subset them away before training."
        )
    if isinstance(values.dtype, pd.CategoricalDtype):
        return [str(c) for c in values.cat.categories]
    return sorted({str(v) for v in values.unique()})


def label_coding(adata, key: str | None) -> str | None:
    """How a site writes its labels: ``"numbers"`` (integer or float codes) or ``"names"`` (text,
    categories of text); None without a label column. Sites that code the same column differently would
    train a model with both spellings of every class as separate classes."""
    if key is None or key not in adata.obs:
        return None
    column = adata.obs[key]
    dtype = column.cat.categories.dtype if isinstance(column.dtype, pd.CategoricalDtype) else column.dtype
    return "numbers" if pd.api.types.is_numeric_dtype(dtype) else "names"


def check_label_coding(descriptions: Mapping[str, Mapping[str, Any]], label_key: str | None) -> None:
    """Refuse sites whose label column is coded differently (numbers at one, names at another), naming
    the sites and showing examples of each."""
    codings = {site: d["label_coding"] for site, d in descriptions.items() if d.get("label_coding")}
    if len(set(codings.values())) < 2:
        return
    examples = "; ".join(
        f"{site}: {coding} such as {', '.join(map(repr, list(descriptions[site]['categories'])[:3]))}"
        for site, coding in codings.items()
    )
    raise ValueError(
        f"The sites code the label column {label_key!r} differently ({examples}): the model would learn "
        "every class twice, once under each spelling. Recode the sites that use numbers to the names "
        "(e.g. adata.obs[key] = adata.obs[key].map(code_to_name)) before training."
    )


def describe_site(
    adata: AnnData, site: str, fields: SiteFields, *, covariate_keys: Sequence[str] = ()
) -> dict[str, Any]:
    """What a site publishes for the schema to be agreed: names and counts, never values (JSON-able).

    ``var_names`` (of the matrix ``fields`` point at), ``categories`` (of the label column, if any) and
    ``label_coding`` (:func:`label_coding`), ``covariates`` (column -> categories), ``layer``/``use_raw``
    and ``n_obs``.
    """
    names = pd.Index(feature_source(adata, fields)[1]).astype(str)
    if not len(names):
        raise ValueError(f"Site {site!r} has no features (its matrix has no columns).")
    check_unique_features(names, site)
    return {
        "var_names": list(names),
        "categories": column_categories(adata, site, fields.label_key, what="label column")
        if fields.label_key is not None
        else [],
        "label_coding": label_coding(adata, fields.label_key),
        "covariates": {key: column_categories(adata, site, key) for key in covariate_keys},
        "label_key": fields.label_key,
        "layer": fields.layer,
        "use_raw": fields.use_raw,
        "n_obs": int(adata.n_obs),
    }


def build_schema(descriptions: Mapping[str, Mapping[str, Any]], *, join: Join = "inner") -> FederationSchema:
    """Agree a schema from the sites' descriptions (:func:`describe_site`).

    Parameters
    ----------
    descriptions
        Site name -> what it published. Every site must use the same label column, layer and ``.raw``
        choice.
    join
        ``"inner"``: the features every site has (in the first site's order); ``"outer"``: all features,
        zero-filled where a site lacks them.
    """
    if join not in ("inner", "outer"):
        raise ValueError(f"join must be 'inner' or 'outer', got {join!r}.")
    if not descriptions:
        raise ValueError("No sites given.")
    distinct = {(d.get("label_key"), d.get("layer"), bool(d.get("use_raw"))) for d in descriptions.values()}
    if len(distinct) > 1:
        detail = "; ".join(
            f"{s}: label_key={d.get('label_key')!r}, layer={d.get('layer')!r}, use_raw={bool(d.get('use_raw'))}"
            for s, d in descriptions.items()
        )
        raise ValueError(f"Sites disagree on the label column, layer or use_raw: {detail}.")
    label_key, layer, use_raw = next(iter(distinct))
    check_label_coding(descriptions, label_key)

    ordered: list[str] = []
    seen: set[str] = set()
    shared: set[str] | None = None
    sites = list(descriptions)
    for site, description in descriptions.items():
        names = [str(v) for v in description["var_names"]]
        if not names:
            raise ValueError(f"Site {site!r} has no features (its matrix has no columns).")
        if join == "inner" and shared is not None and not shared & set(names):
            earlier = sites[: sites.index(site)]
            raise ValueError(
                f"Site {site!r} and the sites before it ({', '.join(map(repr, earlier))}) share no feature "
                f"names (its first: {', '.join(names[:3])}; theirs in common: {', '.join(sorted(shared)[:3])})"
                ": check that they use the same gene identifiers (symbols vs Ensembl IDs), or use join='outer'."
            )
        shared = set(names) if shared is None else shared & set(names)
        for name in names:
            if name not in seen:
                seen.add(name)
                ordered.append(name)
    if join == "inner":
        var_names = [v for v in ordered if v in shared]
        n_dropped = len(ordered) - len(var_names)
        if n_dropped:
            warn(
                f"{n_dropped} features are not held by every site and are left out (join='inner'); "
                f"{len(var_names)} shared features remain."
            )
    else:
        var_names = ordered

    def union(values) -> tuple[str, ...]:
        return tuple(sorted(set().union(*values))) if values else ()

    covariate_keys = list(dict.fromkeys(k for d in descriptions.values() for k in d.get("covariates", {})))
    return FederationSchema(
        var_names=tuple(var_names),
        categories=union([set(d.get("categories", ())) for d in descriptions.values()]),
        label_key=label_key,
        layer=layer,
        use_raw=use_raw,
        join=join,
        covariates=tuple(
            (key, union([set(d["covariates"].get(key, ())) for d in descriptions.values()]))
            for key in covariate_keys
        ),
    )


def label_codes(adata: AnnData, schema: FederationSchema, site: str) -> np.ndarray:
    """The label of every cell as its index in ``schema.categories``."""
    if schema.label_key is None or schema.label_key not in adata.obs:
        raise ValueError(f"Site {site!r}: label column {schema.label_key!r} is missing from .obs.")
    labels = adata.obs[schema.label_key]
    if labels.isna().any():
        raise ValueError(
            f"Site {site!r}: {int(labels.isna().sum())} cells have no label in {schema.label_key!r}."
        )
    codes = pd.Categorical(labels.astype(str), categories=list(schema.categories)).codes
    if (codes < 0).any():
        unknown = sorted(set(labels.astype(str)) - set(schema.categories))[:5]
        raise ValueError(
            f"Site {site!r}: labels {unknown} are not among the model's categories "
            f"({', '.join(schema.categories)})."
        )
    return codes.astype(np.int64)
