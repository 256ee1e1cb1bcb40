"""The privacy audit: every attack, for every attacker view, on one trained network, as a tidy table.

The auditor is an insider who holds the key and simulates the attackers of the threat model (see the
package docstring): the keyless server, a server that guesses a key from the same generator, and, as the
positive control that proves each attack works, a key holder. Every figure is a mean over items (victims,
keys) and seeds with a percentile-bootstrap 95% confidence interval.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .._warnings import warn
from ..key import FederationKey
from ..nn import HardenedKey, HardenedNetwork, KeyedModule, MosaicAutoencoder, read_counts, use_key
from ..tasks import AuditView, ModelConfig, build_network
from ..train import FitSettings, key_material, key_on, module_device, resolve_device, to_device
from .analytic import (
    calibrate_gain_offset,
    calibrate_principal_axes,
    first_layer_rows,
    invert_first_layer,
    invert_first_layer_no_bias,
)
from .geometry import (
    infer_cell_types,
    linkage_ranks,
    match_geometry,
    reconstruct,
    reconstruction_similarity,
)
from .gradients import PrivateGradient, client_gradient, client_update
from .hardened import (
    RelaxedHardenedKey,
    invert_gradient_joint,
    known_plaintext,
    labels_by_frequency,
    recover_relaxed_key,
)
from .inversion import invert_gradient, invert_update, recover_labels
from .membership import reference_model_scores, split_inclusion, true_label_confidence
from .metrics import (
    bootstrap_ci,
    membership_metrics,
    nearest_reference,
    pearson,
    prior_baselines,
    reconstruction_metrics,
)
from .server_view import secure_round_changes
from .utility import (
    embed,
    fresh_model_accuracy,
    knn_labels,
    predict_labels,
    recover_coordinates,
    recover_key_vector,
    scores,
    train_fresh_model,
)

__all__ = [
    "ATTACKS",
    "FAMILIES",
    "NON_CLASSIFIER_ATTACKS",
    "AuditData",
    "AuditSettings",
    "attacks_for",
    "check_attacks",
    "membership_candidates",
    "run_audit",
    "two_sample_scores",
    "wrong_key",
]

logger = logging.getLogger("scinfl")

ATTACKS = ("utility", "key_recovery", "analytic", "inversion", "membership", "geometry")
# A model that is not a classifier (tasks "embedding" and "perturbation"): its utility is label transfer in
# its embedding or its predicted perturbation effects, and the analytic attacks read its own loss's
# gradient. The other families assume a classifier's outputs.
NON_CLASSIFIER_ATTACKS = ("utility", "analytic")
# The geometry family's two server views: one site's single-cell gradients (what a server that saw each
# update would read: the positive control) and what it receives with secure aggregation.
PER_SITE_VIEW = "server, one site's single-cell gradients"
SECURE_SUM_VIEW = "server, secure sum"
WITHOUT_SITE_VIEW = "server, secure sum without the site (control)"
COLUMNS = ["family", "attack", "view", "metric", "mean", "ci_low", "ci_high", "n"]


@dataclass(frozen=True)
class AuditData:
    """The cells of an audit, as tensors over the model's features (aligned by the caller).

    Attributes
    ----------
    members_x, members_y
        Cells the model was trained on (at the audited site): the victims of reconstruction attacks and the
        members of membership inference.
    public_x, public_y
        Cells never used in training, of the same tissue: the attacker's public reference cohort (mean
        profiles, calibration), its labelled auxiliary data (key recovery), and the test set of utility.
    nonmembers_x, nonmembers_y
        Cells of the audited site held out from training: the non-members of membership inference, drawn
        from the members' own distribution. Without them the non-members are public cells, which may
        differ from the members before any model is looked at (another label mix, another site); the
        audit's model-free membership rows measure that difference, and it warns when they leave 0.5.
    """

    members_x: Tensor
    members_y: Tensor
    public_x: Tensor
    public_y: Tensor
    nonmembers_x: Tensor | None = None
    nonmembers_y: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.nonmembers_x is None) != (self.nonmembers_y is None):
            raise ValueError("Pass both nonmembers_x and nonmembers_y, or neither.")

    @property
    def n_features(self) -> int:
        return self.members_x.shape[1]


@dataclass(frozen=True)
class AuditSettings:
    """Sizes of the audit. The defaults make a full audit; tests use small ones."""

    n_victims: int = 32
    seeds: Sequence[int] = (0, 1, 2)
    n_wrong_keys: int = 10
    inversion_victims: int = 8
    inversion_batches: Sequence[int] = (8, 32)
    inversion_steps: int = 300
    inversion_restarts: int = 2
    update_batch: int = 4
    update_local_steps: int = 3
    # Plain SGD steps of the simulated client: at 0.1 its local training diverges (the update then carries
    # nothing and the positive control fails); 0.001 is stable for plain and keyed networks.
    update_lr: float = 0.001
    aux_fraction: float = 0.1
    key_recovery_steps: int = 300
    fresh_model_epochs: int = 60
    membership_reference_models: int = 4
    membership_reference_epochs: int = 30
    n_boot: int = 1000
    # For a model trained with DP-SGD: what its clients do to every gradient they send.
    private: PrivateGradient | None = None
    # The geometry family: victims per seed (the attack reads their leaks together), consecutive secure
    # rounds whose sums the server pools, and how the audited run trained: its sites' local fit, and the
    # smallest cohort a secure round sums (the audited site and cohort - 1 stand-in sites).
    geometry_victims: int = 200
    geometry_pool: int = 1000
    secure_rounds: int = 3
    fit: FitSettings = dataclasses.field(default_factory=FitSettings)
    cohort: int = 3


def wrong_key(key: FederationKey | None, seed: int, index: int) -> FederationKey:
    """A key from the same distribution as ``FederationKey.generate()``, reproducible from (seed, index).

    SHA-256 output is uniformly distributed, as are the bytes of ``secrets``: this is a wrong key drawn
    from the same generator, only named so that the audit can be repeated.
    """
    scheme = "infl" if key is None else key.scheme
    secret = hashlib.sha256(f"scinfl/audit/wrong-key/{seed}/{index}".encode()).digest()
    return FederationKey(secret, scheme=scheme)


def _material(key: FederationKey | None, network: nn.Module):
    """What ``key`` gives ``network``, on the network's device."""
    if key is None or not isinstance(network, KeyedModule):
        return None
    return key_on(key_material(key, network), module_device(network))


def _views(network: nn.Module, key: FederationKey | None, seed: int) -> dict[str, Tensor | None]:
    """Attacker views: what each attacker runs the keyed network with."""
    if not isinstance(network, KeyedModule):
        return {"server": None}
    return {
        "server (no key)": None,
        "server (wrong key)": _material(wrong_key(key, seed, 10_000), network),
        "right key (positive control)": _material(key, network),
    }


