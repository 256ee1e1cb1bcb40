"""Train a keyed model across sites and predict on new data; results land in the AnnData."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata
import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._settings import logger, settings, torch_threads
from ..data import (
    AlignedMatrix,
    SiteFields,
    build_design,
    build_schema,
    check_finite,
    feature_source,
    label_codes,
    site_fields,
    site_inputs,
)
from ..data.mosaic import is_mudata
from ..data.schema import scinfl_entry
from ..federation import ENGINES, run_local
from ..key import FederationKey
from ..model import FederatedModel, Predictions
from ..nn import HardenedNetwork
from ..train import (
    FitSettings,
    ModelConfig,
    SiteTrainer,
    build_network,
    get_task,
    key_material,
    site_datasets,
)
from . import _mosaic

if TYPE_CHECKING:
    from mudata import MuData

    from ..train.dp import DPSettings

__all__ = ["predict", "train_federated"]


SiteInput = AnnData | str | os.PathLike  # or a MuData (task="mosaic")


def _as_site_dict(
    sites: Mapping[str, SiteInput] | Sequence[SiteInput],
) -> tuple[dict[str, AnnData], set[str]]:
    """The sites by name, and the names of those given as paths (opened here, backed read-only)."""
    if isinstance(sites, AnnData | str | os.PathLike) or is_mudata(sites):
        raise TypeError(
            "train_federated needs several sites: a dict of name -> AnnData or h5ad path (or a list)."
        )
    items = sites.items() if isinstance(sites, Mapping) else ((f"site_{i}", a) for i, a in enumerate(sites))
    out: dict[str, AnnData] = {}
    opened: set[str] = set()
    for name, adata in items:
        name = str(name)
        if isinstance(adata, str | os.PathLike):
            path = Path(adata)
            if not path.is_file():
                raise FileNotFoundError(f"Site {name!r}: no h5ad file at {path}.")
            adata = anndata.read_h5ad(path, backed="r")  # the matrix stays on disk; read batch by batch
            opened.add(name)
        if not isinstance(adata, AnnData) and not is_mudata(adata):
            raise TypeError(
                f"Site {name!r} is a {type(adata).__name__}, not an AnnData, a MuData or an h5ad path."
            )
        out[name] = adata
    if not out:
        raise ValueError("No sites given.")
    return out, opened


def _write_predictions(
    adata: AnnData,
    predictions: Predictions,
    *,
    key_added: str,
    uns: Mapping[str, Any],
    var_names: Sequence[str] = (),
) -> None:
    if predictions.expression is not None:  # a perturbation model's: per gene of adata.var, NaN if unmodelled
        position = pd.Index(var_names).get_indexer(adata.var_names)
        layer = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
        layer[:, position >= 0] = predictions.expression[:, position[position >= 0]]
        adata.layers[f"{key_added}_predicted"] = layer
    if predictions.probabilities is not None:  # a classifier's; an embedding model has only the latent
        adata.obs[f"{key_added}_prediction"] = predictions.labels  # categorical, positional
        adata.obs[f"{key_added}_confidence"] = predictions.confidence.astype(np.float32, copy=False)
        adata.obsm[f"{key_added}_probabilities"] = predictions.probabilities.astype(np.float32, copy=False)
    adata.obsm[f"X_{key_added}"] = predictions.embedding.astype(np.float32, copy=False)
    entry = adata.uns.setdefault(key_added, {})
    entry.update(uns)


def _model_uns(model: FederatedModel) -> dict[str, Any]:
    """What ``.uns[key_added]`` holds about the model (h5ad-writable: no None values)."""
    out: dict[str, Any] = {
        "params": {k: v for k, v in model.params.items() if v is not None},
        "categories": list(model.schema.categories),
        "n_features": model.schema.n_features,
        "scheme": model.config.scheme or "plain",
    }
    if model.key_fingerprint is not None:
        out["key_fingerprint"] = model.key_fingerprint
    if model.params.get("dp") is not None:
        out["params"].pop("dp")
        out["dp"] = model.params["dp"]
    return out


def _dp_history(history: pd.DataFrame) -> pd.DataFrame:
    """``dp_steps`` 0 and ``dp_epsilon`` carried forward in rounds a site sat out (nothing was spent)."""
    history = history.copy()
    history["dp_steps"] = history["dp_steps"].fillna(0).astype(int)
    history["dp_epsilon"] = history.groupby("site", sort=False)["dp_epsilon"].ffill().fillna(0.0)
    return history


def _dp_report(settings: DPSettings, trainers: Mapping[str, SiteTrainer]) -> dict[str, Any]:
    """Target and per-site spent privacy (h5ad-writable: numbers and dicts of numbers only)."""
    reports = {name: trainer.private.report() for name, trainer in trainers.items()}
    return {
        **settings.to_dict(),
        "accountant": "rdp",
        **{
            field: {name: report[field] for name, report in reports.items()}
            for field in ("noise_multiplier", "sample_rate", "planned_steps", "steps")
        },
        "spent_epsilon": {name: report["epsilon"] for name, report in reports.items()},
    }


def train_federated(
    sites: Mapping[str, SiteInput] | Sequence[SiteInput],
    *,
    key: FederationKey | None,
    task: Literal["classification", "embedding", "perturbation", "mosaic"] = "classification",
    label_key: str | None = None,
    perturbation_key: str | None = None,
    control: str = "control",
    covariate_keys: Sequence[str] = (),
    layer: str | None = None,
    use_raw: bool | None = None,
    join: Literal["inner", "outer"] = "inner",
    rounds: int = 20,
    local_epochs: int = 1,
    fraction: float = 1.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    hidden: int = 256,
    dropout: float = 0.1,
    n_latent: int = 16,
    likelihood: Literal["gaussian", "poisson"] | Mapping[str, str] = "gaussian",
    modalities: Mapping[str, str] | None = None,
    spatial_key: str | None = None,
    spatial_neighbors: int = 6,
    key_strength: float = 1.0,
    validation_fraction: float = 0.1,
    engine: Literal["local", "flower"] = "local",
    dp: Mapping[str, float] | None = None,
    seed: int = 0,
    init: FederatedModel | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    key_added: str = "scinfl",
    progress: bool | None = None,
    copy: bool = False,
) -> FederatedModel | tuple[FederatedModel, dict[str, AnnData]]:
    """Train one keyed model across sites with federated averaging; write its outputs into every site.

    Each site trains locally from the global weights; only weights, cell counts and the key's fingerprint
    reach the aggregator, which averages updates made under the expected key version (weighted by training
    cells). Each site holds out ``validation_fraction`` of its cells (stratified) to select the best round.

    Parameters
    ----------
    sites
        Site name -> AnnData (a list is named ``site_0``, ``site_1``, ...). A site may be backed
        (``anndata.read_h5ad(path, backed="r")``) or a path to an h5ad file, which is opened so: its
        matrix stays on disk and is read one batch of rows at a time. Outputs are written into a backed
        site's in-memory annotations, never into its file; sites given as paths receive them only with
        ``copy=True``, which returns them. Opening a file backed keeps ``.X`` and ``.raw.X`` on disk, but
        anndata loads its layers: ``layer=`` on a backed site reads that layer into memory. With
        ``task="mosaic"`` a site may also be a ``mudata.MuData`` (see ``task``).
    key
        The federation key, held by the sites only. ``None`` trains the same network without keyed modules
        (plain FedAvg, the baseline). There is no default, so that an unkeyed run is always a choice.
    task
        What to learn. ``"classification"``: cell types or cohorts from ``label_key``. ``"embedding"``: a
        keyed autoencoder whose latent is the cell embedding, without labels (a ``label_key``, if given,
        only stratifies the validation cells). ``"perturbation"``: predict each cell's expression from its
        site's mean control profile, its perturbation and its covariates (regression; see
        ``perturbation_key``).
        ``"mosaic"``: a multi-omics joint embedding
        (:class:`~scinfl.nn.MosaicAutoencoder`), without labels. Each site is a MuData (its modalities
        named by ``.mod``, e.g. ``rna`` + ``prot`` or ``rna`` + ``atac``; a cell may lack some) or an
        AnnData holding one modality (``modalities``). One encoder per modality into a joint latent of
        ``n_latent`` (the mean of a cell's modality latents), one decoder per modality; a site trains and
        sends only the encoders and decoders of the modalities it holds, and FedAvg averages each
        parameter over the sites that sent it, weighted by their training cells. Each modality's features
        are aligned by name over the sites that hold it (``join`` per modality) and read from its ``.X``
        (``layer``/``use_raw`` do not apply). ``.obsm[f"X_{key_added}"]`` is written on the MuData
        itself (``mdata.obsm``). Local engine only, without ``dp``, ``init`` or ``spatial_key``.
    label_key
        ``.obs`` column with the labels; defaults to the site registration (:func:`scinfl.pp.register_site`).
    perturbation_key, control, covariate_keys
        ``task="perturbation"``: the ``.obs`` column naming each cell's perturbation, its control label,
        and ``.obs`` columns of covariates (e.g. ``["condition"]``). Every site needs control cells: the
        network reads the mean control profile of the cell's covariate group at its site (computed there,
        never sent), the perturbation and the covariates, and predicts the cell's values (use
        log-normalised values: the loss is the mean squared error). A perturbation is predicted from its
        own cells, so it must be among the training perturbations. Splits are stratified by perturbation.
    layer
        Layer with the features; None uses ``.X`` (or the registration).
    use_raw
        Use ``.raw``; None uses the registration, else False.
    join
        Features used: ``"inner"`` (shared by every site) or ``"outer"`` (all, zero-filled).
    rounds, local_epochs, fraction
        Federated rounds, local epochs per round, fraction of sites sampled per round.
    batch_size, lr, weight_decay
        Local optimisation (Adam).
    hidden, dropout
        Network width and dropout.
    n_latent, likelihood
        ``task="embedding"``: the latent's width, and the reconstruction loss that suits the input:
        ``"gaussian"`` (mean squared error) for log-normalised values, ``"poisson"`` for raw counts.
        ``task="mosaic"``: one likelihood for every modality, or a dict modality -> likelihood
        (``"gaussian"`` for those not named), among ``"gaussian"``, ``"poisson"`` and ``"clr"`` (raw
        counts read and reconstructed as their per-cell centred log-ratio, the usual transform of ADT
        counts), e.g. ``{"rna": "poisson", "prot": "clr"}`` for raw CITE-seq counts.
    modalities
        ``task="mosaic"``: site name -> the modality an AnnData site holds (e.g. ``{"site_b": "rna"}``).
        Default: the modality of its registration (:func:`scinfl.pp.register_site`), else ``"rna"``.
        A modality no site measures together with the others is an error (its cells could not be placed
        in the joint latent).
    spatial_key, spatial_neighbors
        Spatial data: ``.obsm`` key of each spot's coordinates. Each site builds its own graph of every
        spot's ``spatial_neighbors`` nearest spots (it never leaves the site), and the network reads each
        spot as the mean of its profile and its neighbours' mean profile, a parameter-free light graph
        convolution, so that embeddings group spots into spatial domains. Prediction applies the same.
    key_strength
        Strength ``s`` of the key modulation.
    validation_fraction
        Fraction of each site's cells held out for model selection.
    engine
        ``"local"``: all sites in this process. ``"flower"``: the same rounds on Flower's simulation runtime
        (``pip install 'scinfl[flower]'``): scinfl's ServerApp in this process, one ClientApp per site in
        Ray workers, the key passed to each site through a private 0600 file, never through Flower. Same
        seed, same result as ``"local"`` (docs/across_sites.md); Ray's start-up adds 20-30 s. For sites
        on different machines, run scinfl's apps with Flower's deployment runtime (docs/across_sites.md).
        Without ``dp``.
    dp
        Train with differential privacy instead of a key (DP-SGD with Opacus; ``pip install 'scinfl[dp]'``):
        ``{"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}`` (``epsilon`` required; the others
        default to these values). Each site runs DP-SGD on its training cells -- Poisson batches with
        sample rate ``q = batch_size / n_train``, per-cell gradients clipped to ``max_grad_norm``, Gaussian
        noise -- with the unfused Adam. Its noise multiplier is calibrated before training with Opacus's
        RDP accountant so that ``rounds * local_epochs * ceil(1/q)`` steps (a site sampled every round)
        spend ``(epsilon, delta)``; the site's accountant records the steps it actually takes, so with
        ``fraction < 1`` the spent epsilon is below the target, which is an upper bound. Empty Poisson
        batches are skipped. The guarantee is per site and per training cell; the validation cells select
        the round without noise. The network uses LayerNorm instead of BatchNorm (``norm="layer"``), and
        a private site does not report its training loss. Plain models only: ``dp`` with a ``key`` raises,
        because Opacus's per-sample gradient rules assume layers ``y = x W^T + b`` while keyed layers
        compute ``(x W^T) * scale + shift`` with a scale and shift shared by the batch, so their
        per-sample gradients would be wrong. The spent epsilon is reported in the history (``dp_epsilon``,
        with ``dp_steps``), in ``model.params["dp"]`` and in ``.uns[key_added]["dp"]``. DP-SGD needs its
        own settings: the privacy audit's DP models use ``hidden=64, lr=1e-2``. The defaults
        (``hidden=256, lr=1e-3``) suit non-private training; with a few hundred cells per site DP-SGD may
        learn nothing with them.
    seed
        Seed of initialisation, splits, sampling and local shuffling: the same seed gives the same model.
    init
        Start from this model's weights instead of a random initialisation (its architecture is kept;
        ``hidden``, ``dropout`` and ``key_strength`` are then ignored). The sites' data must give the same
        features and label categories. :func:`scinfl.tl.rekey` uses it to move a model to a new key.
    checkpoint_dir
        Checkpoint the federation into this directory after every round (``engine="local"``): global and
        best weights, the history, the sampling state and each site's running state (a DP-SGD site's
        accountant), written atomically. Never the key. A directory holding another run's checkpoint is
        refused unless ``resume=True``.
    resume
        Continue the run checkpointed in ``checkpoint_dir`` from its last complete round, e.g. after a
        crash. The sites and every setting except ``rounds`` must be those of the interrupted run; the
        result is the one an uninterrupted run with the same seed gives.
    key_added
        Prefix of the output keys.
    progress
        Progress bar over rounds; None follows ``scinfl.settings.progress``.
    copy
        Write into copies of the sites and return them with the model, instead of writing in place.

    Returns
    -------
    The :class:`~scinfl.FederatedModel` (with ``copy=True``: ``(model, sites)`` with the written copies).
    Every site gets

    ``.obs[f"{key_added}_prediction"]``
        Predicted label (categorical; classification).
    ``.obs[f"{key_added}_confidence"]``
        Probability of the predicted label (classification).
    ``.obsm[f"{key_added}_probabilities"]``
        Probability of every category, in the order of ``.uns[key_added]["categories"]``
        (classification).
    ``.obsm[f"X_{key_added}"]``
        The cell embedding (use with ``sc.pp.neighbors(adata, use_rep=...)``): the classifier's narrowing
        layer, the autoencoder's latent, the mosaic's joint latent (on a MuData site, in its own
        ``.obsm``), or the perturbation model's encoding of the cell's condition.
    ``.layers[f"{key_added}_predicted"]``
        The predicted values of every cell (perturbation): its site's control profile plus the predicted
        change for its perturbation and covariates; NaN for genes the model does not have.
    ``.uns[key_added]``
        ``params``, ``categories``, ``scheme``, ``key_fingerprint`` (keyed models), ``n_features``,
        ``dp`` (with ``dp=``: target ``epsilon``, ``delta``, ``max_grad_norm``, and per site
        ``noise_multiplier``, ``sample_rate``, ``planned_steps``, ``steps`` and ``spent_epsilon``).
    """
    site_data, opened = _as_site_dict(sites)
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; available: {', '.join(ENGINES)}.")
    if key is not None and not isinstance(key, FederationKey):
        raise TypeError(f"key must be a scinfl.FederationKey or None, got {type(key).__name__}.")
    if engine == "flower":
        if spatial_key is not None or task == "perturbation":
            raise ValueError(
                "engine='flower' trains on each site's own matrix; spatial_key= and task='perturbation' "
                "build site inputs (a spatial graph, control profiles) that its ClientApp does not build "
                "yet: use engine='local'."
            )
        if dp is not None:
            raise ValueError(
                "dp= runs with engine='local' only: each site's privacy accountant must span all rounds "
                "in one process, and Flower's simulation may serve a site from different workers."
            )
        try:
            import flwr  # noqa: F401
        except ImportError as err:
            raise ImportError("engine='flower' needs Flower: pip install 'scinfl[flower]'.") from err
    dp_settings = None
    if dp is not None:
        from ..train.dp import DPSettings, PrivateTraining

        dp_settings = DPSettings.from_mapping(dp)
        if key is not None:
            raise ValueError(
                "dp= is available for plain models only: pass key=None. Opacus computes per-sample "
                "gradients with rules that assume layers y = x W^T + b; keyed layers compute "
                "(x W^T) * scale + shift with a key-dependent scale and shift shared by the batch, so "
                "their per-sample gradients (and the privacy guarantee) would be wrong."
            )
    if checkpoint_dir is not None and engine != "local":
        raise ValueError(
            "checkpoint_dir= checkpoints engine='local' runs; Flower runs checkpoint through their run "
            "config (output-dir, resume=true): see docs/across_sites.md."
        )
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir=, the directory of the interrupted run.")
    for name, value in (("rounds", rounds), ("local_epochs", local_epochs), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    task_def = get_task(task)
    if task == "perturbation":
        if perturbation_key is None:
            raise ValueError("task='perturbation' needs perturbation_key=, the .obs column of perturbations.")
        if label_key is not None and label_key != perturbation_key:
            raise ValueError(
                f"task='perturbation' reads its categories from perturbation_key={perturbation_key!r}; "
                f"label_key={label_key!r} would be another column: leave it out."
            )
        label_key = perturbation_key
    elif perturbation_key is not None or covariate_keys:
        raise ValueError(
            f"perturbation_key= and covariate_keys= belong to task='perturbation', not {task!r}."
        )
    if task != "mosaic":
        _mosaic.refuse_mudata(site_data, task, modalities)
    if copy:
        for name, adata in site_data.items():
            if adata.isbacked and name not in opened:
                raise ValueError(
                    f"Site {name!r} is backed by {adata.filename}: copy=True would load its matrix into "
                    "memory. Pass copy=False (outputs go into its in-memory annotations; the file is never "
                    "written), or pass its path: sites given as paths are opened here and returned."
                )
        site_data = {name: adata if name in opened else adata.copy() for name, adata in site_data.items()}

    mosaic = None  # task="mosaic": the sites' modalities, schema and matrices (tl/_mosaic.py)
    if task == "mosaic":
        options = {"engine": engine, "dp": dp, "init": init, "spatial_key": spatial_key}
        options |= {"layer": layer, "use_raw": use_raw}
        mosaic = _mosaic.MosaicSites(
            site_data,
            modalities,
            likelihood=likelihood,
            label_key=label_key,
            join=join,
            key_added=key_added,
            options=options,
        )
    fields: dict[str, SiteFields] = {}
    for name, adata in ({} if mosaic else site_data).items():
        fields[name] = site_fields(adata, name, label_key=label_key, layer=layer, use_raw=use_raw)
        scinfl_entry(adata, name, key_added)  # the outputs' .uns entry must be a dict: checked before writing
        if adata.n_obs == 0:
            raise ValueError(f"Site {name!r} has no cells.")
        check_finite(feature_source(adata, fields[name])[0], name)
    schema = mosaic.schema if mosaic else build_schema(site_data, fields, join=join)
    design = None
    if task == "perturbation":
        design = build_design(
            site_data, perturbation_key=perturbation_key, control=control, covariate_keys=covariate_keys
        )
        if design.control not in schema.categories:
            raise ValueError(f"No site has control cells labelled {control!r} in {perturbation_key!r}.")
    if task_def.needs_labels and schema.label_key is None:
        raise ValueError(f"task={task!r} needs labels: pass label_key= or register it with pp.register_site.")

    config = ModelConfig(
        task=task,
        n_features=schema.n_features,
        n_classes=schema.n_classes,
        hidden=hidden,
        dropout=dropout,
        n_latent=n_latent,
        likelihood=likelihood,
        n_covariates=0 if design is None else design.n_covariates,
        scheme=None if key is None else key.scheme,
        key_strength=key_strength,
        norm="batch" if dp_settings is None else "layer",  # DP-SGD needs per-cell gradients
    )
    if init is not None:
        config = _init_config(init, schema, config)
    if mosaic:
        config = mosaic.configure(config)
    fit_settings = FitSettings(
        local_epochs=local_epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay
    )
    params = {
        "task": task,
        "sites": list(site_data),
        "engine": engine,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "fraction": fraction,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "hidden": hidden,
        "dropout": dropout,
        **({"n_latent": n_latent, "likelihood": likelihood} if task == "embedding" else {}),
        **({"spatial_key": spatial_key, "spatial_neighbors": spatial_neighbors} if spatial_key else {}),
        **({"perturbation": design.to_dict()} if design is not None else {}),
        **({"n_latent": n_latent, **mosaic.params()} if mosaic else {}),
        "key_strength": key_strength,
        "validation_fraction": validation_fraction,
        "join": join,
        "seed": seed,
        "norm": config.norm,
        "label_key": schema.label_key,
        "layer": schema.layer,
        "use_raw": schema.use_raw,
    }
    if init is not None:  # the architecture came from the initial model
        params |= {"hidden": config.hidden, "dropout": config.dropout, "key_strength": config.key_strength}
        params["init_key_fingerprint"] = init.key_fingerprint

    with torch_threads(settings.torch_threads):
        torch.manual_seed(seed)
        network = build_network(config)
        if init is not None:
            network.load_state_dict(init.network.state_dict())
        elif isinstance(network, HardenedNetwork):
            # The sites train in the plain basis: read the fresh initialisation as plain weights (it is the
            # plain network's, draw for draw) so that training is plain FedAvg's from the same seed.
            with torch.no_grad():
                network.load_state_dict(network.from_plain(network.state_dict(), key_material(key, config)))
        if engine == "flower":  # the ClientApps build the site trainers
            from ..federation.flower.simulation import run_federated

            result = run_federated(
                site_data,
                fields,
                key=key,
                schema=schema,
                config=config,
                fit_settings=fit_settings,
                rounds=rounds,
                fraction=fraction,
                validation_fraction=validation_fraction,
                join=join,
                seed=seed,
                initial_state=network.state_dict(),
            )
        else:
            trainers = {}
            for index, (name, adata) in enumerate(site_data.items()):
                matrix = (
                    mosaic.matrices[name] if mosaic else AlignedMatrix.from_adata(adata, schema, fields[name])
                )
                matrix = site_inputs(
                    matrix,
                    adata,
                    schema,
                    name,
                    spatial_key=spatial_key,
                    spatial_neighbors=spatial_neighbors,
                    design=design,
                )
                if schema.label_key is not None:
                    labels = label_codes(adata, schema, name)
                else:  # a task without labels: one class, for the validation split
                    labels = np.zeros(adata.n_obs, dtype=np.int64)
                rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, index]))
                train, validation = site_datasets(matrix, labels, validation_fraction, rng)
                private = None
                if dp_settings is not None:
                    private = PrivateTraining(
                        dp_settings, n_train=len(train), batch_size=batch_size, epochs=rounds * local_epochs
                    )
                    if dp_settings.delta * len(train) > 1:
                        logger.warning(
                            "Site %r: delta=%g is not below 1/n_train (%d training cells); a meaningful "
                            "guarantee needs delta << 1/n.",
                            name,
                            dp_settings.delta,
                            len(train),
                        )
                trainers[name] = SiteTrainer(
                    name, train, validation, network, config, key, fit_settings, private=private
                )
            result = run_local(
                trainers,
                network.state_dict(),
                rounds=rounds,
                fraction=fraction,
                seed=seed,
                expected_fingerprint=None if key is None else key.fingerprint,
                progress=settings.progress if progress is None else progress,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                signature=_run_signature(params, schema, config, site_data, key, dp_settings),
            )
        network.load_state_dict(result.best_state)
        params["best_round"] = result.best_round
        history = result.history
        if dp_settings is not None:
            history = _dp_history(history)
            params["dp"] = _dp_report(dp_settings, trainers)
        model = FederatedModel(
            network,
            config,
            schema,
            key_fingerprint=None if key is None else key.fingerprint,
            history=history,
            params=params,
        )
        for name, adata in site_data.items():
            if name in opened and not copy:
                continue  # opened here from a path: the caller holds no object to receive outputs
            with warnings.catch_warnings():
                # join="outer" zero-fills the genes outside a site's panel by design: not worth a warning
                warnings.filterwarnings(
                    "ignore", message=r"Site .* lacks \d+ of the model's", category=UserWarning
                )
                # min_overlap=0: with join="outer" a site may hold few of the union's features (zero-filled)
                predictions = model.predict(adata, key=key, site=name, min_overlap=0.0)
            _write_predictions(
                adata, predictions, key_added=key_added, uns=_model_uns(model), var_names=schema.var_names
            )
    if dp_settings is not None:
        spent = params["dp"]["spent_epsilon"]
        logger.info(
            "DP-SGD: spent epsilon %s at delta=%g (target %g).",
            ", ".join(f"{name} {eps:.3g}" for name, eps in spent.items()),
            dp_settings.delta,
            dp_settings.epsilon,
        )
    best = result.history[result.history["round"] == result.best_round]
    if "val_accuracy" in best and best["n_val"].sum() > 0:
        accuracy = float(np.average(best["val_accuracy"].fillna(0), weights=best["n_val"]))
        logger.info(
            "Selected round %d of %d (validation accuracy %.3f).", result.best_round, rounds, accuracy
        )
    return (model, site_data) if copy else model


def _run_signature(
    params: Mapping[str, Any],
    schema,
    config: ModelConfig,
    sites: Mapping[str, AnnData],
    key: FederationKey | None,
    dp_settings: DPSettings | None,
) -> dict[str, Any]:
    """What a checkpoint must share with a run that resumes it: everything but the number of rounds,
    which a resumed run may raise, except with DP-SGD, whose noise is calibrated to the planned rounds."""
    return {
        "params": {k: v for k, v in params.items() if k != "rounds" or dp_settings is not None},
        "schema": schema.to_dict(),
        "config": config.to_dict(),
        "n_obs": {name: adata.n_obs for name, adata in sites.items()},
        "key_fingerprint": None if key is None else key.fingerprint,
        "dp": None if dp_settings is None else dp_settings.to_dict(),
    }


def _init_config(init: FederatedModel, schema, config: ModelConfig) -> ModelConfig:
    """The architecture of a run that starts from ``init``'s weights (its own, with this run's scheme)."""
    if not isinstance(init, FederatedModel):
        raise TypeError(f"init must be a scinfl.FederatedModel, got {type(init).__name__}.")
    if init.schema.var_names != schema.var_names or init.schema.categories != schema.categories:
        raise ValueError(
            "init: the sites give other features or label categories than the model was trained on "
            f"({schema.n_features} features and {schema.n_classes} categories vs {init.schema.n_features} "
            f"and {init.schema.n_classes})."
        )
    if init.config.task != config.task or init.config.norm != config.norm:
        raise ValueError("init: the model was trained for another task or normalisation.")
    if init.config.scheme != config.scheme:
        raise ValueError(
            f"init: the model uses scheme {init.config.scheme!r} and the key {config.scheme!r}; "
            "a model keeps its scheme (tl.rekey moves it to a new key of the same scheme)."
        )
    return init.config


def predict(
    adata: AnnData | MuData,
    model: FederatedModel,
    *,
    key: FederationKey | None,
    check_key: bool = True,
    min_overlap: float = 0.5,
    batch_size: int = 1024,
    layer: str | None = None,
    use_raw: bool | None = None,
    modality: str | None = None,
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
        The federation key (None for a plain model).
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
    key_added
        Prefix of the output keys.
    copy
        Return a new AnnData with the outputs instead of writing in place.

    Returns
    -------
    None, or the new AnnData with ``copy=True``. Sets the same ``.obs``/``.obsm``/``.uns`` keys as
    :func:`train_federated`.
    """
    if not isinstance(model, FederatedModel):
        raise TypeError(f"model must be a scinfl.FederatedModel, got {type(model).__name__}.")
    if not isinstance(adata, AnnData) and not is_mudata(adata):
        raise TypeError(
            f"adata must be an AnnData, got {type(adata).__name__} (a mosaic model also takes a MuData)."
        )
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
        )
    _write_predictions(
        adata, predictions, key_added=key_added, uns=_model_uns(model), var_names=model.schema.var_names
    )
    return adata if copy else None
