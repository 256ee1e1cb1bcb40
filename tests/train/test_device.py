"""The accelerator setting, and device bugs caught without a GPU.

:class:`FakeDevice` makes the CPU play a second device: whatever scinfl moves to the device it resolves is
marked, the marks follow every torch operation, and the harness records what a real GPU would refuse: an
operation mixing device tensors with CPU tensors (other than 0-d scalars), ``.numpy()`` on a device
tensor, and random numbers drawn for the device from a generator not made for it
(:func:`scinfl.train.seeded_generator`). The quick-start pipeline then runs under it, so a tensor that leaves a network without an explicit
``.cpu()``, or a CPU tensor made inside a forward pass without ``device=``, fails here and not first on a
user's GPU.
"""

from __future__ import annotations

import hashlib
import os
import traceback

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import scinfl as si
from helpers import FAST
from scinfl import model as model_module
from scinfl.data import SparseRows
from scinfl.privacy import audit as audit_module
from scinfl.privacy.audit import class_probabilities
from scinfl.privacy.audit import core as audit_core
from scinfl.privacy.membership import true_label_confidence
from scinfl.privacy.utility import embed, predict_labels, train_fresh_model
from scinfl.train import device as device_module
from scinfl.train import dp as dp_module
from scinfl.train import local as local_module
from scinfl.train import resolve_device, seeded_generator, to_device
from scinfl.train import site as site_module

# Unequal to torch.device("cpu"), yet tensors moved to it stay CPU tensors: the device scinfl resolves.
FAKE = torch.device("cpu", 0)
_MARK = "_scinfl_on_fake_device"
# Operations that may take a CPU tensor into a device tensor on a real GPU (cross-device copies), and
# nn.Module.to's own check of the tensors it swaps.
_CROSSING = {
    "copy_",
    "to",
    "__set__",
    "set_",
    "cpu",
    "_to_copy",
    "detach",
    "__get__",
    "_has_compatible_shallow_copy_type",
    "__deepcopy__",  # a copy stays on its tensor's device; the memo it is given holds other copies
}


def _on_device(tensor) -> bool:
    return isinstance(tensor, Tensor) and getattr(tensor, _MARK, False)


def _mark(value) -> None:
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, Tensor):
            setattr(leaf, _MARK, True)


def _device_argument(args, kwargs):
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(target, str):
        target = torch.device(target)
    return target if isinstance(target, torch.device) else None


