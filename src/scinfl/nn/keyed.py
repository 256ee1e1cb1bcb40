"""Keyed layers: the paper's coordinate-conditioned modulation of linear layers (``scheme="infl"``).

The key never becomes module state. A :class:`KeyedNetwork` reads the secret coordinates from a
:func:`use_key` context for the duration of a call, encodes them into the key vector ``k`` once per forward
pass, derives every keyed layer's modulation from ``k`` in one fused step, and each :class:`KeyedLinear`
inside reads its own from the same context. Parameters, buffers and ``state_dict`` hold only weights,
which are shared with the server.

For a keyed linear with strength ``s`` (Zhang et al., arXiv 2603.28334; ../shared/DESIGN.md)::

    W_eff = W * (1 + s * tanh(a(k)))  # one factor per output row
    b_eff = b + s * tanh(c(k))
    y = x @ W_eff.T + b_eff
    y = y * (1 + s * tanh(g(k))) + s * tanh(beta(k))  # FiLM, on layers followed by an activation

``a, c, g, beta`` are linear maps of ``k``; all layers' maps are one ``Linear(key_dim, ...)``. Since
``x @ (W * r[:, None]).T == (x @ W.T) * r``, a layer computes ``y = (x @ W.T) * scale + shift`` with
``scale = (1 + s*tanh a) * (1 + s*tanh g)`` and ``shift = (b + s*tanh c) * (1 + s*tanh g) + s*tanh beta``:
the same function and gradients as the formulas above, in one matmul and one fused multiply-add.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .key_encoder import CoordinateKeyEncoder

__all__ = [
    "KeyMaterial",
    "KeyedLinear",
    "KeyedModule",
    "KeyedNetwork",
    "active_modulation",
    "keyify",
    "use_key",
    "use_key_vector",
]


class KeyMaterial:
    """Base of the key material of schemes other than ``"infl"`` (whose material is a coordinate tensor).

    Key material is what a keyed network needs from the key for one call; it lives only as long as the
    caller holds it and is never stored on a module.
    """


# Key material for the call in progress: "infl" coordinates, a KeyMaterial, or None (keyless forward).
_ACTIVE_KEY: contextvars.ContextVar[Tensor | KeyMaterial | None] = contextvars.ContextVar(
    "scinfl_active_key", default=None
)
# A key vector chosen directly, bypassing the encoder (the audit's key-recovery attack fits one).
_KEY_VECTOR_OVERRIDE: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "scinfl_key_vector_override", default=None
)
# Per-layer (scale, shift) of the keyed forward pass in progress, by id of the KeyedLinear.
_ACTIVE_MODULATION: contextvars.ContextVar[dict[int, tuple[Tensor, Tensor]] | None] = contextvars.ContextVar(
    "scinfl_active_modulation", default=None
)


@contextmanager
def bound(variable: contextvars.ContextVar, value) -> Iterator[None]:
    """Set a context variable for the duration of a ``with`` block, then restore its previous value."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


@contextmanager
def use_key(material: Tensor | KeyMaterial | None) -> Iterator[None]:
    """Make ``material`` the secret that keyed networks use inside the ``with`` block.

    ``material`` is what the model's scheme derives from the key: the secret coordinates for
    ``scheme="infl"``, a :class:`KeyMaterial` for the others. ``None`` runs keyed networks without any key
    (their unmodulated weights), as an attacker who holds only the aggregated weights would. Contexts nest;
    leaving the block restores the previous one.
    """
    if isinstance(material, Tensor):
        if material.ndim != 2 or not material.is_floating_point():
            raise ValueError("Key coordinates must be a floating-point tensor of shape (n_points, dim).")
    elif material is not None and not isinstance(material, KeyMaterial):
        raise TypeError(
            f"use_key needs key coordinates, a KeyMaterial or None, got {type(material).__name__}."
        )
    with bound(_ACTIVE_KEY, material):
        yield


@contextmanager
def use_key_vector(key_vector: Tensor) -> Iterator[None]:
    """Run keyed networks with ``key_vector`` as ``k`` directly, bypassing the coordinate encoder.

    An attacker's tool: the privacy audit fits ``k`` on labelled data with frozen weights to test whether
    the secret can be recovered through this low-dimensional bottleneck.
    """
    if key_vector.ndim != 1:
        raise ValueError("A key vector is one-dimensional.")
    with bound(_KEY_VECTOR_OVERRIDE, key_vector):
        yield


def active_modulation() -> dict[int, tuple[Tensor, Tensor]] | None:
    """The per-layer modulation of the keyed forward pass in progress; None outside one or without a key."""
    return _ACTIVE_MODULATION.get()


