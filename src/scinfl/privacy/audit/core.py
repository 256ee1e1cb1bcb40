"""What every attack family of the audit shares: the audit's data and settings, the context an attack
reads (the network on the device, the key views, the victims, the reconstruction metrics), the collector
of per-item values, and the registry of families (:class:`~scinfl.privacy.audit.Family`)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import pkgutil
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ...key import FederationKey
from ...nn import HardenedKey, KeyedModule, MosaicAutoencoder, read_counts, use_key
from ...tasks import AuditView, ModelConfig
from ...train import (
    FitSettings,
    key_material,
    key_on,
    module_device,
    resolve_device,
    settings_from,
)
from ..gradients import PrivateGradient
from ..metrics import (
    bootstrap_ci,
    pearson,
    prior_baselines,
    reconstruction_metrics,
)
from ..utility import (
    embed,
    knn_labels,
    predict_labels,
)

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
    """Sizes of the audit that every family shares, and each family's own settings. The defaults make a
    full audit; tests use small ones.

    Attributes
    ----------
    n_victims
        Training cells attacked per seed (the analytic attacks' victims).
    seeds
        Each family runs once per seed; every figure is a mean over items and seeds.
    n_boot
        Bootstrap resamples of each confidence interval.
    private
        For a model trained with DP-SGD: what its clients do to every gradient they send.
    fit, cohort
        How the audited run trained: its sites' local fit, and the smallest cohort a secure round sums
        (the geometry family's secure rounds: the audited site and ``cohort - 1`` stand-in sites).
    families
        Family name -> its settings (its :attr:`~scinfl.privacy.audit.Family.settings` dataclass, or a dict of its fields),
        e.g. ``{"inversion": {"steps": 50}}``; a family not named runs with its defaults.
    """

    n_victims: int = 32
    seeds: Sequence[int] = (0, 1, 2)
    n_boot: int = 1000
    private: PrivateGradient | None = None
    fit: FitSettings = dataclasses.field(default_factory=FitSettings)
    cohort: int = 3
    families: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        options = {}
        for name, value in dict(self.families).items():
            family = get_family(name)
            if family.settings is None:
                raise ValueError(f"The {name!r} attack family has no settings.")
            options[name] = settings_from(family.settings, value, f"{name!r} audit", "{}")
        object.__setattr__(self, "families", options)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | AuditSettings | None) -> AuditSettings:
        """Settings from a dict of the shared fields and of family names, e.g. ``{"n_victims": 8,
        "seeds": (0,), "inversion": {"steps": 50}}``."""
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise TypeError(
                f"settings must be a dict such as {{'n_victims': 8}}, got {type(values).__name__}."
            )
        shared = {f.name for f in dataclasses.fields(cls)} - {"families"}
        unknown = sorted(set(values) - shared - set(family_names()), key=str)
        if unknown:
            raise ValueError(
                f"Unknown audit setting(s) {unknown}; allowed: {', '.join(sorted(shared))}, and a family's "
                f"settings by its name ({', '.join(n for n in family_names() if get_family(n).settings)})."
            )
        families = {
            **dict(values.get("families", {})),
            **{k: v for k, v in values.items() if k not in shared},
        }
        return cls(**{k: v for k, v in values.items() if k in shared and k != "families"}, families=families)

    def of(self, family: str):
        """``family``'s settings: those given, else its defaults."""
        if family in self.families:
            return self.families[family]
        settings = get_family(family).settings
        return None if settings is None else settings()


Adapter = Callable[["AuditContext", "Collector", int], None]


@dataclass(frozen=True)
class Family:
    """An attack family of the audit: one module of :mod:`scinfl.privacy.audit` registers it.

    Attributes
    ----------
    name
        What ``attacks=`` names it.
    label
        Its rows' ``family`` in the audit table (default: ``name``).
    runs
        Kind of model output (:attr:`scinfl.tasks.AuditView.output`: ``"classes"``, ``"embedding"``,
        ``"profile"``) -> ``adapter(ctx, out, seed)``, which runs the family's attacks for one seed on the
        :class:`~scinfl.privacy.audit.core.AuditContext` and adds their values to the
        :class:`~scinfl.privacy.audit.core.Collector`. A model whose output is
        not named is not audited by this family.
    settings
        A frozen dataclass of the family's own settings with their defaults (``AuditSettings.families``
        overrides them), or None.
    panel
        ``(metric, axis label)`` of its panel in :func:`scinfl.pl.privacy`.
    after
        ``after(ctx)``, run once at the end of an audit that ran the family (a sanity check that warns).
    """

    name: str
    runs: Mapping[str, Adapter]
    panel: tuple[str, str]
    label: str | None = None
    settings: type | None = None
    after: Callable[[AuditContext], None] | None = None

    @property
    def table_name(self) -> str:
        return self.label or self.name


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` available to the audit by its name (a family module calls it when imported)."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a scinfl.privacy.audit.Family, got {type(family).__name__}.")
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"An attack family named {family.name!r} is registered already.")
    _FAMILIES[family.name] = family
    return family


# The built-in families' modules, in the order an audit runs them (and its table lists them); any other
# module of this package is a family too, run after them.
_BUILT_IN = (
    "wrong_keys",
    "key_fitting",
    "first_layer",
    "gradient_inversion",
    "membership_inference",
    "gradient_geometry",
)


def _load_built_in() -> list[str]:
    """Import every module of this package (each family module registers itself); the names of the
    families they register, in their run order."""
    package = __name__.rpartition(".")[0]
    found = [m.name for m in pkgutil.iter_modules(sys.modules[package].__path__) if m.name != "core"]
    modules = [*_BUILT_IN, *sorted(set(found) - set(_BUILT_IN))]
    return [importlib.import_module(f"{package}.{module}").FAMILY.name for module in modules]


def family_names() -> list[str]:
    """Every registered attack family: the package's in their run order, then those registered from
    outside."""
    names = _load_built_in()
    return [*names, *(name for name in _FAMILIES if name not in names)]


def get_family(name: str) -> Family:
    """The attack family called ``name``."""
    _load_built_in()
    if name not in _FAMILIES:
        raise ValueError(f"Unknown attacks [{name!r}]; available: {', '.join(_FAMILIES)}.")
    return _FAMILIES[name]


def wrong_key(key: FederationKey | None, seed: int, index: int) -> FederationKey:
    """A key from the same distribution as ``FederationKey.generate()``, reproducible from (seed, index).

    SHA-256 output is uniformly distributed, as are the bytes of ``secrets``: this is a wrong key drawn
    from the same generator, only named so that the audit can be repeated.
    """
    scheme = "infl" if key is None else key.scheme
    secret = hashlib.sha256(f"scinfl/audit/wrong-key/{seed}/{index}".encode()).digest()
    return FederationKey(secret, scheme=scheme)


def material_of(key: FederationKey | None, network: nn.Module):
    """What ``key`` gives ``network``, on the network's device."""
    if key is None or not isinstance(network, KeyedModule):
        return None
    return key_on(key_material(key, network), module_device(network))


def attacker_views(network: nn.Module, key: FederationKey | None, seed: int) -> dict[str, Tensor | None]:
    """Attacker views: what each attacker runs the keyed network with."""
    if not isinstance(network, KeyedModule):
        return {"server": None}
    return {
        "server (no key)": None,
        "server (wrong key)": material_of(wrong_key(key, seed, 10_000), network),
        "right key (positive control)": material_of(key, network),
    }


def task_linear_names(network: nn.Module) -> tuple[str, str]:
    """Parameter-name prefixes of the first and the last linear layer of the task network."""
    inner, prefix = (network.network, "network.") if isinstance(network, KeyedModule) else (network, "")
    names = [name for name, module in inner.named_modules() if isinstance(module, nn.Linear)]
    return prefix + names[0], prefix + names[-1]


@dataclass(frozen=True)
class InputPart:
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


def input_parts(network: nn.Module, data: AuditData, first_layer: str, profile: slice) -> list[InputPart]:
    """The layers of ``network`` that read raw input features (see ``InputPart``); a network with
    one reads the cell's ``profile`` columns (not, e.g., the batch flags after them)."""
    members, public = data.members_x, data.public_x
    found = [(name, m) for name, m in network.named_modules() if isinstance(m, MosaicAutoencoder)]
    if not found:
        return [InputPart("", first_layer, members[:, profile].numpy(), public[:, profile].numpy())]
    prefix, mosaic = found[0]
    prefix = f"{prefix}." if prefix else ""
    parts = []
    for (name, _, likelihood), layer in zip(mosaic.modalities, mosaic.input_layers, strict=True):
        columns = mosaic.modality_slice(name)
        parts.append(
            InputPart(
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


class Collector:
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


def keep_reconstruction(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in _RECONSTRUCTION_METRICS}


class AuditContext:
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
        self.options = settings.of  # a family's own settings: ctx.options("inversion").steps
        self.view = view
        self.right = material_of(key, network)
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
        self.first_layer, self.last_layer = task_linear_names(network)
        self.parts = input_parts(network, data, self.first_layer, self.profile)
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
        part: InputPart | None = None,
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
            celltype_mean = celltype_mean_of(part.public, self.data.public_y.numpy(), label)
        return keep_reconstruction(
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


def victims_of(ctx: AuditContext, seed: int, n: int) -> np.ndarray:
    """The first ``n`` victims of this seed's order: every attack of a seed starts with the same victims."""
    order = np.random.default_rng([seed, 0x71C]).permutation(len(ctx.data.members_x))
    return order[:n]


def celltype_mean_of(public: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray | None:
    chosen = labels == label
    return public[chosen].mean(0) if chosen.any() else None


def add_priors(ctx: AuditContext, out: Collector, victim: int, part: InputPart) -> None:
    """What an attacker has for free against one victim: the public mean profile, and the public mean
    profile of the victim's cell type (rows ``prior``, view ``free``)."""
    single = len(ctx.parts) == 1
    label = int(ctx.data.members_y[victim])
    priors = prior_baselines(
        part.members[victim],
        public_mean=ctx.public_mean if single else part.public_mean,
        celltype_mean=ctx.celltype_means.get(label)
        if single
        else celltype_mean_of(part.public, ctx.data.public_y.numpy(), label),
        reference=ctx.reference if single else part.reference,
        victim_index=victim,
    )
    out.add("prior", f"public mean profile{part.suffix}", "free", keep_reconstruction(priors["public_mean"]))
    out.add(
        "prior", f"cell-type mean profile{part.suffix}", "free", keep_reconstruction(priors["celltype_mean"])
    )


def fit_scale(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """An estimate known up to scale, scaled by least squares for display next to the truth."""
    norm = float(estimate @ estimate)
    return estimate * (float(estimate @ truth) / norm) if norm > 0 else estimate


def matched(ctx: AuditContext, reconstructed: Tensor, victims: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Pair each reconstruction with a victim (Hungarian assignment on Pearson), as an attacker can't know which."""
    rec = reconstructed.cpu().numpy()
    truth = ctx.data.members_x[victims].numpy()
    similarity = np.array([[np.nan_to_num(pearson(r, t)) for t in truth] for r in rec])
    rows, cols = linear_sum_assignment(-similarity)
    return [(int(victims[c]), rec[r]) for r, c in zip(rows, cols, strict=True)]


def labels_in_view(positions: Tensor, guess) -> Tensor:
    """Labels from output positions as an attacker with key view ``guess`` reads them.

    A hardened key relabels the output units; its holder (or a guesser) maps positions back through it.
    """
    if isinstance(guess, HardenedKey):
        return torch.argsort(guess.output_order)[positions]
    return positions


def perturbation_changes(
    ctx: AuditContext, x: Tensor, y: Tensor, predicted: np.ndarray | None
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


def predicted_profiles(ctx: AuditContext, x: Tensor, material) -> np.ndarray:
    with torch.no_grad(), use_key(material):
        return ctx.network(x).numpy()
