"""Train a keyed model across sites and predict on new data; results land in the AnnData."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger, settings, torch_threads
from ..data import as_site_dict, is_mudata, scinfl_entry
from ..federation import EarlyStopping, RunSpec, SecureAggregation, get_engine
from ..federation.spec import ROUNDS
from ..key import FederationKey, as_key
from ..model import FederatedModel
from ..tasks import Task, get_task
from ..train import DPSettings, FitSettings, settings_from

if TYPE_CHECKING:
    from mudata import MuData

__all__ = ["predict", "train_federated"]


SiteInput = AnnData | str | os.PathLike  # or a MuData (task="mosaic")


H5_SAFE_SLASH = (
    "\u2215"  # "∕", for "/" in keys: h5ad would read it as a path (anndata warns, and will refuse)
)


def _h5ad_safe(tree: Any) -> Any:
    """``tree`` as h5ad can store it, recursively: without None values, and with ``/`` in keys written
    ``∕`` (U+2215)."""
    if isinstance(tree, Mapping):
        return {str(k).replace("/", H5_SAFE_SLASH): _h5ad_safe(v) for k, v in tree.items() if v is not None}
    return tree


def _model_uns(model: FederatedModel) -> dict[str, Any]:
    """What ``.uns[key_added]`` holds about the model (h5ad-writable: no None values)."""
    params = {k: v for k, v in model.params.items() if k != "dp"}
    out: dict[str, Any] = {
        "params": _h5ad_safe({**model.spec.to_dict(), **params}),
        "categories": list(model.schema.categories),
        "n_features": model.schema.n_features,
        "scheme": model.config.scheme or "plain",
    }
    if model.key_fingerprint is not None:
        out["key_fingerprint"] = model.key_fingerprint
    if model.params.get("dp") is not None:
        out["dp"] = model.params["dp"]
    return out


def _dp_history(history: pd.DataFrame) -> pd.DataFrame:
    """``dp_steps`` 0 and ``dp_epsilon`` carried forward in rounds a site sat out (nothing was spent)."""
    history = history.copy()
    history["dp_steps"] = history["dp_steps"].fillna(0).astype(int)
    history["dp_epsilon"] = history.groupby("site", sort=False)["dp_epsilon"].ffill().fillna(0.0)
    return history


def _dp_report(dp: DPSettings, site_states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Target and per-site spent privacy (h5ad-writable: numbers and dicts of numbers only), from the
    accounting each site reported with its last reply."""
    from ..train.dp import RDPAccountant, spent_epsilon

    reports = {}
    for name, state in site_states.items():
        accountant = RDPAccountant()
        accountant.history = [tuple(step) for step in state["dp_history"]]
        reports[name] = {**state, "steps": state["dp_steps"], "epsilon": spent_epsilon(accountant, dp.delta)}
    return {
        **dp.to_dict(),
        "accountant": "rdp",
        **{
            field: {name: report[field] for name, report in reports.items()}
            for field in ("noise_multiplier", "sample_rate", "planned_steps", "steps")
        },
        "spent_epsilon": {name: report["epsilon"] for name, report in reports.items()},
    }


def _check_init(init: FederatedModel, task: Task, key: FederationKey | None, schema) -> Task:
    """The task of a run that starts from ``init``'s weights: its own, checked against this run."""
    if not isinstance(init, FederatedModel):
        raise TypeError(f"init must be a scinfl.FederatedModel, got {type(init).__name__}.")
    if not task.supports_init:
        raise NotImplementedError(f"task={task.name!r}: init= does not start this task's networks yet.")
    if init.schema.var_names != schema.var_names or init.schema.categories != schema.categories:
        raise ValueError(
            "init: the sites give other features or label categories than the model was trained on "
            f"({schema.n_features} features and {schema.n_classes} categories vs {init.schema.n_features} "
            f"and {init.schema.n_classes})."
        )
    if type(init.task) is not type(task):
        raise ValueError(f"init: the model was trained for task {init.task.name!r}, not {task.name!r}.")
    scheme = None if key is None else key.scheme
    if init.config.scheme != scheme:
        raise ValueError(
            f"init: the model uses scheme {init.config.scheme!r} and the key {scheme!r}; "
            "a model keeps its scheme (tl.rekey moves it to a new key of the same scheme)."
        )
    return init.task