class KeyedLinear(nn.Linear):
    """A linear layer whose effective weights depend on the key (see the module docstring).

    Outside a keyed forward pass, or without a key, it is exactly :class:`torch.nn.Linear`. Its key maps
    live in the enclosing :class:`KeyedNetwork`, which computes all layers' modulations at once.

    Parameters
    ----------
    in_features, out_features, bias
        As for :class:`torch.nn.Linear`.
    film
        Apply the FiLM modulation after the affine map (for layers followed by an activation).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, film: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.film = bool(film)

    def forward(self, x: Tensor) -> Tensor:
        modulation = _ACTIVE_MODULATION.get()
        if modulation is None or id(self) not in modulation:
            return F.linear(x, self.weight, self.bias)
        scale, shift = modulation[id(self)]
        return torch.addcmul(shift, F.linear(x, self.weight), scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, film={self.film}"


class KeyedModule(nn.Module):
    """A task network that runs under the key of the active :func:`use_key` context (any scheme).

    Call it like the wrapped network (``self.network``). ``forward(x, key=material)`` is shorthand for
    ``with use_key(material): forward(x)``; other methods of the wrapped network run keyed through
    :meth:`call`. Subclasses say how the key acts in :meth:`_keyed_pass`.
    """

    scheme: str = ""
    network: nn.Module

    @contextmanager
    def _keyed_pass(self) -> Iterator[None]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def call(self, method: str, *args, **kwargs):
        """Run ``self.network.<method>(*args, **kwargs)`` under the active key."""
        with self._keyed_pass():
            return getattr(self.network, method)(*args, **kwargs)

    def forward(self, x: Tensor, *args, key: Tensor | KeyMaterial | None = None, **kwargs):
        if key is not None:
            with use_key(key):
                return self.call("forward", x, *args, **kwargs)
        return self.call("forward", x, *args, **kwargs)


class KeyedNetwork(KeyedModule):
    """A network whose linear layers are keyed, with the key encoder and key maps they share.

    Call it like the wrapped network; it encodes the coordinates of the active :func:`use_key` context
    once per call. ``forward(x, key=coords)`` is shorthand for ``with use_key(coords): forward(x)``.
    Other methods of the wrapped network run keyed through :meth:`call`.

    Parameters
    ----------
    network
        A module containing :class:`KeyedLinear` layers (see :func:`keyify`).
    key_encoder
        Maps the secret coordinates to the key vector ``k``.
    strength
        The key strength ``s``.
    n_key_points
        How many secret coordinates a key gives the encoder (public structure, like the layer sizes).
    """

    scheme = "infl"

    def __init__(
        self,
        network: nn.Module,
        key_encoder: CoordinateKeyEncoder,
        *,
        strength: float = 1.0,
        n_key_points: int = 128,
    ) -> None:
        super().__init__()
        self.network = network
        self.key_encoder = key_encoder
        self.strength = float(strength)
        self.n_key_points = int(n_key_points)
        layers = [m for m in network.modules() if isinstance(m, KeyedLinear)]
        if not layers:
            raise ValueError("KeyedNetwork needs at least one KeyedLinear layer in the network.")
        # The layer structure is fixed here; every forward pass reuses it (a plain list: not registered).
        self._layers = layers
        self._widths = [layer.out_features for layer in layers]
        widths = torch.tensor(self._widths)
        self._n_units = int(widths.sum())
        film_units = [
            torch.arange(start, start + layer.out_features)
            for start, layer in zip((widths.cumsum(0) - widths).tolist(), layers, strict=True)
            if layer.film
        ]
        # Unit indices (into all keyed layers' outputs, concatenated) that get FiLM; not key material. A
        # buffer, so that it moves with the network to its device; not persistent: not in the state_dict.
        self.register_buffer(
            "_film_units",
            torch.cat(film_units) if film_units else torch.empty(0, dtype=torch.long),
            persistent=False,
        )
        # Rows: a (all units), c (all units), g (FiLM units), beta (FiLM units).
        n_film = len(self._film_units)
        self.key_heads = nn.Linear(key_encoder.key_dim, 2 * self._n_units + 2 * n_film)

    def keyed_layers(self) -> list[KeyedLinear]:
        """The keyed layers, in module order (the order of the rows of ``key_heads``)."""
        return list(self._layers)

    def head_rows(self, layer: KeyedLinear) -> dict[str, slice | Tensor]:
        """Which rows of ``key_heads`` produce ``a, c`` (and ``g, beta`` with FiLM) for ``layer``."""
        start = 0
        for other in self._layers:
            if other is layer:
                break
            start += other.out_features
        else:
            raise ValueError("That layer is not a keyed layer of this network.")
        units = slice(start, start + layer.out_features)
        rows: dict[str, slice | Tensor] = {
            "a": units,
            "c": slice(self._n_units + start, self._n_units + start + layer.out_features),
        }
        if layer.film:
            position = torch.nonzero(self._film_units == start, as_tuple=True)[0].item()
            base = 2 * self._n_units
            n_film = len(self._film_units)
            rows["g"] = slice(base + position, base + position + layer.out_features)
            rows["beta"] = slice(base + n_film + position, base + n_film + position + layer.out_features)
        return rows

    def modulation(self, key_vector: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        """Every keyed layer's ``(scale, shift)`` for key vector ``k``, computed in one fused step."""
        layers = self._layers
        n, n_film = self._n_units, len(self._film_units)
        heads = self.strength * torch.tanh(self.key_heads(key_vector))
        a, c, g, beta = heads.split([n, n, n_film, n_film])
        bias = torch.cat(
            [
                layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                for layer in layers
            ]
        )
        film_scale = heads.new_ones(n).index_put((self._film_units,), 1.0 + g)
        film_shift = heads.new_zeros(n).index_put((self._film_units,), beta)
        scale = (1.0 + a) * film_scale
        shift = (bias + c) * film_scale + film_shift
        return {
            id(layer): (s, t)
            for layer, s, t in zip(layers, scale.split(self._widths), shift.split(self._widths), strict=True)
        }

    @contextmanager
    def _keyed_pass(self) -> Iterator[None]:
        key_vector = _KEY_VECTOR_OVERRIDE.get()
        if key_vector is None:
            coordinates = _ACTIVE_KEY.get()
            if coordinates is not None and not isinstance(coordinates, Tensor):
                raise TypeError(
                    f"This network uses scheme 'infl' (key coordinates); got {type(coordinates).__name__}."
                )
            key_vector = None if coordinates is None else self.key_encoder(coordinates)
        with bound(_ACTIVE_MODULATION, None if key_vector is None else self.modulation(key_vector)):
            yield

    def extra_repr(self) -> str:
        return f"strength={self.strength}"


