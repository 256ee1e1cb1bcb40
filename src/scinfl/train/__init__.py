"""Local training, shared by every engine and task: the training plan, fit/evaluate/infer on a device, the site
trainer."""

from .device import (
    autocast,
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
    TrainingPlan,
    copy_state,
    evaluate,
    fit_local,
    fit_plan,
    infer,
    key_on,
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
    "autocast",
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
    "sparse_batches_on",
    "to_device",
]
