"""Tasks, the Lightning training plan, and plain local fit/evaluate functions shared by all engines."""

from .config import ModelConfig, build_network, key_material
from .local import LocalFitResult, TrainingPlan, copy_state, evaluate, fit_local, infer
from .mosaic import MosaicTask
from .site import FitSettings, SiteTrainer, site_datasets
from .tasks import TASKS, ClassificationTask, EmbeddingTask, PerturbationTask, Task, get_task

__all__ = [
    "TASKS",
    "ClassificationTask",
    "EmbeddingTask",
    "FitSettings",
    "LocalFitResult",
    "ModelConfig",
    "MosaicTask",
    "PerturbationTask",
    "SiteTrainer",
    "Task",
    "TrainingPlan",
    "build_network",
    "copy_state",
    "evaluate",
    "fit_local",
    "get_task",
    "infer",
    "key_material",
    "site_datasets",
]
