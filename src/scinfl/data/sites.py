"""The sites a user passes: a mapping (or list) of AnnData, MuData or h5ad paths, opened and named."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata
from anndata import AnnData

from .mosaic import is_mudata

__all__ = ["as_site_dict"]


def as_site_dict(sites, caller: str) -> tuple[dict[str, Any], set[str]]:
    """The sites by name (a mapping, or a list named ``site_0``, ...), and the names of those given as h5ad
    paths (opened here, backed read-only). ``caller`` names the function in the error for a lone site."""
    if isinstance(sites, AnnData | str | os.PathLike) or is_mudata(sites):
        raise TypeError(f"{caller} needs several sites: a dict of name -> AnnData or h5ad path (or a list).")
    items = sites.items() if isinstance(sites, Mapping) else ((f"site_{i}", a) for i, a in enumerate(sites))
    out: dict[str, Any] = {}
    opened: set[str] = set()
    for name, data in items:
        name = str(name)
        if isinstance(data, str | os.PathLike):
            path = Path(data)
            if not path.is_file():
                raise FileNotFoundError(f"Site {name!r}: no h5ad file at {path}.")
            data = anndata.read_h5ad(path, backed="r")  # the matrix stays on disk; read batch by batch
            opened.add(name)
        if not isinstance(data, AnnData) and not is_mudata(data):
            raise TypeError(
                f"Site {name!r} is a {type(data).__name__}, not an AnnData, a MuData or an h5ad path."
            )
        out[name] = data
    if not out:
        raise ValueError("No sites given.")
    return out, opened
