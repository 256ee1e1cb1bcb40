"""The analytic family: a single cell's first-layer gradient inverted exactly (``dW / db``), without
the key, then calibrated against the public cohort; a perturbation model's output-layer bias gradient."""

from __future__ import annotations

import numpy as np
import torch

from ..analytic import (
    calibrate_gain_offset,
    calibrate_principal_axes,
    invert_first_layer,
    invert_first_layer_no_bias,
)
from ..gradients import client_gradient
from ..hardened import (
    known_plaintext,
)
from ..metrics import (
    prior_baselines,
)
from .core import (
    AuditContext,
    Collector,
    Family,
    InputPart,
    add_priors,
    fit_scale,
    keep_reconstruction,
    predicted_profiles,
    register_family,
    victims_of,
)


def _analytic(ctx: AuditContext, out: Collector, seed: int) -> None:
    for part in ctx.parts:
        _analytic_part(ctx, out, seed, part)


def _analytic_part(ctx: AuditContext, out: Collector, seed: int, part: InputPart) -> None:
    """The analytic attacks on one layer that reads raw features (every task network has at least one)."""
    victims = victims_of(ctx, seed, ctx.settings.n_victims)
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
        out.example(f"first layer (dW / db){part.suffix}", "server", truth, fit_scale(estimate, truth))
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
        add_priors(ctx, out, int(victim), part)
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


def _perturbation_analytic(ctx: AuditContext, out: Collector, seed: int) -> None:
    """What one cell's gradient gives the server: its perturbation from the first layer (whose inputs are
    the condition, not the cell), and its profile from the output layer's bias gradient, which for a mean
    squared error over ``n`` features is ``2 (prediction - profile) / n``."""
    view = ctx.view
    n = view.profile.stop  # the observed profile's width; the first layer reads the columns after it
    label = slice(view.label.start - n, view.label.stop - n)  # the label's one-hot in the first layer's input
    victims = victims_of(ctx, seed, ctx.settings.n_victims)
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
        out.add("prior", "public mean profile", "free", keep_reconstruction(priors["public_mean"]))
        out.add("prior", "perturbation mean profile", "free", keep_reconstruction(priors["celltype_mean"]))
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
            predicted = predicted_profiles(ctx, row, None)[0]
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


FAMILY = register_family(
    Family(
        "analytic",
        runs={"classes": _analytic, "embedding": _analytic, "profile": _perturbation_analytic},
        panel=("pearson_minus_mean", "Pearson (minus public mean) with the victim"),
    )
)