def _task_linear_names(network: nn.Module) -> tuple[str, str]:
    """Parameter-name prefixes of the first and the last linear layer of the task network."""
    inner, prefix = (network.network, "network.") if isinstance(network, KeyedModule) else (network, "")
    names = [name for name, module in inner.named_modules() if isinstance(module, nn.Linear)]
    return prefix + names[0], prefix + names[-1]


@dataclass(frozen=True)
class _InputPart:
    """One layer that reads raw input features, and those features as the layer reads them.

    A task network has one (its first linear layer, reading every column). A multi-omics mosaic network
    has one per modality (:attr:`scinfl.nn.MosaicAutoencoder.input_layers`): its encoder's first layer reads
    that modality's columns, transformed (``log1p`` or CLR for counts), and the attack is measured against
    the transformed values, which determine the counts.
    """

    suffix: str  # appended to attack names ("" for a single input layer)
    layer: str  # parameter-name prefix
    members: np.ndarray
    public: np.ndarray

    @cached_property
    def public_mean(self) -> np.ndarray:
        return self.public.mean(0)

    @cached_property
    def reference(self) -> np.ndarray:
        return np.concatenate([self.members, self.public])


def _input_parts(network: nn.Module, data: AuditData, first_layer: str, profile: slice) -> list[_InputPart]:
    """The layers of ``network`` that read raw input features (see :class:`_InputPart`); a network with
    one reads the cell's ``profile`` columns (not, e.g., the batch flags after them)."""
    members, public = data.members_x, data.public_x
    found = [(name, m) for name, m in network.named_modules() if isinstance(m, MosaicAutoencoder)]
    if not found:
        return [_InputPart("", first_layer, members[:, profile].numpy(), public[:, profile].numpy())]
    prefix, mosaic = found[0]
    prefix = f"{prefix}." if prefix else ""
    parts = []
    for (name, _, likelihood), layer in zip(mosaic.modalities, mosaic.input_layers, strict=True):
        columns = mosaic.modality_slice(name)
        parts.append(
            _InputPart(
                f" [{name}]",
                prefix + layer,
                read_counts(members[:, columns], likelihood).numpy(),
                read_counts(public[:, columns], likelihood).numpy(),
            )
        )
    return parts


class _Examples(dict):
    """Example reconstructions by ``"attack | view"`` (arrays). Compared by identity: pandas compares the
    ``attrs`` of the tables it concatenates, and arrays have no truth value."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__


class _Collector:
    """Per-item values by (family, attack, view, metric), summarised with bootstrap CIs at the end.

    Also keeps one example reconstruction per (attack, view): the first victim of the first seed, so that
    a plot can show a reconstruction against the truth.
    """

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
        self.examples: dict[str, np.ndarray] = {}

    def example(self, attack: str, view: str, victim_profile: np.ndarray, reconstruction: np.ndarray) -> None:
        self.examples.setdefault("truth", victim_profile)
        if np.array_equal(self.examples["truth"], victim_profile):
            self.examples.setdefault(f"{attack} | {view}", reconstruction)

    def add(self, family: str, attack: str, view: str, metrics: dict[str, float]) -> None:
        for metric, value in metrics.items():
            self.values[(family, attack, view, metric)].append(float(value))

    def table(self, n_boot: int) -> pd.DataFrame:
        rows = []
        for (family, attack, view, metric), values in self.values.items():
            mean, low, high = bootstrap_ci(values, n_boot=n_boot)
            n = int(np.count_nonzero(~np.isnan(values)))
            rows.append((family, attack, view, metric, mean, low, high, n))
        table = pd.DataFrame(rows, columns=COLUMNS)
        table.attrs["examples"] = _Examples(self.examples)
        return table


_RECONSTRUCTION_METRICS = (
    "mse",
    "nmse",
    "pearson",
    "spearman",
    "pearson_minus_mean",
    "top50_overlap",
    "reidentified",
)


def _keep(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in _RECONSTRUCTION_METRICS}


class _Context:
    """Everything an attack needs, computed once per audit."""

    def __init__(
        self,
        network,
        config: ModelConfig,
        view: AuditView,
        data: AuditData,
        key: FederationKey | None,
        settings: AuditSettings,
    ):
        # The attacks compute on the accelerator: the network is copied there (the caller's stays where
        # it is); the cells stay on the CPU and go to the device where the network reads them.
        self.device = resolve_device()
        if module_device(network) != self.device:
            network = copy.deepcopy(network).to(self.device)
        self.network = network
        self.config = config
        self.data = data
        self.key = key
        self.settings = settings
        self.view = view
        self.right = _material(key, network)
        # The columns of a row with the cell's own values, what reconstruction attacks are after (for a
        # perturbation model, the observed profile, not the control profile it reads).
        self.profile = view.profile
        public = data.public_x[:, self.profile]
        self.public_mean = public.mean(0).numpy()
        public_y = data.public_y.numpy()
        self.celltype_means = {
            int(c): public[torch.from_numpy(public_y == c)].mean(0).numpy() for c in np.unique(public_y)
        }
        self.reference = torch.cat([data.members_x[:, self.profile], public]).numpy()
        # Membership inference's model-free scores, per seed: (attack, auc, members, non-members).
        self.model_free: list[tuple[str, float, int, int]] = []
        self.first_layer, self.last_layer = _task_linear_names(network)
        self.parts = _input_parts(network, data, self.first_layer, self.profile)
        # What a client's gradient is of: the task's training loss.
        self.objective = view.objective
        self.classifier = view.output == "classes"

    def predict(self, material) -> np.ndarray:
        """The public cells' labels under one key view: a classifier's predictions, or for a model without
        classes, label transfer from the labelled training cells embedded in the same view (15 neighbours)."""
        if self.classifier:
            return predict_labels(self.network, self.data.public_x, key_material=material)
        reference = embed(self.network, self.data.members_x, key_material=material)
        query = embed(self.network, self.data.public_x, key_material=material)
        return knn_labels(reference, self.data.members_y.numpy(), query)

    def metrics(
        self,
        reconstructed: np.ndarray,
        victim: int,
        *,
        scale_invariant: bool = False,
        part: _InputPart | None = None,
    ) -> dict[str, float]:
        """Reconstruction metrics against the victim's input (or the columns ``part`` reads)."""
        label = int(self.data.members_y[victim])
        if part is None:
            truth, public_mean, reference = (
                self.data.members_x[victim, self.profile].numpy(),
                self.public_mean,
                self.reference,
            )
            celltype_mean = self.celltype_means.get(label)
        else:
            truth, public_mean, reference = part.members[victim], part.public_mean, part.reference
            celltype_mean = _celltype_mean(part.public, self.data.public_y.numpy(), label)
        return _keep(
            reconstruction_metrics(
                reconstructed,
                truth,
                public_mean=public_mean,
                celltype_mean=celltype_mean,
                reference=reference,
                victim_index=victim,
                scale_invariant=scale_invariant,
            )
        )