def train_federated(
    sites: Mapping[str, SiteInput] | Sequence[SiteInput],
    *,
    key: FederationKey | str | os.PathLike[str] | None,
    task: str | Task | None = None,
    label_key: str | None = None,
    join: Literal["inner", "outer"] = "inner",
    rounds: int = ROUNDS,
    fraction: float = 1.0,
    fit: FitSettings | Mapping[str, float] | None = None,
    early_stopping: bool | EarlyStopping | Mapping[str, float] = False,
    secure_aggregation: bool | SecureAggregation | Mapping[str, int] = True,
    key_strength: float = 1.0,
    validation_fraction: float = 0.1,
    engine: str = "local",
    dp: Mapping[str, float] | None = None,
    seed: int = 0,
    init: FederatedModel | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    key_added: str = "scinfl",
    copy: bool = False,
) -> FederatedModel:
    """Train one keyed model across sites with federated averaging; write its outputs into every site.

    Each site trains locally from the global weights; only weights, cell counts and the key's fingerprint
    reach the aggregator, which averages updates made under the expected key version (weighted by training
    cells). Each site holds out ``validation_fraction`` of its cells (stratified) to select the best round.
    Where a site keeps its values (``.X``, a layer, ``.raw``; a multi-omics site's modality) is its
    registration (:func:`scinfl.pp.register_site`).

    Parameters
    ----------
    sites
        Site name -> AnnData (a list is named ``site_0``, ``site_1``, ...). A site may be backed
        (``anndata.read_h5ad(path, backed="r")``) or a path to an h5ad file, which is opened so: its
        matrix stays on disk and is read one batch of rows at a time. Outputs are written into a backed
        site's in-memory annotations, never into its file; sites given as paths receive them only with
        ``copy=True``. Opening a file backed keeps ``.X`` and ``.raw.X`` on disk, but anndata loads its
        layers. With ``task="mosaic"`` a site may also be a ``mudata.MuData``.
    key
        The federation key, held by the sites only. ``None`` trains the same network without keyed modules
        (plain FedAvg, the baseline). There is no default, so that an unkeyed run is always a choice. The
        path of a key file (:meth:`scinfl.FederationKey.save`) is loaded.
    task
        What to learn: a task object with its options (:mod:`scinfl.tasks`), e.g.
        ``si.tasks.Embedding(n_latent=32, likelihood="poisson")``,
        ``si.tasks.Perturbation(perturbation_key="guide", covariate_keys=["condition"])``, or a task's name
        for its defaults: ``"classification"`` (cell types or cohorts), ``"embedding"`` (a keyed
        autoencoder; optionally spatial), ``"perturbation"`` (perturbation response) or ``"mosaic"``
        (a multi-omics joint embedding). The network's width and dropout are options of the task.
        Default: ``"classification"``, or with ``init`` that model's task and options.
    label_key
        Shortcut for the task's label column (``si.tasks.Classification(label_key=...)``); default: the
        task's, else each site's registration.
    join
        Features used: ``"inner"`` (shared by every site) or ``"outer"`` (all, zero-filled; each site's loss
        then covers only the features it measures).
    rounds, fraction
        Federated rounds (with ``early_stopping``, at most), and the fraction of sites sampled per round.
    fit
        Local optimisation at every site (:class:`~scinfl.train.FitSettings`, or a dict of its fields):
        ``local_epochs`` per round (1), Adam's ``batch_size`` (128), ``lr`` (1e-3) and ``weight_decay``
        (1e-5), e.g. ``fit={"lr": 1e-2, "local_epochs": 2}``.
    early_stopping
        Stop when the validation loss has converged: once the loss that selects the round (each site's
        validation loss, weighted by its validation cells) has not fallen below its best value by more
        than ``min_delta`` of it (relative) for ``patience`` rounds. ``True`` for the defaults (patience
        5, min_delta 0, measured on every data set here: docs/benchmarks.md, early stopping), or a dict
        (:class:`~scinfl.federation.EarlyStopping`), e.g. ``{"patience": 10}``. The selected round is
        then the best one seen, as without stopping; ``model.params["stopped_round"]`` and
        :func:`scinfl.pl.history` show where the run ended.
    secure_aggregation
        Sites send their updates masked, so the aggregator learns only each round's weighted sum over the
        sampled sites, never one site's update (pairwise masking: :mod:`scinfl.federation.secure`). The
        sum equals FedAvg's to within 2^-25 per cell, far below float32's resolution. ``True`` sums at
        least 3 sites per round; a dict (:class:`~scinfl.federation.secure.SecureAggregation`) sets
        ``min_cohort``: with two sites the server still sees only their sum, but each site can subtract
        its own update and learn the other's, so a two-site federation passes ``{"min_cohort": 2}`` to
        accept that. ``False`` sends updates in the clear. What each setting leaves to a server:
        docs/privacy.md.
    key_strength
        Strength ``s`` of the paper scheme's key modulation (``scheme="infl"``).
    validation_fraction
        Fraction of each site's cells held out for model selection (stratified by label). A site with
        fewer than 20 cells trains, with a warning: its validation split is then a few cells at most.
    engine
        ``"local"``: all sites in this process. ``"flower"``: the same rounds on Flower's simulation runtime
        (``pip install 'scinfl[flower]'``): the round loop in a ServerApp in this process, one ClientApp per
        site in Ray workers, the key passed to each site through a private 0600 file, never through
        Flower. Same seed, same result as ``"local"``; Ray's start-up adds 20-30 s. For sites on different
        machines, run scinfl's apps with Flower's deployment runtime (docs/across_sites.md).
    dp
        Train with differential privacy instead of a key (DP-SGD with Opacus; ``pip install 'scinfl[dp]'``):
        ``{"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}`` (``epsilon`` required). Each site runs
        DP-SGD on its training cells (Poisson batches, per-cell clipping, Gaussian noise) with its noise
        multiplier calibrated by Opacus's RDP accountant so that ``rounds * local_epochs * ceil(1/q)``
        steps spend ``(epsilon, delta)``; the site's accountant records the steps it actually takes (the
        target is an upper bound). The guarantee is per site and per training cell; the validation cells
        select the round without noise. The network uses LayerNorm, and a private site does not report its
        training loss. Plain models only (``key=None``): Opacus's per-sample gradient rules do not hold for
        keyed layers. The spent epsilon is reported in the history (``dp_epsilon``, ``dp_steps``),
        ``model.params["dp"]`` and ``.uns[key_added]["dp"]``. DP-SGD needs its own settings (the privacy
        audit's DP models use ``hidden=64, lr=1e-2``).
    seed
        Seed of initialisation, splits, sampling and local shuffling: the same seed gives the same model.
    init
        Start from this model's weights instead of a random initialisation (its task, options and
        architecture are kept). The sites' data must give the same features and label categories.
        :func:`scinfl.tl.rekey` uses it to move a model to a new key.
    checkpoint_dir
        Checkpoint the federation into this directory after every round: global and best weights, the
        history, the sampling state and each site's running state (a DP-SGD site's accounting), written
        atomically. Never the key. A directory holding another run's checkpoint is refused unless
        ``resume=True``.
    resume
        Continue the run checkpointed in ``checkpoint_dir`` from its last complete round, e.g. after a
        crash. The sites and every setting except ``rounds`` must be those of the interrupted run; the
        result is the one an uninterrupted run with the same seed gives.
    key_added
        Prefix of the output keys.
    copy
        Write into copies of the sites instead of in place; the copies are ``model.sites``.

    Returns
    -------
    The :class:`~scinfl.FederatedModel`. Every site gets what its task writes (:mod:`scinfl.tasks`):

    ``.obsm[f"X_{key_added}"]``
        The cell embedding (use with ``sc.pp.neighbors(adata, use_rep=...)``): the classifier's narrowing
        layer, the autoencoder's latent, the mosaic's joint latent (on a MuData site, in its own
        ``.obsm``), or the perturbation model's encoding of the cell's condition.
    ``.obs[f"{key_added}_prediction"]``, ``.obs[f"{key_added}_confidence"]``, ``.obsm[f"{key_added}_probabilities"]``
        Classification: the predicted label (categorical), its probability, and every category's
        probability (in the order of ``.uns[key_added]["categories"]``).
    ``.layers[f"{key_added}_predicted"]``
        Perturbation: every cell's predicted values (NaN for genes the model does not have).
    ``.uns[key_added]``
        ``params`` (the run spec and ``best_round``), ``categories``, ``scheme``, ``key_fingerprint``
        (keyed models), ``n_features``, ``dp`` (with ``dp=``: target ``epsilon``, ``delta``,
        ``max_grad_norm``, and per site ``noise_multiplier``, ``sample_rate``, ``planned_steps``,
        ``steps`` and ``spent_epsilon``).

    Outputs an earlier model wrote under the same ``key_added`` that this task does not write are removed,
    with a warning.
    """
    site_data, opened = as_site_dict(sites, "train_federated")
    runner = get_engine(engine)
    key = as_key(key)
    if task is None:  # a classification, or the task of the model training starts from
        task = init.task if isinstance(init, FederatedModel) else "classification"
    task = get_task(task, label_key=label_key)
    stopping = EarlyStopping.from_option(early_stopping)
    secure = SecureAggregation.from_option(secure_aggregation)
    spec = RunSpec(
        task=task,
        sites=tuple(site_data),
        key_fingerprint=None if key is None else key.fingerprint,
        scheme=None if key is None else key.scheme,
        rounds=rounds,
        early_stopping=stopping is not None,
        **dataclasses.asdict(stopping or EarlyStopping()),
        fraction=fraction,
        secure_aggregation=secure is not None,
        **dataclasses.asdict(secure or SecureAggregation()),
        fit=FitSettings() if fit is None else settings_from(FitSettings, fit, "fit", "{'lr': 1e-2}"),
        key_strength=key_strength if init is None else init.config.key_strength,
        validation_fraction=validation_fraction,
        join=join,
        seed=seed,
        dp=dp,
    )
    if copy:
        for name, data in site_data.items():
            if getattr(data, "isbacked", False) and name not in opened:
                raise ValueError(
                    f"Site {name!r} is backed by {data.filename}: copy=True would load its matrix into "
                    "memory. Pass copy=False (outputs go into its in-memory annotations; the file is never "
                    "written), or pass its path: sites given as paths are opened here and returned."
                )
        site_data = {name: data if name in opened else data.copy() for name, data in site_data.items()}
    for name, data in site_data.items():
        scinfl_entry(data, name, key_added)  # the outputs' .uns entry must be a dict: checked before training
    # The schema from the sites' descriptions, here too: errors name a site before anything runs.
    schema = spec.task.agree(
        {name: spec.task.describe(data, name) for name, data in site_data.items()}, join=join
    )
    options: dict[str, Any] = {"checkpoint_dir": checkpoint_dir, "resume": resume}
    if init is not None:
        _check_init(init, spec.task, key, schema)
        options |= {"initial_state": init.network.state_dict(), "signature": {"init": init.key_fingerprint}}
    keys = dict.fromkeys(site_data, key)
    with torch_threads(settings.torch_threads):
        run = runner.train(site_data, keys, spec, progress=settings.progress, **options)
        params: dict[str, Any] = {"engine": engine}
        history = run.history
        if spec.dp is not None:
            history = _dp_history(history)
            params["dp"] = _dp_report(spec.dp, run.site_states)
        if init is not None:
            params["init_key_fingerprint"] = init.key_fingerprint
        model = FederatedModel.from_run(dataclasses.replace(run, history=history), spec, **params)
        uns = _model_uns(model)
        for name, data in site_data.items():
            if name in opened and not copy:
                continue  # opened here from a path: the caller holds no object to receive outputs
            with warnings.catch_warnings():
                # join="outer" zero-fills the genes outside a site's panel by design: not worth a warning
                warnings.filterwarnings(
                    "ignore", message=r"Site .* lacks \d+ of the model's", category=UserWarning
                )
                predictions = model.predict(data, key=key, site=name, min_overlap=0.0)
            spec.task.write(data, predictions, key_added=key_added, uns=uns, schema=model.schema)
    if spec.dp is not None:
        spent = params["dp"]["spent_epsilon"]
        logger.info(
            "DP-SGD: spent epsilon %s at delta=%g (target %g).",
            ", ".join(f"{name} {eps:.3g}" for name, eps in spent.items()),
            spec.dp.delta,
            spec.dp.epsilon,
        )
    best = run.history[run.history["round"] == run.best_round]
    if "val_accuracy" in best and best["n_val"].sum() > 0:
        accuracy = float(np.average(best["val_accuracy"].fillna(0), weights=best["n_val"]))
        logger.info(
            "Selected round %d of %d%s (validation accuracy %.3f).",
            run.best_round,
            rounds if run.stopped_round is None else run.stopped_round,
            "" if run.stopped_round is None else f" (stopped early; at most {rounds})",
            accuracy,
        )
    if copy:
        model.sites = site_data
    return model


