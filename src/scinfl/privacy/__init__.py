"""Measured attacks behind every privacy claim. Pure torch + numpy: no AnnData below ``scinfl.tl``.

Threat model (Kerckhoffs): the attacker knows the code, the architecture, the key-generation procedure and
every aggregated weight, and sees each client's gradient or update (the worst case, without secure
aggregation) or, with it, each round's sum; only the key bytes are secret. A key
holder is an insider: attacks run with the right key are positive controls that prove the attack works.

Modules
-------
metrics
    Reconstruction metrics (MSE, Pearson, Spearman, mean-subtracted Pearson, top-50 gene overlap,
    re-identification) beside prior baselines; membership AUC and TPR at low FPR; bootstrap CIs.
gradients
    What a client sends: its gradient on a batch, or its update after several local steps.
inversion
    Gradient inversion (DLG-style L2, inverting-gradients cosine), label recovery (iDLG), unrolled updates.
analytic
    Analytic first-layer inversion, and calibration attacks against a fixed transform of the input.
geometry
    Keyless reading of many leaked vectors by matching their geometry to a public cohort (entropic
    Gromov-Wasserstein): cell types, reconstructions, linkage of a leaked vector to its own cell.
server_view
    What the server decodes with secure aggregation: rounds of real site fits, masked and summed by the
    federation's own code.
membership
    Loss-threshold and reference-model (LiRA/RMIA-style) membership inference.
utility
    Accuracy under wrong keys, one-bit flips and no key; key recovery vs a fresh model on the same data.
hardened
    Adaptive attacks on ``scheme="hardened"``: its continuous relaxation fitted on labelled cells (key
    recovery) or jointly with a dummy cell (gradient inversion), known plaintext, label frequency analysis.
audit
    Runs the attacks for every attacker view and returns a tidy DataFrame.

Devices: the audit computes on the device of ``scinfl.settings.accelerator``. The attacks run on a copy of
the model's network there (the model's own stays where it is), the cells and key views follow the network
they are fed to, and results come back to the CPU as arrays; the audit's own training (key recovery's
fresh model, membership's reference models, the server view's site fits) runs there too.
"""

from . import (
    analytic,
    audit,
    geometry,
    gradients,
    hardened,
    inversion,
    membership,
    metrics,
    server_view,
    utility,
)

__all__ = [
    "analytic",
    "audit",
    "geometry",
    "gradients",
    "hardened",
    "inversion",
    "membership",
    "metrics",
    "server_view",
    "utility",
]
