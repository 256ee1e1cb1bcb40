"""The sites a user passes: a mapping (or list) of AnnData, MuData or h5ad paths, opened and named."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata
from anndata import AnnData

from .._warnings import warn
from .mosaic import is_mudata

__all__ = ["as_site_dict", "read_site_file"]


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
            data = read_site_file(path, name)
            opened.add(name)
        if not isinstance(data, AnnData) and not is_mudata(data):
            raise TypeError(
                f"Site {name!r} is a {type(data).__name__}, not an AnnData, a MuData or an h5ad path."
            )
        twin = next((other for other, seen in out.items() if seen is data), None)
        if twin is not None:
            warn(
                f"Sites {twin!r} and {name!r} are the same AnnData object: the federation would count its "
                "cells twice. Pass each site's own data."
            )
        out[name] = data
    if not out:
        raise ValueError("No sites given.")
    return out, opened


def check_site_file(path: Path, site: str) -> None:
    """Raise an error naming ``site`` and ``path`` unless ``path`` is a file that h5py opens (an .h5ad or
    .h5mu), without reading its data."""
    import h5py

    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"Site {site!r}: {path} {where}; give one .h5ad (or .h5mu) file per site.")
    try:
        with h5py.File(path, "r"):
            pass
    except OSError as err:
        reason = str(err).split("(", 1)[-1].rstrip(")") if "(" in str(err) else str(err)
        raise ValueError(
            f"Site {site!r}: {path} cannot be read as an h5ad file ({reason}). Is it truncated, or still "
            "being copied? Write it again from the site's AnnData (adata.write_h5ad)."
        ) from None


def read_site_file(path: Path, site: str):
    """An h5ad site file, opened backed (the matrix stays on disk, read batch by batch); a file that h5py
    cannot open (truncated, still being copied, not an h5ad) is an error naming the site and the path."""
    try:
        return anndata.read_h5ad(path, backed="r")
    except (OSError, KeyError) as err:
        reason = str(err).split("(", 1)[-1].rstrip(")") if "(" in str(err) else str(err)
        raise ValueError(
            f"Site {site!r}: {path} cannot be read as an h5ad file ({reason}). Is it truncated, or still "
            "being copied? Write it again from the site's AnnData (adata.write_h5ad)."
        ) from None