def _utility(ctx: _Context, out: _Collector, seed: int) -> None:
    y = ctx.data.public_y.numpy()
    net = ctx.network
    name = "accuracy" if ctx.classifier else "kNN label transfer"
    if not isinstance(net, KeyedModule):
        out.add("utility", name, "server", scores(y, ctx.predict(None)))
    else:
        out.add("utility", name, "right key", scores(y, ctx.predict(ctx.right)))
        out.add("utility", name, "no key", scores(y, ctx.predict(None)))
        for i in range(ctx.settings.n_wrong_keys):
            guess = _material(wrong_key(ctx.key, seed, i), net)
            out.add("utility", name, "wrong key", scores(y, ctx.predict(guess)))
            bit = int(np.random.default_rng([seed, i]).integers(0, 256))
            flipped = _material(ctx.key.with_bit_flipped(bit), net)
            out.add("utility", name, "one-bit flip", scores(y, ctx.predict(flipped)))
    if not ctx.classifier:
        # What the labelled cells give without any model: label transfer on the input profiles themselves.
        raw = knn_labels(ctx.data.members_x.numpy(), ctx.data.members_y.numpy(), ctx.data.public_x.numpy())
        out.add("utility", name, "input profiles (no model)", scores(y, raw))
    counts = np.bincount(y)
    out.add(
        "utility",
        name,
        "chance",
        {"accuracy": counts.max() / counts.sum(), "balanced_accuracy": 1.0 / np.count_nonzero(counts)},
    )


