"""Keyed layers: the paper's coordinate-conditioned modulation of a linear layer (``scheme="infl"``).

The key never becomes module state. A :class:`KeyedNetwork` reads the secret coordinates from a
:func:`use_key` context for the duration of a call, encodes them into the key vector ``k`` once per forward
pass, and every :class:`KeyedLinear` inside reads ``k`` from the same context. Parameters, buffers and
``state_dict`` hold only weights, which are shared with the server.

For a keyed linear with strength ``s`` (Zhang et al., arXiv 2603.28334; ../shared/DESIGN.md)::

    W_eff = W * (1 + s * tanh(a(k)))  # one factor per output row
    b_eff = b + s * tanh(c(k))
    y = x @ W_eff.T + b_eff
    y = y * (1 + s * tanh(g(k))) + s * tanh(beta(k))  # FiLM, on layers followed by an activation

``x @ (W * r[:, None]).T == (x @ W.T) * r``, so the row scaling is applied to the output: the same
function and gradients without materialising ``W_eff`` (one matmul, as in the plain layer).
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

__all__ = ["KeyedLinear", "KeyedNetwork", "active_key_vector", "keyify", "use_key"]

# Secret coordinates for the call in progress (None: keyless forward).
_ACTIVE_COORDINATES: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "scinfl_active_coordinates", default=None
)
# Key vector k encoded once per KeyedNetwork forward, read by every KeyedLinear inside it.
_ACTIVE_KEY_VECTOR: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "scinfl_active_key_vector", default=None
)


@contextmanager
def use_key(coordinates: Tensor | None) -> Iterator[None]:
    """Make ``coordinates`` the secret that keyed networks use inside the ``with`` block.

    ``None`` runs keyed networks without any key (their unmodulated weights), as an attacker who holds
    only the aggregated weights would. Contexts nest; leaving the block restores the previous one.
    """
    if coordinates is not None and (coordinates.ndim != 2 or not coordinates.is_floating_point()):
        raise ValueError("Key coordinates must be a floating-point tensor of shape (n_points, dim).")
    token = _ACTIVE_COORDINATES.set(coordinates)
    try:
        yield
    finally:
        _ACTIVE_COORDINATES.reset(token)


def active_key_vector() -> Tensor | None:
    """The key vector of the keyed forward pass in progress, or None outside one (or without a key)."""
    return _ACTIVE_KEY_VECTOR.get()


class KeyedLinear(nn.Linear):
    """A linear layer whose effective weights depend on the key (see module docstring).

    Without an active key it is exactly :class:`torch.nn.Linear`. Its key heads ``a, c`` (and ``g, beta``
    with ``film=True``) are one fused linear map of the key vector; they are ordinary shared weights.

    Parameters
    ----------
    in_features, out_features, bias
        As for :class:`torch.nn.Linear`.
    key_dim
        Length of the key vector ``k``.
    strength
        The key strength ``s``.
    film
        Apply the FiLM modulation after the affine map (for layers followed by an activation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        key_dim: int = 16,
        strength: float = 1.0,
        film: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.strength = float(strength)
        self.film = bool(film)
        n_heads = 4 if film else 2
        self.key_heads = nn.Linear(key_dim, n_heads * out_features)

    def modulation(self, key_vector: Tensor) -> tuple[Tensor, ...]:
        """The per-unit factors ``s*tanh(.)`` of heads a, c (and g, beta) for one key vector."""
        return (self.strength * torch.tanh(self.key_heads(key_vector))).chunk(4 if self.film else 2)

    def forward(self, x: Tensor) -> Tensor:
        key_vector = _ACTIVE_KEY_VECTOR.get()
        if key_vector is None:
            return F.linear(x, self.weight, self.bias)
        mods = self.modulation(key_vector)
        y = F.linear(x, self.weight) * (1.0 + mods[0])
        y = y + mods[1] if self.bias is None else y + (self.bias + mods[1])
        if self.film:
            y = y * (1.0 + mods[2]) + mods[3]
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, strength={self.strength}, film={self.film}"


class KeyedNetwork(nn.Module):
    """A network whose linear layers are keyed, with the key encoder they share.

    Call it like the wrapped network; it encodes the coordinates of the active :func:`use_key` context
    once per call. ``forward(x, key=coords)`` is shorthand for ``with use_key(coords): forward(x)``.
    Other methods of the wrapped network run keyed through :meth:`call`.
    """

    def __init__(self, network: nn.Module, key_encoder: CoordinateKeyEncoder) -> None:
        super().__init__()
        self.network = network
        self.key_encoder = key_encoder

    @contextmanager
    def _keyed_pass(self) -> Iterator[None]:
        coordinates = _ACTIVE_COORDINATES.get()
        key_vector = None if coordinates is None else self.key_encoder(coordinates)
        token = _ACTIVE_KEY_VECTOR.set(key_vector)
        try:
            yield
        finally:
            _ACTIVE_KEY_VECTOR.reset(token)

    def call(self, method: str, *args, **kwargs):
        """Run ``self.network.<method>(*args, **kwargs)`` under the active key."""
        with self._keyed_pass():
            return getattr(self.network, method)(*args, **kwargs)

    def forward(self, x: Tensor, *args, key: Tensor | None = None, **kwargs):
        if key is not None:
            with use_key(key):
                return self.call("forward", x, *args, **kwargs)
        return self.call("forward", x, *args, **kwargs)


def _default_film_layers(linears: list[tuple[str, nn.Linear]]) -> set[str]:
    # Every keyed layer except the last one (the output head, which feeds no activation).
    return {name for name, _ in linears[:-1]}


def keyify(
    module: nn.Module,
    *,
    select: Callable[[str, nn.Linear], bool] | None = None,
    film: Callable[[str, nn.Linear], bool] | None = None,
    strength: float = 1.0,
    key_dim: int = 16,
    encoder_hidden: int = 64,
    coordinate_dim: int = 2,
) -> KeyedNetwork:
    """Make a copy of ``module`` with its ``nn.Linear`` layers keyed, plug-and-play.

    The original module is left unchanged. Each selected layer becomes a :class:`KeyedLinear` with the same
    weights; the returned :class:`KeyedNetwork` owns the coordinate key encoder they share.

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
    """
    network = copy.deepcopy(module)
    linears = [
        (name, layer)
        for name, layer in network.named_modules()
        if type(layer) is nn.Linear and (select is None or select(name, layer))
    ]
    if not linears:
        raise ValueError("keyify found no nn.Linear layer to key in this module (or `select` chose none).")
    film_layers = (
        _default_film_layers(linears)
        if film is None
        else {name for name, layer in linears if film(name, layer)}
    )
    for name, layer in linears:
        keyed = KeyedLinear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            key_dim=key_dim,
            strength=strength,
            film=name in film_layers,
        )
        with torch.no_grad():
            keyed.weight.copy_(layer.weight)
            if layer.bias is not None:
                keyed.bias.copy_(layer.bias)
        keyed.to(device=layer.weight.device, dtype=layer.weight.dtype)
        parent_name, _, child_name = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child_name, keyed)
    encoder = CoordinateKeyEncoder(coordinate_dim=coordinate_dim, hidden=encoder_hidden, key_dim=key_dim)
    return KeyedNetwork(network, encoder)
