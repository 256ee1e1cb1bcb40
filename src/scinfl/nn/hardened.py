"""The hardened key scheme (``scheme="hardened"``): key-derived transforms at every layer, no bottleneck.

The paper's scheme (``"infl"``) squeezes the key through a 16-number vector, lets training learn to ignore
it, and leaves the first layer's input in plain view of anyone holding its gradient. Here the key acts as
fixed (never trained) transforms derived from the key bytes, as many secret degrees of freedom as the
network has units:

- **input mixing**, in front of the first shared layer (and of every other layer that reads raw input
  features, such as each modality's encoder in a multi-omics mosaic network): ``rounds`` times, a secret permutation of the
  features followed by a block-diagonal mixing, each ``block_size x block_size`` block ``Q1 diag(g) Q2``
  with Haar-random orthogonal ``Q1, Q2`` and gains ``g`` log-uniform in ``[1/gain, gain]``. It is
  invertible, so no information is lost, but a first-layer gradient (``dW[i] / db[i]``) reveals only the
  mixed input. The gains make the map non-orthogonal: an orthogonal mixing alone is undone by aligning the
  principal axes of leaked vectors with those of a public reference.
- **a secret signed permutation of every linear layer's inputs** (the first layer's included): the layer
  computes ``W u + b`` with ``u = sign * x[order]``. It is an exact reparametrisation of a plain network
  (Adam and weight decay are equivariant to it, so it costs no accuracy), yet without the key every layer
  reads its inputs scrambled.
- **a secret permutation of the output layer's units**, so that a class's logit comes from a secret row:
  the label no longer sits at a known position of the last bias gradient.

Every site applies the same transforms, so plain FedAvg of the weights is FedAvg of the equivalent plain
networks. The transforms are derived from the key with a counter-mode generator (Philox, keyed by 128
bits of SHAKE-256 output per purpose) and live only in a :class:`HardenedKey` that the caller holds for the
duration of a call; modules hold only the public layout.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .keyed import _ACTIVE_KEY, KeyedModule, KeyMaterial, bound, replace_linears

__all__ = [
    "BlockMixing",
    "HardenedKey",
    "HardenedLayout",
    "HardenedLinear",
    "HardenedNetwork",
    "derive_hardened_key",
    "harden",
]

# The hardened key material of the forward pass in progress (set by HardenedNetwork, read by its layers).
_ACTIVE_HARDENED: contextvars.ContextVar[KeyMaterial | None] = contextvars.ContextVar(
    "scinfl_active_hardened", default=None
)


@dataclass(frozen=True)
class HardenedLayout:
    """The public shape of a hardened network: what its key material must fit. Holds no secret."""

    in_features: tuple[int, ...]  # of every hardened linear layer, in module order
    n_outputs: int  # of the last layer (the head)
    block_size: int = 32
    rounds: int = 2
    gain: float = 4.0
    # Layers (indices into in_features) with input mixing: the first, and any other that reads raw inputs.
    mixed: tuple[int, ...] = (0,)

    @property
    def n_features(self) -> int:
        return self.in_features[0]


def _generator(derive: Callable[[str, int], bytes], purpose: str) -> np.random.Generator:
    # Philox is a counter-mode generator; its 128-bit key comes from the key's SHAKE-256 derivation.
    return np.random.Generator(np.random.Philox(key=int.from_bytes(derive(purpose, 16), "little")))


def _haar_orthogonal(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((count, n, n)))
    # Fixing the signs of R's diagonal makes Q Haar-distributed (Mezzadri 2007).
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]


def _mixing_blocks(rng: np.random.Generator, n: int, count: int, gain: float) -> np.ndarray:
    if count == 0 or n == 0:
        return np.zeros((count, n, n), dtype=np.float32)
    gains = np.exp(rng.uniform(-np.log(gain), np.log(gain), size=(count, n)))
    gains /= np.sqrt(np.mean(gains**2, axis=1, keepdims=True))  # keeps the input's overall scale
    left, right = _haar_orthogonal(rng, n, count), _haar_orthogonal(rng, n, count)
    return ((left * gains[:, None, :]) @ right).astype(np.float32)


def _block_diagonal(rows: Tensor, blocks: Tensor, tail: Tensor) -> Tensor:
    """``rows @ blockdiag(blocks[0], ..., blocks[-1], tail)``, without building the matrix."""
    n_blocks, size = blocks.shape[0], blocks.shape[1]
    cut = n_blocks * size
    parts = []
    if n_blocks:
        head = rows[:, :cut].reshape(len(rows), n_blocks, size).transpose(0, 1)  # (blocks, rows, size)
        parts.append(torch.bmm(head, blocks).transpose(0, 1).reshape(len(rows), cut))
    if tail.numel():
        parts.append(rows[:, cut:] @ tail)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@dataclass(frozen=True, eq=False)
class BlockMixing:
    """A key-derived invertible linear map of R^n: rounds of (permute, block-diagonal mixing).

    Attributes
    ----------
    orders
        Per round, the permutation applied to the features first.
    blocks
        Per round, the ``(n // b, b, b)`` mixing blocks of the first ``b * (n // b)`` permuted features.
    tails
        Per round, the ``(n % b, n % b)`` block of the remaining features.
    """

    orders: tuple[Tensor, ...]
    blocks: tuple[Tensor, ...]
    tails: tuple[Tensor, ...]

    def __call__(self, x: Tensor) -> Tensor:
        """``u = M x`` for every row ``x`` of ``x`` (i.e. ``x @ M.T``)."""
        for order, blocks, tail in zip(self.orders, self.blocks, self.tails, strict=True):
            x = _block_diagonal(x.index_select(-1, order), blocks.transpose(1, 2), tail.T)
        return x

    def right(self, rows: Tensor) -> Tensor:
        """``rows @ M`` (e.g. ``W M``: a layer's weights carried to the unmixed basis)."""
        for order, blocks, tail in zip(
            reversed(self.orders), reversed(self.blocks), reversed(self.tails), strict=True
        ):
            rows = _block_diagonal(rows, blocks.to(rows.dtype), tail.to(rows.dtype))
            rows = rows.index_select(-1, torch.argsort(order))
        return rows

    def right_inverse(self, rows: Tensor) -> Tensor:
        """``rows @ M^-1``."""
        for order, blocks, tail in zip(self.orders, self._inverse_blocks, self._inverse_tails, strict=True):
            rows = _block_diagonal(rows.index_select(-1, order), blocks.to(rows.dtype), tail.to(rows.dtype))
        return rows

    @cached_property
    def _inverse_blocks(self) -> tuple[Tensor, ...]:
        return tuple(torch.linalg.inv(b.double()).float() if b.numel() else b for b in self.blocks)

    @cached_property
    def _inverse_tails(self) -> tuple[Tensor, ...]:
        return tuple(torch.linalg.inv(t.double()).float() if t.numel() else t for t in self.tails)

    def matrix(self) -> Tensor:
        """The map as a dense ``(n, n)`` matrix ``M`` (``mixing(x) == x @ M.T``)."""
        n = len(self.orders[0])
        return self(torch.eye(n, dtype=self.blocks[0].dtype)).T


@dataclass(frozen=True, eq=False)
class HardenedKey(KeyMaterial):
    """The transforms one key gives a hardened network (see the module docstring).

    Attributes
    ----------
    mixing
        The input mixing, applied before the first layer's signed permutation.
    inverse_orders, signs
        Per layer, ``u = x[:, inverse_orders[i]] * signs[i]`` is what the layer's weights read.
    output_order
        The head computes ``(W u + b)[:, output_order]``.
    input_mixings
        Layer index -> the input mixing of another layer that reads raw inputs (e.g. the encoder of a
        mosaic network's second modality); empty for a network with one input layer.
    """

    mixing: BlockMixing
    inverse_orders: tuple[Tensor, ...]
    signs: tuple[Tensor, ...]
    output_order: Tensor
    input_mixings: Mapping[int, BlockMixing] = field(default_factory=dict)

    def mixing_of(self, index: int) -> BlockMixing | None:
        """The input mixing in front of layer ``index``, or None (a layer reading another layer's output)."""
        return self.mixing if index == 0 else self.input_mixings.get(index)

    def layer_input(self, index: int, x: Tensor) -> Tensor:
        """``u = T_i x``: what layer ``index``'s weights read (mixed first for an input layer)."""
        mixing = self.mixing_of(index)
        if mixing is not None:
            x = mixing(x)
        return self._signed_permutation(index, x)

    def weight_gradient_input(self, index: int, x: Tensor) -> Tensor:
        """``T_i^{-T} x``: the input whose outer product with the output gradient is the weight update sent.

        Sites train the equivalent plain network and send ``W = V T^{-1}`` (see :meth:`weight_from_plain`),
        so a gradient step ``dV = delta x^T`` reaches the server as ``delta (T^{-T} x)^T``. For a signed
        permutation ``T^{-T} = T``; for the input layer the mixing is not orthogonal and the two differ.
        """
        mixing = self.mixing_of(index)
        if mixing is not None:
            x = mixing.right_inverse(x)
        return self._signed_permutation(index, x)

    def layer_output(self, index: int, y: Tensor) -> Tensor:
        if index == len(self.signs) - 1:
            return y.index_select(-1, self.output_order)
        return y

    def _signed_permutation(self, index: int, x: Tensor) -> Tensor:
        return x.index_select(-1, self.inverse_orders[index]) * self.signs[index].to(x.dtype)

    @cached_property
    def _orders(self) -> tuple[Tensor, ...]:
        return tuple(torch.argsort(inverse) for inverse in self.inverse_orders)

    def weight_to_plain(self, index: int, weight: Tensor) -> Tensor:
        """``V = R W T``: the weights of the equivalent plain layer (``V x == layer under the key``)."""
        plain = (weight * self.signs[index].to(weight.dtype)).index_select(1, self._orders[index])
        mixing = self.mixing_of(index)
        if mixing is not None:
            plain = mixing.right(plain)
        if index == len(self.signs) - 1:
            plain = plain.index_select(0, self.output_order)
        return plain

    def weight_from_plain(self, index: int, plain: Tensor) -> Tensor:
        """``W = R^T V T^{-1}``: the shared weights that act as ``plain`` under this key."""
        if index == len(self.signs) - 1:
            plain = plain.index_select(0, torch.argsort(self.output_order))
        mixing = self.mixing_of(index)
        if mixing is not None:
            plain = mixing.right_inverse(plain)
        return plain.index_select(1, self.inverse_orders[index]) * self.signs[index].to(plain.dtype)

    def bias_to_plain(self, index: int, bias: Tensor) -> Tensor:
        return bias.index_select(0, self.output_order) if index == len(self.signs) - 1 else bias

    def bias_from_plain(self, index: int, plain: Tensor) -> Tensor:
        if index == len(self.signs) - 1:
            return plain.index_select(0, torch.argsort(self.output_order))
        return plain

    def to(self, device: torch.device | str) -> HardenedKey:
        """The same material with every tensor on ``device`` (where the network it keys lives)."""

        def move(mixing: BlockMixing) -> BlockMixing:
            return BlockMixing(
                *(tuple(t.to(device) for t in part) for part in (mixing.orders, mixing.blocks, mixing.tails))
            )

        return HardenedKey(
            mixing=move(self.mixing),
            inverse_orders=tuple(t.to(device) for t in self.inverse_orders),
            signs=tuple(t.to(device) for t in self.signs),
            output_order=self.output_order.to(device),
            input_mixings={i: move(m) for i, m in self.input_mixings.items()},
        )

    def check(self, layout: HardenedLayout) -> None:
        widths = tuple(len(s) for s in self.signs)
        mixed = (0, *sorted(self.input_mixings))
        if (
            widths != layout.in_features
            or len(self.output_order) != layout.n_outputs
            or mixed != tuple(sorted({0, *layout.mixed}))
        ):
            raise ValueError(
                "This key material was derived for another network layout "
                f"(inputs {widths}, {len(self.output_order)} outputs); the network has inputs "
                f"{layout.in_features} and {layout.n_outputs} outputs."
            )

    def __repr__(self) -> str:
        return f"HardenedKey(layers={len(self.signs)})"  # never the material itself

    def __reduce__(self):
        # As FederationKey: pickling would silently copy key material into caches or worker payloads.
        raise TypeError("Hardened key material cannot be pickled; derive it where the key is.")


def derive_hardened_key(derive: Callable[[str, int], bytes], layout: HardenedLayout) -> HardenedKey:
    """The hardened key material for ``layout``, derived from a key's ``derive(purpose, n_bytes)``.

    Deterministic: the same key and layout always give the same material. Every transform has its own
    derivation purpose, so that no two share generator output.
    """

    def mixing(n: int, stem: str) -> BlockMixing:
        size = layout.block_size
        orders, blocks, tails = [], [], []
        for r in range(layout.rounds):
            rng = _generator(derive, f"{stem}/{n}/{size}/{layout.gain}/round-{r}")
            orders.append(torch.from_numpy(rng.permutation(n)))
            blocks.append(torch.from_numpy(_mixing_blocks(rng, size, n // size, layout.gain)))
            tails.append(torch.from_numpy(_mixing_blocks(rng, n % size, 1, layout.gain)[0]))
        return BlockMixing(tuple(orders), tuple(blocks), tuple(tails))

    first = mixing(layout.n_features, "hardened/mixing")
    # Other input layers: their own purposes (the first layer's derivation is unchanged by their presence).
    others = {
        i: mixing(layout.in_features[i], f"hardened/mixing/layer-{i}")
        for i in sorted(set(layout.mixed) - {0})
    }
    inverse_orders, signs = [], []
    for i, width in enumerate(layout.in_features):
        rng = _generator(derive, f"hardened/layer-{i}/{width}")
        inverse_orders.append(torch.from_numpy(np.argsort(rng.permutation(width))))
        signs.append(torch.from_numpy(rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=width)))
    rng = _generator(derive, f"hardened/output/{layout.n_outputs}")
    return HardenedKey(
        mixing=first,
        inverse_orders=tuple(inverse_orders),
        signs=tuple(signs),
        output_order=torch.from_numpy(rng.permutation(layout.n_outputs)),
        input_mixings=others,
    )


class HardenedLinear(nn.Linear):
    """A linear layer that reads its input, and writes its output, through the active hardened key.

    Without a hardened key in force it is exactly :class:`torch.nn.Linear`. ``key_index`` (its position
    among the network's hardened layers) is set by :class:`HardenedNetwork`; it is public structure.
    """

    key_index: int = -1

    def forward(self, x: Tensor) -> Tensor:
        material = _ACTIVE_HARDENED.get()
        if material is None:
            return F.linear(x, self.weight, self.bias)
        u = material.layer_input(self.key_index, x)
        mixed = self.key_index == 0 or (
            isinstance(material, HardenedKey) and material.mixing_of(self.key_index) is not None
        )
        if mixed and torch.is_grad_enabled() and self.weight.requires_grad:
            # Same value W u + b, but the weight's gradient is the one a site sends (delta u~^T, see
            # HardenedKey.weight_gradient_input); gradients with respect to x are unchanged.
            u_sent = material.weight_gradient_input(self.key_index, x)
            y = F.linear(u_sent, self.weight, self.bias) + F.linear(u - u_sent, self.weight.detach())
        else:
            y = F.linear(u, self.weight, self.bias)
        return material.layer_output(self.key_index, y)


class HardenedNetwork(KeyedModule):
    """A task network whose every linear layer runs under the hardened key (see the module docstring).

    It has no key-specific parameters: ``state_dict`` holds the task network's weights only.

    Parameters
    ----------
    network
        A module containing :class:`HardenedLinear` layers (see :func:`harden`).
    block_size, rounds, gain
        The input mixing's block size, number of rounds and gain range (see :class:`HardenedLayout`).
    input_layers
        Names (in ``network``) of hardened layers other than the first that read raw input features;
        they get an input mixing of their own.
    """

    scheme = "hardened"

    def __init__(
        self,
        network: nn.Module,
        *,
        block_size: int = 32,
        rounds: int = 2,
        gain: float = 4.0,
        input_layers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if block_size < 1 or rounds < 1 or gain < 1.0:
            raise ValueError("block_size and rounds must be at least 1 and gain at least 1.")
        self.network = network
        layers = [m for m in network.modules() if isinstance(m, HardenedLinear)]
        if not layers:
            raise ValueError("HardenedNetwork needs at least one HardenedLinear layer in the network.")
        for index, layer in enumerate(layers):
            layer.key_index = index
        named = dict(network.named_modules())
        unknown = [name for name in input_layers if not isinstance(named.get(name), HardenedLinear)]
        if unknown:
            raise ValueError(f"input_layers {unknown} are not hardened layers of the network.")
        mixed = tuple(sorted({0, *(named[name].key_index for name in input_layers)}))
        self.layout = HardenedLayout(
            in_features=tuple(layer.in_features for layer in layers),
            n_outputs=layers[-1].out_features,
            block_size=int(block_size),
            rounds=int(rounds),
            gain=float(gain),
            mixed=mixed,
        )

    def _hardened_layers(self) -> list[tuple[str, HardenedLinear]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, HardenedLinear)]

    def to_plain(self, state: Mapping[str, Tensor], material: HardenedKey) -> dict[str, Tensor]:
        """The equivalent plain network's weights: ``state`` run without a key acts as ``state`` under the key.

        Sites train in this basis (so training is plain FedAvg's, optimiser included) and send back
        :meth:`from_plain`. Entries other than hardened layers' weights and biases pass through.
        """
        return self._convert(state, material, to_plain=True)

    def from_plain(self, state: Mapping[str, Tensor], material: HardenedKey) -> dict[str, Tensor]:
        """The shared weights that act, under the key, as the plain weights ``state`` (inverse of :meth:`to_plain`)."""
        return self._convert(state, material, to_plain=False)

    def _convert(
        self, state: Mapping[str, Tensor], material: HardenedKey, *, to_plain: bool
    ) -> dict[str, Tensor]:
        material.check(self.layout)
        out = dict(state)
        for name, layer in self._hardened_layers():
            i = layer.key_index
            weight, bias = f"{name}.weight", f"{name}.bias"
            if to_plain:
                out[weight] = material.weight_to_plain(i, state[weight])
                if bias in state:
                    out[bias] = material.bias_to_plain(i, state[bias])
            else:
                out[weight] = material.weight_from_plain(i, state[weight])
                if bias in state:
                    out[bias] = material.bias_from_plain(i, state[bias])
        return out

    def plain_copy(self, material: HardenedKey) -> HardenedNetwork:
        """A copy holding the equivalent plain weights (:meth:`to_plain`): run without a key, it computes
        what this network computes under ``material``, at a plain network's cost."""
        plain = copy.deepcopy(self)
        plain.load_state_dict(self.to_plain(self.state_dict(), material))
        return plain

    def key_material(self, derive: Callable[[str, int], bytes]) -> HardenedKey:
        """This network's key material, from a key's ``derive`` (e.g. ``FederationKey.derive``)."""
        return derive_hardened_key(derive, self.layout)

    @contextmanager
    def _keyed_pass(self) -> Iterator[None]:
        material = _ACTIVE_KEY.get()
        if isinstance(material, HardenedKey):
            material.check(self.layout)
        elif material is not None and not isinstance(material, KeyMaterial):
            raise TypeError(
                f"This network uses scheme 'hardened'; got {type(material).__name__} (infl coordinates?)."
            )
        with bound(_ACTIVE_HARDENED, material):
            yield

    def extra_repr(self) -> str:
        layout = self.layout
        return f"block_size={layout.block_size}, rounds={layout.rounds}, gain={layout.gain}"


def harden(
    module: nn.Module,
    *,
    select: Callable[[str, nn.Linear], bool] | None = None,
    block_size: int = 32,
    rounds: int = 2,
    gain: float = 4.0,
) -> HardenedNetwork:
    """Make a copy of ``module`` whose linear layers run under the hardened key, plug-and-play.

    The original is left unchanged; weights are copied. The first selected layer (in module order) gets
    the input mixing and the last one the output permutation, so the first must be the input layer and
    the last the output layer. A network with several input layers (e.g. a mosaic network's encoder of
    each modality) names them in an ``input_layers`` attribute: each gets an input mixing of its own.

    Parameters
    ----------
    module
        Any torch module.
    select
        ``select(name, layer) -> bool`` picks the layers; default: every ``nn.Linear``.
    block_size, rounds, gain
        The input mixing (see :class:`HardenedLayout`).
    """
    network = replace_linears(
        module,
        select,
        lambda name, layer, _: HardenedLinear(
            layer.in_features, layer.out_features, bias=layer.bias is not None
        ),
        caller="harden",
    )
    input_layers = tuple(getattr(module, "input_layers", ()))
    return HardenedNetwork(
        network, block_size=block_size, rounds=rounds, gain=gain, input_layers=input_layers
    )