class FakeDevice(TorchFunctionMode):
    """Track device tensors and record what a real second device would refuse (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.device_generators: set[int] = set()  # ids of generators made for the device
        self.sparse_batches = 0  # batches that crossed as SparseRows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        n_before = len(self.problems)
        try:
            return self._torch_function(func, types, args, kwargs or {})
        finally:
            if len(self.problems) > n_before:  # name scinfl's line that made them
                frames = [f for f in traceback.extract_stack() if f"{os.sep}scinfl{os.sep}" in f.filename]
                where = (
                    f" at {frames[-1].filename.rsplit('scinfl', 1)[-1]}:{frames[-1].lineno}" if frames else ""
                )
                self.problems[n_before:] = [problem + where for problem in self.problems[n_before:]]

    def _torch_function(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if func == Tensor.device.__get__ and _on_device(args[0]):
            return FAKE
        tensors = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, Tensor)]
        for tensor in tensors:  # autograd writes .grad outside torch functions: it is where its parameter is
            if _on_device(tensor) and tensor.is_leaf and isinstance(tensor.grad, Tensor):
                setattr(tensor.grad, _MARK, True)
        on_device = [t for t in tensors if _on_device(t)]
        if name == "numpy" and on_device:
            self.problems.append("numpy() of a device tensor (move it with .cpu() first)")
        generator = kwargs.get("generator")
        drawn_on_device = on_device or _device_argument((None,), kwargs) == FAKE
        if generator is not None and drawn_on_device and id(generator) not in self.device_generators:
            self.problems.append(f"{name} draws device numbers from a CPU generator")
        if on_device and name not in _CROSSING:
            stray = [tuple(t.shape) for t in tensors if not _on_device(t) and t.dim() > 0]
            if stray:
                self.problems.append(f"{name} mixes device tensors with CPU tensors of shapes {stray[:3]}")
        out = func(*args, **kwargs)
        if name == "to" or name == "cpu":
            target = torch.device("cpu") if name == "cpu" else _device_argument(args, kwargs)
            if target == FAKE or (target is None and on_device):
                _mark(out)
            elif isinstance(out, Tensor) and _on_device(out):
                # A real move to the CPU makes a new tensor; here it is the same one: a view stands for it.
                out = out.view_as(out)
                setattr(out, _MARK, False)
            return out
        if on_device or kwargs.get("device") == FAKE:
            _mark(out)
        return out


@pytest.fixture
def fake_device(monkeypatch):
    """The device scinfl resolves is FAKE; yields the FakeDevice recorder, active for the test."""
    recorder = FakeDevice()
    for module in (device_module, local_module, site_module, model_module, audit_core):
        monkeypatch.setattr(module, "resolve_device", lambda accelerator=None: FAKE)

    def recorded_generator(seed, device):
        generator = seeded_generator(seed, device)
        if device == FAKE:
            recorder.device_generators.add(id(generator))
        return generator

    monkeypatch.setattr(dp_module, "seeded_generator", recorded_generator)

    for module in (site_module, model_module):  # sparse batches cross as CSR parts, as to a GPU
        monkeypatch.setattr(module, "sparse_batches_on", lambda device: device == FAKE)

    def moved(leaf):
        if isinstance(leaf, SparseRows):
            recorder.sparse_batches += 1
            parts = [part.clone() for part in leaf.parts]
            _mark(parts)
            return leaf.replace(*parts).dense()  # densified on the device, as to_device does
        if isinstance(leaf, Tensor):
            leaf = leaf.clone()
            _mark(leaf)
        return leaf

    def marked_to_device(batch, device):
        if device != FAKE:
            return to_device(batch, device)
        return tree_map(moved, batch)

    monkeypatch.setattr(local_module, "to_device", marked_to_device)
    module_to = nn.Module.to

    def marked_module_to(module, *args, **kwargs):  # a module's parameters and buffers move with it
        moved = module_to(module, *args, **kwargs)
        if _device_argument((module, *args), kwargs) == FAKE:
            for tensor in [*moved.parameters(), *moved.buffers()]:
                setattr(tensor, _MARK, True)
        return moved

    monkeypatch.setattr(nn.Module, "to", marked_module_to)

    def mark_output_gradients(module, grad_input, grad_output):
        # Autograd makes these tensors outside torch functions; backward hooks (Opacus's) receive them.
        if any(_on_device(tensor) for tensor in module.parameters(recurse=False)):
            _mark(grad_output)

    handle = nn.modules.module.register_module_full_backward_hook(mark_output_gradients)
    # Backward hooks run inside loss.backward(), while the mode is off: Opacus's per-cell gradients are
    # computed there, so its hook turns the mode back on.
    capture = GradSampleHooks.capture_backprops_hook

    def tracked_capture(*args, **kwargs):
        with recorder:
            return capture(*args, **kwargs)

    monkeypatch.setattr(GradSampleHooks, "capture_backprops_hook", tracked_capture)
    try:
        with recorder:
            yield recorder
    finally:
        handle.remove()


def test_fake_device_catches_the_bugs_it_is_for(fake_device):
    """Positive controls: the harness flags a CPU tensor added to a network's output and numpy() of it."""
    network = nn.Linear(4, 2).to(FAKE)
    out = network(to_device(torch.ones(3, 4), FAKE))
    assert _on_device(out)
    assert not fake_device.problems
    _ = out + torch.ones(3, 2)  # made without device=: a CUDA error on a GPU
    _ = out.detach().numpy()
    _ = torch.normal(0.0, 1.0, size=(3, 2), device=out.device, generator=torch.Generator())
    assert len(fake_device.problems) == 3, fake_device.problems
    fine = out.detach().cpu().numpy() + torch.ones(3, 2, device=out.device).cpu().numpy()
    assert fine.shape == (3, 2)
    on_device = dp_module.seeded_generator(0, FAKE)
    _ = torch.normal(0.0, 1.0, size=(3, 2), device=out.device, generator=on_device)
    _ = torch.randn(3, 2, generator=torch.Generator()).to(out.device)  # drawn on the CPU, then moved
    assert len(fake_device.problems) == 3, fake_device.problems


def test_quick_start_pipeline_keeps_tensors_on_the_device(fake_device, pbmc_sites):
    """Training, validation, key conversion, predictions and embeddings, with a hardened key and with the
    paper's, run on the device and bring results back explicitly."""
    for scheme in ("hardened", "infl"):
        key = si.FederationKey(hashlib.sha256(f"device {scheme}".encode()).digest(), scheme=scheme)
        sites = {name: adata.copy() for name, adata in pbmc_sites.items()}
        model = si.tl.train_federated(sites, key=key, label_key="bulk_labels", rounds=2, seed=0)
        adata = sites["site_0"]
        si.tl.predict(adata, model, key=key)
        assert "scinfl_prediction" in adata.obs
        assert "X_scinfl" in adata.obsm
    assert fake_device.sparse_batches > 0  # .raw.X is CSR: batches crossed sparse and were densified there
    assert not fake_device.problems, sorted(set(fake_device.problems))[:5]


def test_site_aware_embedding_on_the_device(fake_device, pbmc_sites):
    """The embedding's per-batch statistics and shifts, and a new site mapped onto the model."""
    key = si.FederationKey(hashlib.sha256(b"device embedding").digest())
    sites = {name: adata.copy() for name, adata in pbmc_sites.items()}
    query = sites["site_2"].copy()
    task = si.tasks.Embedding(site_effects=True, hidden=32, n_latent=8)
    model = si.tl.train_federated(sites, key=key, task=task, rounds=2, seed=0)
    si.tl.map_site(query, model, key=key, site="new site", epochs=1)
    assert "X_scinfl" in query.obsm
    assert not fake_device.problems, sorted(set(fake_device.problems))[:5]


