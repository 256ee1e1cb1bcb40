"""One module per task: its options, inputs, network, loss, write-back and audit view (``_base.Task``).

``si.tl.train_federated(sites, key=key, task=si.tasks.Embedding(n_latent=32, likelihood="poisson"))``;
a task name (``task="embedding"``) takes the task's defaults. A new task is one module here, a subclass of
:class:`Task` registered with :func:`register`, and its tests (``docs/architecture.md``).
"""

from ._base import TASKS, AuditView, ModelConfig, Predictions, Task, build_network, get_task, register
from .classification import Classification
from .embedding import Embedding
from .lightning import Lightning
from .mosaic import Mosaic
from .perturbation import Perturbation

__all__ = [
    "TASKS",
    "AuditView",
    "Classification",
    "Embedding",
    "Lightning",
    "ModelConfig",
    "Mosaic",
    "Perturbation",
    "Predictions",
    "Task",
    "build_network",
    "get_task",
    "register",
]
