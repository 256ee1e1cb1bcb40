"""Pure-torch building blocks: keyed layers, the key encoder, task networks. No AnnData here."""

from .key_encoder import CoordinateKeyEncoder
from .keyed import KeyedLinear, KeyedNetwork, active_modulation, keyify, use_key, use_key_vector
from .networks import ResidualBlock, ResidualMLPClassifier

__all__ = [
    "CoordinateKeyEncoder",
    "KeyedLinear",
    "KeyedNetwork",
    "ResidualBlock",
    "ResidualMLPClassifier",
    "active_modulation",
    "keyify",
    "use_key",
    "use_key_vector",
]