def predict(
    adata: AnnData | MuData,
    model: FederatedModel,
    *,
    key: FederationKey | str | os.PathLike[str] | None,
    check_key: bool = True,
    min_overlap: float = 0.5,
    batch_size: int = 1024,
    layer: str | None = None,
    use_raw: bool | None = None,
    modality: str | None = None,
    site: str = "query",
    key_added: str = "scinfl",
    copy: bool = False,
) -> AnnData | MuData | None:
    """Predict labels and embeddings for new cells with a trained model.

    ``adata`` is aligned to the model's schema by feature name: features it lacks are zero-filled with a
    warning that counts them, and fewer than ``min_overlap`` of the model's features is an error.

    Parameters
    ----------
    adata
        New data, with the same kind of values (``.X``, layer or ``.raw``) the model was trained on. For
        a mosaic model (``task="mosaic"``): a MuData, or an AnnData holding one modality.
    model
        A trained :class:`~scinfl.FederatedModel`.
    key
        The federation key, or its file's path (None for a plain model).
    check_key
        Refuse a key of another version than the model's. The privacy audit passes False to measure what
        a wrong key gives.
    min_overlap
        Minimum fraction of the model's features ``adata`` must have.
    batch_size
        Cells per inference batch.
    layer, use_raw
        Where ``adata`` keeps the same kind of values the model was trained on, if not where training
        read them (e.g. ``use_raw=False`` for a query whose ``.X`` holds the log-normalised values a
        model trained with ``use_raw=True`` read from ``.raw``). Default: as in training.
    modality
        Mosaic models: the modality an AnnData query holds (default: its registration's, else ``"rna"``).
        Each of a query's modalities must share ``min_overlap`` of the model's features of that modality.
    site
        The site the cells are from, named in errors. A site-aware embedding
        (``si.tasks.Embedding(site_effects=True)``) embeds the cells of one of its sites with that site's
        statistics, and other cells with the mean of its sites' (:func:`map_site` gives a new site its own).
    key_added
        Prefix of the output keys.
    copy
        Return a new AnnData with the outputs instead of writing in place.

    Returns
    -------
    None, or the new AnnData with ``copy=True``. Sets what the model's task writes, as
    :func:`train_federated` does.
    """
    if not isinstance(model, FederatedModel):
        raise TypeError(f"model must be a scinfl.FederatedModel, got {type(model).__name__}.")
    if not isinstance(adata, AnnData) and not is_mudata(adata):
        raise TypeError(
            f"adata must be an AnnData, got {type(adata).__name__} (a mosaic model also takes a MuData)."
        )
    key = as_key(key)
    scinfl_entry(adata, "query", key_added)  # before anything is written
    if copy:
        adata = adata.copy()
    with torch_threads(settings.torch_threads):
        predictions = model.predict(
            adata,
            key=key,
            check_key=check_key,
            batch_size=batch_size,
            min_overlap=min_overlap,
            layer=layer,
            use_raw=use_raw,
            modality=modality,
            site=site,
        )
    model.task.write(adata, predictions, key_added=key_added, uns=_model_uns(model), schema=model.schema)
    return adata if copy else None