def _default_film_layers(linears: list[tuple[str, nn.Linear]]) -> set[str]:
    # Every keyed layer except the last one (the output head, which feeds no activation).
    return {name for name, _ in linears[:-1]}


def replace_linears(
    module: nn.Module,
    select: Callable[[str, nn.Linear], bool] | None,
    make: Callable[[str, nn.Linear, list[tuple[str, nn.Linear]]], nn.Linear],
    *,
    caller: str,
) -> nn.Module:
    """A deep copy of ``module`` whose selected ``nn.Linear`` layers are replaced by ``make(name, layer, all)``.

    The replacements get the original weights, device and dtype; ``all`` is every selected (name, layer) in
    module order. The shared step of :func:`keyify` and :func:`~scinfl.nn.harden`.
    """
    network = copy.deepcopy(module)
    linears = [
        (name, layer)
        for name, layer in network.named_modules()
        if type(layer) is nn.Linear and (select is None or select(name, layer))
    ]
    if not linears:
        raise ValueError(f"{caller} found no nn.Linear layer in this module (or `select` chose none).")
    for name, layer in linears:
        replacement = make(name, layer, linears)
        with torch.no_grad():
            replacement.weight.copy_(layer.weight)
            if layer.bias is not None:
                replacement.bias.copy_(layer.bias)
        replacement.to(device=layer.weight.device, dtype=layer.weight.dtype)
        parent_name, _, child_name = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child_name, replacement)
    return network


def keyify(
    module: nn.Module,
    *,
    select: Callable[[str, nn.Linear], bool] | None = None,
    film: Callable[[str, nn.Linear], bool] | None = None,
    strength: float = 1.0,
    key_dim: int = 16,
    encoder_hidden: int = 64,
    coordinate_dim: int = 2,
    n_key_points: int = 128,
) -> KeyedNetwork:
    """Make a copy of ``module`` with its ``nn.Linear`` layers keyed, plug-and-play.

    The original module is left unchanged. Each selected layer becomes a :class:`KeyedLinear` with the same
    weights; the returned :class:`KeyedNetwork` owns the coordinate key encoder and the key maps.

    Parameters
    ----------
    module
        Any torch module.
    select
        ``select(name, layer) -> bool`` picks the layers to key; default: every ``nn.Linear``.
    film
        ``film(name, layer) -> bool`` picks the layers that also get the FiLM modulation; default: every
        selected layer but the last in module order (the output head).
    strength
        The key strength ``s``.
    key_dim, encoder_hidden, coordinate_dim
        Sizes of the coordinate key encoder (see :class:`CoordinateKeyEncoder`).
    n_key_points
        Secret coordinates per key.
    """

    def make(name: str, layer: nn.Linear, linears: list[tuple[str, nn.Linear]]) -> KeyedLinear:
        with_film = name in _default_film_layers(linears) if film is None else film(name, layer)
        return KeyedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, film=with_film)

    network = replace_linears(module, select, make, caller="keyify")
    encoder = CoordinateKeyEncoder(coordinate_dim=coordinate_dim, hidden=encoder_hidden, key_dim=key_dim)
    return KeyedNetwork(network, encoder, strength=strength, n_key_points=n_key_points)
