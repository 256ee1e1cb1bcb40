"""Local training, shared by every engine and task: the Lightning plan, fit/evaluate/infer, the site trainer."""

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
    make_fabric,
)
from .settings import DPSettings, FitSettings
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
    "infer",
    "key_material",
    "make_fabric",
]
