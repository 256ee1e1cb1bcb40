"""Pure-torch building blocks: keyed layers, the key encoder, task networks, likelihoods. No AnnData here."""

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
from .likelihoods import LIKELIHOODS, cell_losses, clr, read_counts
from .mosaic import MOSAIC_LIKELIHOODS, MosaicAutoencoder, MosaicOutput, modality_parameter_names
from .networks import Autoencoder, BatchwiseNorm, PerturbationNetwork, ResidualBlock, ResidualMLPClassifier

__all__ = [
    "LIKELIHOODS",
    "MOSAIC_LIKELIHOODS",
    "Autoencoder",
    "BatchwiseNorm",
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
    "MosaicAutoencoder",
    "MosaicOutput",
    "PerturbationNetwork",
    "ResidualBlock",
    "ResidualMLPClassifier",
    "active_modulation",
    "cell_losses",
    "clr",
    "derive_hardened_key",
    "harden",
    "keyify",
    "modality_parameter_names",
    "read_counts",
    "use_key",
    "use_key_vector",
]