def test_private_training_on_the_device(fake_device, pbmc_sites):
    """DP-SGD: Opacus's per-cell gradients and its noise, drawn on the device with a generator made there."""
    sites = {name: adata.copy() for name, adata in pbmc_sites.items()}
    model = si.tl.train_federated(sites, key=None, dp={"epsilon": 8.0}, **FAST | {"rounds": 1})
    assert model.params["dp"]["spent_epsilon"]["site_0"] > 0
    assert not fake_device.problems, sorted(set(fake_device.problems))[:5]


def test_accelerator_setting_reaches_every_fit(monkeypatch, pbmc_sites):
    """scinfl.settings.accelerator="cpu" goes through the same path as "auto" and gives the same weights
    here; the device every site trains on is the resolved one."""
    seen = []
    original = site_module.resolve_device

    def recording(accelerator=None):
        device = original(accelerator)
        seen.append((si.settings.accelerator, device))
        return device

    monkeypatch.setattr(site_module, "resolve_device", recording)
    models = {}
    for accelerator in ("auto", "cpu"):
        monkeypatch.setattr(si.settings, "accelerator", accelerator)
        sites = {name: adata.copy() for name, adata in pbmc_sites.items()}
        models[accelerator] = si.tl.train_federated(sites, key=None, **FAST | {"rounds": 2})
    expected = resolve_device("auto")
    assert {accelerator for accelerator, _ in seen} == {"auto", "cpu"}
    assert all(device == (expected if name == "auto" else torch.device("cpu")) for name, device in seen)
    if expected.type == "cpu":
        for name, tensor in models["auto"].network.state_dict().items():
            assert torch.equal(tensor, models["cpu"].network.state_dict()[name]), name


def test_resolve_device_names_and_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(si.settings, "accelerator", "CPU")
    assert resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="'tpu'.*use 'auto', 'cpu', 'gpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        for name in ("gpu", "cuda", "cuda:1"):
            with pytest.raises(RuntimeError, match="torch sees no CUDA GPU here"):
                resolve_device(name)


def test_to_device_moves_nested_batches_and_keeps_tensors_already_there():
    x, y = torch.ones(2, 3), torch.arange(2)
    moved = to_device((x, [y, "label"]), torch.device("cpu"))
    assert isinstance(moved, tuple)
    assert isinstance(moved[1], list)
    assert moved[1][1] == "label"
    assert moved[0] is x
    assert moved[1][0] is y
    assert np.array_equal(moved[0].numpy(), x.numpy())


def test_audit_models_trained_on_the_device_are_read_there(fake_device, pbmc_sites):
    """The audit's own networks (key recovery's fresh model, membership's reference models) train on the
    device; its predictions, embeddings and membership scores read them there."""
    key = si.FederationKey(hashlib.sha256(b"device audit").digest())
    model = si.tl.train_federated(pbmc_sites, key=key, copy=True, **FAST | {"rounds": 1})
    site = model.sites["site_1"]
    x = torch.from_numpy(model.inputs(site, site="site_1").rows(np.arange(site.n_obs)))
    y = torch.from_numpy(model.task.labels(site, "site_1", model.schema))
    network = train_fresh_model(model.config, x, y, epochs=2, seed=0)
    assert _on_device(next(network.parameters()))
    labels = predict_labels(network, x)
    assert embed(network, x).shape[0] == labels.shape[0] == site.n_obs
    confidence = true_label_confidence(class_probabilities(network, None), x, y)
    assert ((confidence > 0) & (confidence < 1)).all()
    assert not fake_device.problems, sorted(set(fake_device.problems))[:5]


def test_privacy_audit_computes_on_the_device(fake_device, pbmc_split, monkeypatch):
    """Every attack family of a hardened classifier's audit, on the device: the network is copied there,
    cells and key views follow it, results come back explicitly; the caller's network stays put."""
    key = si.FederationKey(hashlib.sha256(b"device audit").digest())
    sites, public = pbmc_split
    model = si.tl.train_federated(sites, key=key, copy=True, **FAST | {"rounds": 1})
    contexts = []

    class Recorded(audit_module.AuditContext):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            contexts.append(self)

    monkeypatch.setattr(audit_module, "AuditContext", Recorded)
    table = si.tl.privacy_audit(
        model,
        model.sites["site_1"],
        key=key,
        public=public,
        settings={
            "seeds": (0,),
            "n_victims": 2,
            "n_boot": 10,
            "utility": {"n_wrong_keys": 1},
            "key_recovery": {"steps": 3, "fresh_model_epochs": 1},
            "inversion": {"victims": 1, "batches": (2,), "steps": 3, "restarts": 1},
            "membership": {"reference_models": 4, "reference_epochs": 1},
            "geometry": {"victims": 10, "pool": 40, "secure_rounds": 1},
        },
    )
    assert {"utility", "key recovery", "analytic", "inversion", "membership", "geometry"} <= set(table.family)
    assert _on_device(next(contexts[0].network.parameters()))  # the attacks' network
    assert not _on_device(next(model.network.parameters()))
    assert not fake_device.problems, sorted(set(fake_device.problems))[:5]
