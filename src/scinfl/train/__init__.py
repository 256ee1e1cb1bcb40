"""Local training, shared by every engine and task: the training plan (a LightningModule), fit/evaluate/infer
on Lightning Fabric, the site trainer.

:class:`TrainingPlan` loads on first use: it imports Lightning, which a Flower ClientApp answering a hello or
a statistics request does not need (docs/benchmarks.md).
"""

from .device import (
    full_precision,
    manual_seed,
    module_device,
    resolve_device,
    resolve_precision,
    seeded_generator,
    sparse_batches_on,
    to_device,
)
from .keys import key_material
from .local import (
    LocalFitResult,
    Objective,
    copy_state,
    evaluate,
    fit_local,
    fit_plan,
    infer,
    key_on,
    site_fabric,
    training_plan,
)
from .settings import DPSettings, FitSettings, settings_from
from .site import SiteTrainer

__all__ = [
    "DPSettings",
    "FitSettings",
    "LocalFitResult",
    "Objective",
    "SiteTrainer",
    "TrainingPlan",
    "copy_state",
    "evaluate",
    "fit_local",
    "fit_plan",
    "full_precision",
    "infer",
    "key_material",
    "key_on",
    "manual_seed",
    "module_device",
    "resolve_device",
    "resolve_precision",
    "seeded_generator",
    "settings_from",
    "site_fabric",
    "sparse_batches_on",
    "to_device",
    "training_plan",
]


def __getattr__(name: str):
    if name == "TrainingPlan":
        from .plan import TrainingPlan

        return TrainingPlan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
