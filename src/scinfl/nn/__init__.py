"""Pure-torch building blocks: keyed layers, the key encoder, task networks. No AnnData here."""

from .hardened import (
    BlockMixing,
    HardenedKey,
    HardenedLayout,
    HardenedLinear,
    HardenedNetwork,
    derive_hardened_key,
    harden,
)
from .key_encoder import CoordinateKeyEncoder
from .keyed import (
    KeyedLinear,
    KeyedModule,
    KeyedNetwork,
    KeyMaterial,
    active_modulation,
    keyify,
    use_key,
    use_key_vector,
)
from .networks import LIKELIHOODS, Autoencoder, PerturbationNetwork, ResidualBlock, ResidualMLPClassifier

__all__ = [
    "LIKELIHOODS",
    "Autoencoder",
    "BlockMixing",
    "CoordinateKeyEncoder",
    "HardenedKey",
    "HardenedLayout",
    "HardenedLinear",
    "HardenedNetwork",
    "KeyMaterial",
    "KeyedLinear",
    "KeyedModule",
    "KeyedNetwork",
    "PerturbationNetwork",
    "ResidualBlock",
    "ResidualMLPClassifier",
    "active_modulation",
    "derive_hardened_key",
    "harden",
    "keyify",
    "use_key",
    "use_key_vector",
]