def _key_recovery(ctx: _Context, out: _Collector, seed: int) -> None:
    if not isinstance(ctx.network, KeyedModule):
        return
    rng = np.random.default_rng([seed, 0xA0C])
    x, y = ctx.data.public_x, ctx.data.public_y
    n_total = len(ctx.data.members_x) + len(x)
    n_aux = max(2, min(len(x) // 2, round(ctx.settings.aux_fraction * n_total)))
    order = rng.permutation(len(x))
    aux, test = order[:n_aux], order[n_aux:]
    y_test = y[test].numpy()
    steps = ctx.settings.key_recovery_steps
    start = _material(wrong_key(ctx.key, seed, 20_000), ctx.network)
    if isinstance(ctx.network, HardenedNetwork):
        # The continuous relaxation holds the true key: a dense map before every layer and after the last.
        for name, init in (
            ("from identity", RelaxedHardenedKey.identity(ctx.network)),
            ("from a wrong key", RelaxedHardenedKey.from_key(ctx.network, start)),
        ):
            relaxed = recover_relaxed_key(ctx.network, x[aux], y[aux], init=init, steps=steps)
            out.add(
                "key recovery",
                f"fit dense key maps {name} ({n_aux} labelled cells)",
                "server",
                scores(y_test, predict_labels(ctx.network, x[test], key_material=relaxed)),
            )
    else:
        key_dim = ctx.network.key_encoder.key_dim
        k = recover_key_vector(ctx.network, x[aux], y[aux], init=torch.zeros(key_dim), steps=steps)
        out.add(
            "key recovery",
            f"fit key vector ({n_aux} labelled cells)",
            "server",
            scores(y_test, predict_labels(ctx.network, x[test], key_vector=k)),
        )
        coords = recover_coordinates(ctx.network, x[aux], y[aux], init=start, steps=steps)
        out.add(
            "key recovery",
            f"fit coordinates ({n_aux} labelled cells)",
            "server",
            scores(y_test, predict_labels(ctx.network, x[test], key_material=coords)),
        )
    acc, bal = fresh_model_accuracy(
        ctx.config, x[aux], y[aux], x[test], y_test, epochs=ctx.settings.fresh_model_epochs, seed=seed
    )
    out.add(
        "key recovery",
        f"fresh model on the same {n_aux} cells",
        "no weights",
        {"accuracy": acc, "balanced_accuracy": bal},
    )
    out.add(
        "key recovery",
        "right key (reference)",
        "right key (positive control)",
        scores(y_test, predict_labels(ctx.network, x[test], key_material=ctx.right)),
    )


def _victims(ctx: _Context, seed: int, n: int) -> np.ndarray:
    """The first ``n`` victims of this seed's order: every attack of a seed starts with the same victims."""
    order = np.random.default_rng([seed, 0x71C]).permutation(len(ctx.data.members_x))
    return order[:n]


def _celltype_mean(public: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray | None:
    chosen = labels == label
    return public[chosen].mean(0) if chosen.any() else None


def _add_priors(ctx: _Context, out: _Collector, victim: int, part: _InputPart) -> None:
    """What an attacker has for free against one victim: the public mean profile, and the public mean
    profile of the victim's cell type (rows ``prior``, view ``free``)."""
    single = len(ctx.parts) == 1
    label = int(ctx.data.members_y[victim])
    priors = prior_baselines(
        part.members[victim],
        public_mean=ctx.public_mean if single else part.public_mean,
        celltype_mean=ctx.celltype_means.get(label)
        if single
        else _celltype_mean(part.public, ctx.data.public_y.numpy(), label),
        reference=ctx.reference if single else part.reference,
        victim_index=victim,
    )
    out.add("prior", f"public mean profile{part.suffix}", "free", _keep(priors["public_mean"]))
    out.add("prior", f"cell-type mean profile{part.suffix}", "free", _keep(priors["celltype_mean"]))


def _analytic(ctx: _Context, out: _Collector, seed: int) -> None:
    for part in ctx.parts:
        _analytic_part(ctx, out, seed, part)


def _analytic_part(ctx: _Context, out: _Collector, seed: int, part: _InputPart) -> None:
    """The analytic attacks on one layer that reads raw features (every task network has at least one)."""
    victims = _victims(ctx, seed, ctx.settings.n_victims)
    weight, bias = f"{part.layer}.weight", f"{part.layer}.bias"
    single = len(ctx.parts) == 1

    def metrics(estimate: np.ndarray, victim: int, **kwargs) -> dict[str, float]:
        return ctx.metrics(estimate, victim, part=None if single else part, **kwargs)

    leaked = []
    for victim in victims:
        x = ctx.data.members_x[victim : victim + 1]
        y = ctx.data.members_y[victim : victim + 1]
        grads = client_gradient(
            ctx.network, x, y, key_material=ctx.right, private=ctx.settings.private, task=ctx.objective
        )
        # The server needs no key: it reads the first layer's gradient (what the client sent).
        if not torch.any(grads[bias]):
            continue  # no unit of the first layer was active: nothing leaks from it for this cell
        estimate = invert_first_layer(grads[weight], grads[bias])
        leaked.append((victim, estimate))
        truth = part.members[victim]
        out.example(f"first layer (dW / db){part.suffix}", "server", truth, _fit_scale(estimate, truth))
        out.add(
            "analytic",
            f"first layer (dW / db){part.suffix}",
            "server",
            metrics(estimate, victim, scale_invariant=True),
        )
        no_bias = invert_first_layer_no_bias(grads[weight])
        out.add(
            "analytic",
            f"first layer, no bias{part.suffix}",
            "server",
            metrics(no_bias, victim, scale_invariant=True),
        )
        _add_priors(ctx, out, int(victim), part)
    public = part.public
    # Calibration needs several leaked vectors: from the first 8 victims' updates, and from all of them.
    for n_leaked in sorted({min(8, len(leaked)), len(leaked)}):
        if n_leaked < 3:
            continue
        subset = leaked[:n_leaked]
        matrix = np.stack([estimate for _, estimate in subset])
        for name, calibrated in (
            (
                f"first layer + gain/offset calibration ({n_leaked} leaked){part.suffix}",
                calibrate_gain_offset(matrix, public),
            ),
            (
                f"first layer + principal-axes calibration ({n_leaked} leaked){part.suffix}",
                calibrate_principal_axes(matrix, public),
            ),
        ):
            for (victim, _), row in zip(subset, calibrated, strict=True):
                out.add("analytic", name, "server", metrics(row, victim))
    n_known = 8
    if len(leaked) > n_known:
        # Known plaintext: the attacker knows the profiles of the first 8 victims (say, cells it planted)
        # and reconstructs the others from their leaked vectors.
        known = [victim for victim, _ in leaked[:n_known]]
        rebuilt = known_plaintext(
            np.stack([estimate for _, estimate in leaked[n_known:]]),
            np.stack([estimate for _, estimate in leaked[:n_known]]),
            part.members[known],
        )
        for (victim, _), row in zip(leaked[n_known:], rebuilt, strict=True):
            out.add(
                "analytic",
                f"first layer + {n_known} known plaintext cells{part.suffix}",
                "server",
                metrics(row, victim),
            )


def _linkage(rank: int | None, n_pool: int) -> dict[str, float]:
    """Linkage figures of one victim whose own cell ranked ``rank`` in a pool of ``n_pool`` cells, beside
    chance; ``rank=None`` gives a random ranking's expected values (the prior)."""
    chance_rr = float(np.sum(1.0 / np.arange(1, n_pool + 1)) / n_pool)
    top1, reciprocal = (1.0 / n_pool, chance_rr) if rank is None else (float(rank == 1), 1.0 / rank)
    return {
        "top1": top1,
        "top1_x_chance": top1 * n_pool,
        "reciprocal_rank": reciprocal,
        "mrr_x_chance": reciprocal / chance_rr,
    }


def _geometry(ctx: _Context, out: _Collector, seed: int) -> None:
    """Geometry matching of many leaked vectors together, keyless (:mod:`scinfl.privacy.geometry`), in
    two server views of the same victims.

    The public cells are split at random in two halves: the attacker's cohort (what it matches against,
    its labels and mean profiles) and the stand-in sites, ``cohort - 1`` of them, that share the audited
    site's secure rounds.

    ``server, one site's single-cell gradients`` (the positive control: what a server reads when it sees
        each update, and the worst case of ``secure_aggregation=False``). Each victim's first-layer leak
        ``dW / db``; the set is coupled with the attacker's cohort by entropic Gromov-Wasserstein. Per
        victim: its inferred cell type, its reconstruction (the coupling-weighted public profiles), and
        the rank of its own cell in a pool of true profiles that holds it (members and the attacker's
        cohort), by the coupling of the leaked set with the pool.
    ``server, secure sum``
        What the server decodes with secure aggregation (:func:`~scinfl.privacy.server_view.secure_round_changes`):
        each round's change of the global weights, after a real local fit at the audited site (its
        audited cells) and the stand-ins, over ``secure_rounds`` rounds from the trained weights. Every
        active row of the first layer's change is a vector (a mixture of the round's cells); they are
        coupled with the attacker's cohort and with the pool. None belongs to one cell, so the attacker's
        guess for any victim is one for the whole site: the most frequent inferred cell type, and any of
        the reconstructions (its figures are their mean over the reconstructions); the pool is ranked by
        each cell's largest share of a vector's coupling. Beside
        them, an oracle that picks for each victim the best of all reconstructions (an upper bound),
        against the same oracle over the public cell-type means, and over the reconstructions of
        ``server, secure sum without the site (control)``: the same rounds with the stand-ins alone, sums
        that hold none of the victims (what a best of that many reconstructions reaches by chance).

    A DP-SGD model's per-site leaks are clipped and noised as its clients'; its secure rounds are not
    (an upper bound on what the sum reveals).
    """
    s = ctx.settings
    n_public = len(ctx.data.public_x)
    n_stand_ins = max(s.cohort, 2) - 1
    if n_public < 2 * max(4, 2 * n_stand_ins):
        raise ValueError(
            f"The geometry attacks split the public cells between the attacker's cohort and "
            f"{n_stand_ins} stand-in site(s); {n_public} public cells are too few."
        )
    order = np.random.default_rng([seed, 0x6E0]).permutation(n_public)
    attacker, stand_in = np.sort(order[: n_public // 2]), np.sort(order[n_public // 2 :])
    cohort = [(ctx.data.members_x, ctx.data.members_y)] + [
        (ctx.data.public_x[rows], ctx.data.public_y[rows]) for rows in np.array_split(stand_in, n_stand_ins)
    ]
    # the rounds with the audited site, and the control's without it (a lone stand-in sums with itself)
    changes, without_site = (
        secure_round_changes(
            ctx.network,
            sites,
            objective=ctx.objective,
            fit=s.fit,
            key_material=ctx.right,
            rounds=s.secure_rounds,
            seed=seed,
        )
        for sites in (cohort, cohort[1:] if len(cohort) > 2 else cohort[1:] * 2)
    )
    victims = _victims(ctx, seed, s.geometry_victims)
    for part in ctx.parts:
        _geometry_part(ctx, out, seed, part, attacker, changes, without_site, victims)


def _geometry_part(
    ctx: _Context,
    out: _Collector,
    seed: int,
    part: _InputPart,
    attacker: np.ndarray,
    changes: list[dict[str, Tensor]],
    without_site: list[dict[str, Tensor]],
    victims: np.ndarray,
) -> None:
    s = ctx.settings
    suffix, single = part.suffix, len(ctx.parts) == 1
    public, public_y = part.public[attacker], ctx.data.public_y.numpy()[attacker]
    members_y = ctx.data.members_y.numpy()
    classes, counts = np.unique(public_y, return_counts=True)
    majority = classes[np.argmax(counts)]
    # The linkage pool: every victim, other members and the attacker's cohort (at most geometry_pool).
    rng = np.random.default_rng([seed, 0x9001])
    others = np.setdiff1d(np.arange(len(part.members)), victims)
    n_others = max(0, min(len(others), s.geometry_pool // 2 - len(victims)))
    in_pool = np.concatenate([victims, rng.choice(others, size=n_others, replace=False)])
    n_public_pool = min(len(public), s.geometry_pool - len(in_pool))
    pool = np.concatenate([part.members[in_pool], public[:n_public_pool]])
    pool_row = dict(zip(in_pool.tolist(), range(len(in_pool)), strict=True))
    public_mean = ctx.public_mean if single else part.public_mean
    reference = ctx.reference if single else part.reference  # members first: victim v is row v
    weight, bias = f"{part.layer}.weight", f"{part.layer}.bias"

    def metrics(estimate: np.ndarray, victim: int) -> dict[str, float]:
        return ctx.metrics(estimate, victim, part=None if single else part)

    for victim in victims:
        _add_priors(ctx, out, int(victim), part)
        out.add(
            "prior", f"majority class{suffix}", "free", {"accuracy": float(members_y[victim] == majority)}
        )
        out.add("prior", f"random ranking of the pool{suffix}", "free", _linkage(None, len(pool)))
        out.add("prior", f"a random reference cell{suffix}", "free", {"reidentified": 1.0 / len(reference)})

    view = PER_SITE_VIEW
    leaked, leaked_victims = [], []
    for victim in victims:
        x, y = ctx.data.members_x[victim : victim + 1], ctx.data.members_y[victim : victim + 1]
        grads = client_gradient(
            ctx.network, x, y, key_material=ctx.right, private=s.private, task=ctx.objective
        )
        if torch.any(grads[bias]):  # else no unit was active: nothing leaks from this layer for the cell
            leaked.append(invert_first_layer(grads[weight], grads[bias]))
            leaked_victims.append(int(victim))
    if len(leaked) >= 3:
        leaked = np.stack(leaked)
        coupling = match_geometry(leaked, public, seed=seed)
        predicted, _, _ = infer_cell_types(coupling, public_y)
        estimates = reconstruct(coupling, public)
        ranks = linkage_ranks(match_geometry(leaked, pool, seed=seed), [pool_row[v] for v in leaked_victims])
        for victim, label, estimate, rank in zip(leaked_victims, predicted, estimates, ranks, strict=True):
            out.add("geometry", f"cell type{suffix}", view, {"accuracy": float(label == members_y[victim])})
            out.add("geometry", f"reconstruction{suffix}", view, metrics(estimate, victim))
            out.add("geometry", f"linkage{suffix}", view, _linkage(int(rank), len(pool)))
            out.example(f"geometry{suffix}", view, part.members[victim], estimate)

    view = SECURE_SUM_VIEW
    vectors = np.concatenate([first_layer_rows(change[weight], change[bias]) for change in changes])
    if len(vectors) < 3:
        return
    coupling = match_geometry(vectors, public, seed=seed)
    # No vector is one cell's, so the attacker's guess for any victim is one for the whole site: the most
    # frequent cell type of the vectors (each by its largest coupling mass; the mass summed over vectors
    # is the public composition, fixed by the coupling's marginals), and any of the reconstructions.
    predicted, _, _ = infer_cell_types(coupling, public_y)
    labels, votes = np.unique(predicted, return_counts=True)
    guess = labels[np.argmax(votes)]
    estimates = reconstruct(coupling, public)
    similarity = reconstruction_similarity(estimates, part.members[victims], public_mean)
    nearest = nearest_reference(estimates, reference)
    by_pool = match_geometry(vectors, pool, seed=seed)
    pool_scores = (by_pool / by_pool.sum(axis=1, keepdims=True)).max(axis=0)
    ranks = linkage_ranks(
        np.broadcast_to(pool_scores, (len(victims), len(pool))), [pool_row[int(v)] for v in victims]
    )
    type_means = np.stack([public[public_y == c].mean(axis=0) for c in classes])
    oracle_prior = reconstruction_similarity(type_means, part.members[victims], public_mean).max(axis=0)
    # The oracle's control: the same attack on sums that hold none of the victims (the stand-ins alone).
    control = np.concatenate([first_layer_rows(change[weight], change[bias]) for change in without_site])
    oracle_control = reconstruction_similarity(
        reconstruct(match_geometry(control, public, seed=seed), public), part.members[victims], public_mean
    ).max(axis=0)
    for column, (victim, rank) in enumerate(zip(victims, ranks, strict=True)):
        victim = int(victim)
        out.add("geometry", f"cell type{suffix}", view, {"accuracy": float(guess == members_y[victim])})
        out.add(
            "geometry",
            f"reconstruction{suffix}",
            view,
            {
                "pearson_minus_mean": float(similarity[:, column].mean()),
                "reidentified": float(np.mean(nearest == victim)),
            },
        )
        out.add("geometry", f"linkage{suffix}", view, _linkage(int(rank), len(pool)))
        out.add(
            "geometry",
            f"best of all reconstructions (oracle){suffix}",
            view,
            {"pearson_minus_mean": float(similarity[:, column].max())},
        )
        out.add(
            "prior",
            f"best of the cell-type mean profiles (oracle){suffix}",
            "free",
            {"pearson_minus_mean": float(oracle_prior[column])},
        )
        out.add(
            "geometry",
            f"best of all reconstructions (oracle){suffix}",
            WITHOUT_SITE_VIEW,
            {"pearson_minus_mean": float(oracle_control[column])},
        )


def _fit_scale(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """An estimate known up to scale, scaled by least squares for display next to the truth."""
    norm = float(estimate @ estimate)
    return estimate * (float(estimate @ truth) / norm) if norm > 0 else estimate


def _matched(ctx: _Context, reconstructed: Tensor, victims: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Pair each reconstruction with a victim (Hungarian assignment on Pearson), as an attacker can't know which."""
    rec = reconstructed.cpu().numpy()
    truth = ctx.data.members_x[victims].numpy()
    similarity = np.array([[np.nan_to_num(pearson(r, t)) for t in truth] for r in rec])
    rows, cols = linear_sum_assignment(-similarity)
    return [(int(victims[c]), rec[r]) for r, c in zip(rows, cols, strict=True)]


def _labels_in_view(positions: Tensor, guess) -> Tensor:
    """Labels from output positions as an attacker with key view ``guess`` reads them.

    A hardened key relabels the output units; its holder (or a guesser) maps positions back through it.
    """
    if isinstance(guess, HardenedKey):
        return torch.argsort(guess.output_order)[positions]
    return positions


def _hardened_inversion(
    ctx: _Context, out: _Collector, seed: int, single: dict[int, dict[str, Tensor]]
) -> None:
    """Adaptive attacks on single-cell gradients that only make sense against ``scheme="hardened"``."""
    s = ctx.settings
    last_bias = f"{ctx.last_layer}.bias"
    positions = np.array([int(recover_labels(g[last_bias], 1)[0]) for g in single.values()])
    truth = ctx.data.members_y[list(single)].numpy()
    # The output units are relabelled by the key: the attacker maps positions to labels by class frequency.
    guessed = labels_by_frequency(positions, ctx.data.public_y.numpy(), ctx.network.layout.n_outputs)
    for correct in guessed == truth:
        out.add("inversion", "label by frequency analysis", "server", {"label_recovered": float(correct)})
    init = RelaxedHardenedKey.identity(ctx.network)
    for (victim, grads), position in zip(single.items(), positions, strict=True):
        rec = invert_gradient_joint(
            ctx.network,
            grads,
            labels=torch.tensor([position]),
            init=init,
            prior_mean=torch.from_numpy(ctx.public_mean),
            steps=s.inversion_steps,
            seed=seed,
        )
        out.add(
            "inversion",
            "gradient, 1 cell, joint with key maps",
            "server",
            ctx.metrics(rec[0].cpu().numpy(), victim),
        )


def _inversion(ctx: _Context, out: _Collector, seed: int) -> None:
    s = ctx.settings
    common = {
        "n_features": ctx.data.n_features,
        "steps": s.inversion_steps,
        "restarts": s.inversion_restarts,
        "prior_mean": torch.from_numpy(ctx.public_mean),
        "seed": seed,
    }
    last_bias = f"{ctx.last_layer}.bias"
    victims = _victims(ctx, seed, max([s.inversion_victims, s.update_batch, *s.inversion_batches]))
    single = {}
    for victim in victims[: s.inversion_victims]:
        x, y = ctx.data.members_x[victim : victim + 1], ctx.data.members_y[victim : victim + 1]
        single[int(victim)] = client_gradient(ctx.network, x, y, key_material=ctx.right, private=s.private)
    if isinstance(ctx.network, HardenedNetwork):
        _hardened_inversion(ctx, out, seed, single)
    for view, guess in _views(ctx.network, ctx.key, seed).items():
        for victim in victims[: s.inversion_victims]:
            x, y = ctx.data.members_x[victim : victim + 1], ctx.data.members_y[victim : victim + 1]
            grads = single[int(victim)]
            labels = _labels_in_view(recover_labels(grads[last_bias], 1), guess)
            out.add(
                "inversion",
                "label from last bias (iDLG)",
                view,
                {"label_recovered": float(labels[0] == y[0])},
            )
            rec = invert_gradient(
                ctx.network, grads, n_samples=1, labels=labels, key_material=guess, **common
            )
            rec = rec.cpu()
            out.add("inversion", "gradient, 1 cell", view, ctx.metrics(rec[0].numpy(), int(victim)))
            out.example("gradient, 1 cell", view, x[0].numpy(), rec[0].numpy())
        for size in s.inversion_batches:
            batch = victims[:size]
            x, y = ctx.data.members_x[batch], ctx.data.members_y[batch]
            grads = client_gradient(ctx.network, x, y, key_material=ctx.right, private=ctx.settings.private)
            labels = _labels_in_view(recover_labels(grads[last_bias], size), guess)
            rec = invert_gradient(
                ctx.network, grads, n_samples=size, labels=labels, key_material=guess, **common
            )
            for victim, row in _matched(ctx, rec, batch):
                out.add("inversion", f"gradient, batch of {size}", view, ctx.metrics(row, victim))
        batch = victims[: s.update_batch]
        x, y = ctx.data.members_x[batch], ctx.data.members_y[batch]
        update = client_update(
            ctx.network,
            x,
            y,
            key_material=ctx.right,
            steps=s.update_local_steps,
            lr=s.update_lr,
            private=s.private,
        )
        mean_gradient = -update[last_bias] / (s.update_local_steps * s.update_lr)
        labels = _labels_in_view(recover_labels(mean_gradient, len(batch)), guess)
        rec = invert_update(
            ctx.network,
            update,
            n_samples=len(batch),
            labels=labels,
            key_material=guess,
            steps_local=s.update_local_steps,
            lr_local=s.update_lr,
            **common,
        )
        attack = f"update, {s.update_local_steps} local steps, batch of {len(batch)}"
        for victim, row in _matched(ctx, rec, batch):
            out.add("inversion", attack, view, ctx.metrics(row, victim))


def _probabilities(network: nn.Module, key_material: Tensor | None) -> Callable[[Tensor], Tensor]:
    """Class probabilities of a batch, computed where the network is (reference models are trained on
    the accelerator) and returned there."""
    device = module_device(network)
    key_material = key_on(key_material, device)

    def predict_proba(x: Tensor) -> Tensor:
        network.eval()
        with use_key(key_material):
            return torch.softmax(network(to_device(x, device)), dim=1)

    return predict_proba


# Candidates per side (members, non-members) for membership inference.
MEMBERSHIP_CANDIDATES = 250
# Below this many label-matched candidates per side, membership falls back to unmatched draws (the
# model-free label row then shows the difference in label mix).
MIN_MATCHED_CANDIDATES = 20


def membership_candidates(
    members_y: np.ndarray, nonmembers_y: np.ndarray, rng: np.random.Generator, *, cap: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Members and non-members with the same number of cells of every label (at most ``cap`` a side).

    Each label gets the smaller of its two counts, scaled down together to fit ``cap``. When fewer than
    :data:`MIN_MATCHED_CANDIDATES` a side can be matched, the draw is unmatched (``matched=False``).

    Returns
    -------
    (member indices, non-member indices, matched)
    """
    labels = np.intersect1d(members_y, nonmembers_y)
    counts = np.array([min(np.sum(members_y == c), np.sum(nonmembers_y == c)) for c in labels], dtype=int)
    if counts.sum() >= MIN_MATCHED_CANDIDATES:
        counts = np.floor(counts * min(1.0, cap / counts.sum())).astype(int)
        members, nonmembers = [], []
        for label, k in zip(labels, counts, strict=True):
            members.append(rng.choice(np.flatnonzero(members_y == label), size=k, replace=False))
            nonmembers.append(rng.choice(np.flatnonzero(nonmembers_y == label), size=k, replace=False))
        return np.concatenate(members), np.concatenate(nonmembers), True
    n = min(len(members_y), len(nonmembers_y), cap)
    return (
        rng.choice(len(members_y), size=n, replace=False),
        rng.choice(len(nonmembers_y), size=n, replace=False),
        False,
    )


def two_sample_scores(
    x: np.ndarray,
    is_member: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    k: int = 10,
    n_components: int = 20,
) -> np.ndarray:
    """Membership scores from the cells' values alone: how much closer a candidate lies to its ``k``
    nearest members than to its ``k`` nearest non-members (mean Euclidean distances between the
    candidates' first ``n_components`` principal components).

    A two-sample test, not an attack: it needs the answer. Both pools leave out one cell of the
    candidate's label (itself, and a random cell of the other group; of any label if the other group has
    none), so that when membership is unrelated to the values, members and non-members score alike: the
    AUC is then 0.5 up to noise, as when both are label-matched cells of one site.
    """
    rng = np.random.default_rng([seed, 0x2A])
    # Distances between whole profiles are dominated by noise in thousands of features: compare the
    # candidates' principal components instead.
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    u, singular, _ = np.linalg.svd(x, full_matrices=False)
    x = u[:, :n_components] * singular[:n_components]
    squared = (x**2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0.0))
    rows = np.arange(len(x))
    distances[rows, rows] = np.inf
    for i in rows:  # drop a random cell of the other group, of the candidate's label where there is one
        others = np.flatnonzero(is_member != is_member[i])
        alike = others[labels[others] == labels[i]]
        distances[i, rng.choice(alike if len(alike) else others)] = np.inf

    def nearest(columns: np.ndarray) -> np.ndarray:
        near = min(k, len(columns) - 1)
        return np.partition(distances[:, columns], near - 1, axis=1)[:, :near].mean(axis=1)

    return nearest(np.flatnonzero(~is_member)) - nearest(np.flatnonzero(is_member))


def _membership(ctx: _Context, out: _Collector, seed: int) -> None:
    """Loss threshold and reference-model attacks (LiRA, RMIA) on the released global model, beside three
    model-free scores that must sit at AUC 0.5.

    Candidates: trained-on cells and never-trained ones (the site's held-out cells when given, else public
    cells), the same number of each label on both sides (at most 250 a side). Reference models are plain
    networks of the same architecture trained by the attacker on random halves of the candidates; the
    attacker cannot train keyed ones under the right key, so this is the strongest attack it can run.
    The model-free scores look at no model: the frequency of a candidate's label among the site's
    trained-on cells, the confidence of an untrained network of the same architecture (it reads the
    cell's values but learned nothing), and a nearest-neighbour two-sample test of the values
    (:func:`two_sample_scores`). Above 0.5 they measure a difference between the two groups that any
    attack would also pick up.
    """
    s = ctx.settings
    data = ctx.data
    rng = np.random.default_rng([seed, 0x313])
    outside_x, outside_y = (
        (data.public_x, data.public_y)
        if data.nonmembers_x is None
        else (data.nonmembers_x, data.nonmembers_y)
    )
    members, nonmembers, matched = membership_candidates(
        data.members_y.numpy(), outside_y.numpy(), rng, cap=MEMBERSHIP_CANDIDATES
    )
    x = torch.cat([data.members_x[members], outside_x[nonmembers]])
    y = torch.cat([data.members_y[members], outside_y[nonmembers]])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]

    def add(attack: str, view: str, values: np.ndarray) -> dict[str, float]:
        metrics = membership_metrics(values[is_member], values[~is_member])
        out.add("membership", attack, view, metrics)
        return metrics

    frequency = np.bincount(data.members_y.numpy(), minlength=int(y.max()) + 1) / len(data.members_y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 0x313)
        untrained = build_network(dataclasses.replace(ctx.config, scheme=None)).eval()
    model_free = {
        "label frequency": frequency[y.numpy()],
        "untrained network": true_label_confidence(_probabilities(untrained, None), x, y),
        "values alone (nearest neighbours)": two_sample_scores(x.numpy(), is_member, y.numpy(), seed=seed),
    }
    for attack, values in model_free.items():
        auc = add(attack, "no model", values)["auc"]
        ctx.model_free.append(
            (attack if matched else f"{attack}, labels unmatched", auc, len(members), len(nonmembers))
        )

    included = split_inclusion(s.membership_reference_models, len(x), seed=seed)
    reference = []
    for k in range(s.membership_reference_models):
        chosen = torch.from_numpy(included[k])
        model = train_fresh_model(
            ctx.config, x[chosen], y[chosen], epochs=s.membership_reference_epochs, seed=seed * 1000 + k
        )
        reference.append(true_label_confidence(_probabilities(model, None), x, y))
    reference = np.stack(reference)
    names = {"lira_online": "LiRA (online)", "lira_offline": "LiRA (offline)", "rmia": "RMIA"}
    for view, guess in _views(ctx.network, ctx.key, seed).items():
        target = true_label_confidence(_probabilities(ctx.network, guess), x, y)
        scored = {"loss threshold": np.log(np.maximum(target, np.finfo(np.float64).tiny))}
        scored |= {names[k]: v for k, v in reference_model_scores(target, reference, included).items()}
        for attack, values in scored.items():
            add(attack, view, values)


def _warn_unless_model_free_at_chance(ctx: _Context) -> None:
    """Warn when a model-free membership score separates members from non-members beyond chance: more
    than 4 standard errors of an AUC under no difference (Mann-Whitney; the nearest-neighbour score varies
    up to 1.4 times more), averaged over seeds."""
    by_attack: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for attack, auc, n_members, n_nonmembers in ctx.model_free:
        by_attack[attack].append((auc, n_members, n_nonmembers))
    for attack, rows in by_attack.items():
        auc, n1, n2 = (float(np.mean(column)) for column in zip(*rows, strict=True))
        standard_error = np.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
        if abs(auc - 0.5) > 4 * standard_error:
            cause = (
                "labels could not be matched between members and non-members"
                if "unmatched" in attack
                else "the non-members are not cells of the trained-on site"
                if ctx.data.nonmembers_x is None
                else "the held-out cells differ from the trained-on ones (another batch, another split)"
            )
            warn(
                f"Membership inference: the model-free score '{attack}' separates members from "
                f"non-members at AUC {auc:.2f} (0.5 expected, standard error {standard_error:.2f}), so the "
                f"membership rows measure that difference as well as the model. Likely cause: {cause}. "
                "Pass the site's held-out cells (scinfl.tl.privacy_audit(..., site=) or nonmembers=)."
            )


_FAMILIES: dict[str, Callable[[_Context, _Collector, int], None]] = {
    "utility": _utility,
    "key_recovery": _key_recovery,
    "analytic": _analytic,
    "inversion": _inversion,
    "membership": _membership,
    "geometry": _geometry,
}


def _perturbation_changes(
    ctx: _Context, x: Tensor, y: Tensor, predicted: np.ndarray | None
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per condition (perturbation and covariates) with 2 or more cells: the observed mean change from
    the control profile the cells read, and the predicted one (None without ``predicted``)."""
    view = ctx.view
    x = x.numpy()
    _, group = np.unique(x[:, view.condition], axis=0, return_inverse=True)
    out = []
    for g in np.unique(group.reshape(-1)):
        rows = np.flatnonzero(group.reshape(-1) == g)
        if len(rows) < 2:
            continue
        control = x[rows, view.control].mean(0)
        change = None if predicted is None else predicted[rows].mean(0) - control
        out.append((x[rows, view.profile].mean(0) - control, change))
    return out


def _predicted_profiles(ctx: _Context, x: Tensor, material) -> np.ndarray:
    with torch.no_grad(), use_key(material):
        return ctx.network(x).numpy()


def _perturbation_utility(ctx: _Context, out: _Collector, seed: int) -> None:
    """Pearson delta of the public cells' conditions under each key view, and without a model."""
    x, y = ctx.data.public_x, ctx.data.public_y
    name = "Pearson delta"

    def add(view: str, material) -> None:
        for observed, predicted in _perturbation_changes(ctx, x, y, _predicted_profiles(ctx, x, material)):
            out.add("utility", name, view, {"pearson_delta": pearson(predicted, observed)})

    if not isinstance(ctx.network, KeyedModule):
        add("server", None)
    else:
        add("right key", ctx.right)
        add("no key", None)
        for i in range(ctx.settings.n_wrong_keys):
            add("wrong key", _material(wrong_key(ctx.key, seed, i), ctx.network))
            bit = int(np.random.default_rng([seed, i]).integers(0, 256))
            add("one-bit flip", _material(ctx.key.with_bit_flipped(bit), ctx.network))
    # Without a model: the mean change of the trained-on cells' perturbed conditions, for every condition.
    members = _perturbation_changes(ctx, ctx.data.members_x, ctx.data.members_y, None)
    mean_change = np.mean([observed for observed, _ in members], axis=0)
    for observed, _ in _perturbation_changes(ctx, x, y, None):
        out.add("utility", name, "mean change (no model)", {"pearson_delta": pearson(mean_change, observed)})


def _perturbation_analytic(ctx: _Context, out: _Collector, seed: int) -> None:
    """What one cell's gradient gives the server: its perturbation from the first layer (whose inputs are
    the condition, not the cell), and its profile from the output layer's bias gradient, which for a mean
    squared error over ``n`` features is ``2 (prediction - profile) / n``."""
    view = ctx.view
    n = view.profile.stop  # the observed profile's width; the first layer reads the columns after it
    label = slice(view.label.start - n, view.label.stop - n)  # the label's one-hot in the first layer's input
    victims = _victims(ctx, seed, ctx.settings.n_victims)
    weight, bias = f"{ctx.first_layer}.weight", f"{ctx.first_layer}.bias"
    residuals = []
    for victim in victims:
        x = ctx.data.members_x[victim : victim + 1]
        y = ctx.data.members_y[victim : victim + 1]
        truth = x[0, :n].numpy()
        grads = client_gradient(
            ctx.network, x, y, key_material=ctx.right, private=ctx.settings.private, task=ctx.objective
        )
        # The prediction residual: no key needed to read it, only the position of each gene.
        residual = grads[f"{ctx.last_layer}.bias"].numpy() * n / 2
        residuals.append((victim, residual))
        estimate = ctx.public_mean - residual
        out.example("output layer (db)", "server", truth, estimate)
        out.add("analytic", "output layer (db)", "server", ctx.metrics(estimate, victim))
        priors = prior_baselines(
            truth,
            public_mean=ctx.public_mean,
            celltype_mean=ctx.celltype_means.get(int(y)),
            reference=ctx.reference,
            victim_index=int(victim),
        )
        out.add("prior", "public mean profile", "free", _keep(priors["public_mean"]))
        out.add("prior", "perturbation mean profile", "free", _keep(priors["celltype_mean"]))
        if torch.any(grads[bias]):
            # The first layer's input, [control profile | perturbation | covariates], read from dW / db.
            inputs = invert_first_layer(grads[weight], grads[bias])
            guess = int(np.argmax(inputs[label]))
            out.add(
                "analytic",
                "first layer (dW / db): perturbation",
                "server",
                {"accuracy": float(guess == int(y))},
            )
            # With that input the server runs the model itself and subtracts the residual (no key).
            row = torch.from_numpy(np.concatenate([np.zeros(n), inputs]).astype(np.float32))[None]
            predicted = _predicted_profiles(ctx, row, None)[0]
            out.add(
                "analytic",
                "output layer (db) + first-layer input",
                "server",
                ctx.metrics(predicted - residual, victim),
            )
    if len(residuals) >= 3:
        # Against a secret order of the outputs: match positions to genes by rank of variance, the leaked
        # residuals' against the public cells' (a gene's spread grows with its expression).
        matrix = np.stack([residual for _, residual in residuals])
        public = ctx.data.public_x[:, ctx.profile].numpy()
        position_of_gene = np.empty(n, dtype=np.int64)
        position_of_gene[np.argsort(public.var(0), kind="stable")] = np.argsort(matrix.var(0), kind="stable")
        for (victim, _), row in zip(residuals, matrix[:, position_of_gene], strict=True):
            out.add(
                "analytic",
                f"output layer + variance alignment ({len(residuals)} leaked)",
                "server",
                ctx.metrics(ctx.public_mean - row, victim),
            )


_PROFILE_FAMILIES: dict[str, Callable[[_Context, _Collector, int], None]] = {
    "utility": _perturbation_utility,
    "analytic": _perturbation_analytic,
}
# The attack families for each kind of model output (scinfl.tasks.AuditView.output).
FAMILIES = {
    "classes": _FAMILIES,
    "embedding": {name: _FAMILIES[name] for name in (*NON_CLASSIFIER_ATTACKS, "geometry")},
    "profile": _PROFILE_FAMILIES,
}


def attacks_for(view: AuditView) -> tuple[str, ...]:
    """The attack families that apply to a model with this audit view."""
    return tuple(FAMILIES[view.output])


def check_attacks(view: AuditView, attacks: Sequence[str]) -> None:
    """Raise unless every attack family exists and applies to the model (its audit view)."""
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"Unknown attacks {sorted(unknown)}; available: {', '.join(ATTACKS)}.")
    applicable = attacks_for(view)
    if set(attacks) - set(applicable):
        raise ValueError(
            f"A model whose output is {view.output!r} is audited with {', '.join(map(repr, applicable))} only; "
            f"the other attacks read a classifier's outputs. Pass attacks={applicable!r}."
        )


def run_audit(
    network: nn.Module,
    config: ModelConfig,
    data: AuditData,
    *,
    key: FederationKey | None,
    attacks: Sequence[str] | None = None,
    settings: AuditSettings | None = None,
) -> pd.DataFrame:
    """Run the attacks on a trained network and return one row per (attack, view, metric).

    Parameters
    ----------
    network
        The aggregated network (plain or keyed), as the server holds it.
    config
        Its architecture; its task says what the audit attacks (:meth:`scinfl.tasks.Task.audit_view`).
    data
        Training cells (victims, members) and never-trained cells (public cohort, non-members, test set).
    key
        The federation key (None for a plain model): used to compute what the clients send, and as the
        positive-control view. Attackers other than the positive control never see it.
    attacks
        Attack families to run, among :data:`ATTACKS` (default: every family that applies).
    settings
        Sizes of the audit.

    Returns
    -------
    pandas.DataFrame
        Columns ``family, attack, view, metric, mean, ci_low, ci_high, n`` (95% percentile bootstrap over
        items and seeds).
    """
    view = config.task.audit_view(config)
    attacks = attacks_for(view) if attacks is None else tuple(attacks)
    check_attacks(view, attacks)
    if (key is None) != (config.scheme is None):
        raise ValueError("Pass the model's key for a keyed model and key=None for a plain one.")
    settings = settings or AuditSettings()
    ctx = _Context(network, config, view, data, key, settings)
    out = _Collector()
    was_training = network.training
    network.eval()
    ctx.network.eval()
    steps = [(seed, family) for seed in settings.seeds for family in attacks]
    try:
        for done, (seed, family) in enumerate(steps, start=1):
            started = time.monotonic()
            FAMILIES[view.output][family](ctx, out, seed)
            logger.info(
                "Audit %d of %d: %s, seed %d (%.1f s).",
                done,
                len(steps),
                family,
                seed,
                time.monotonic() - started,
            )
    finally:
        network.train(was_training)
    _warn_unless_model_free_at_chance(ctx)
    return out.table(settings.n_boot)
