"""The atlas: Zarr v3 layout, shard-aligned writers, completion manifest, read/query API.

Knows nothing about models: tokens are decoded with the vocabulary stored in the atlas.
"""

from storage.atlas import Atlas, AtlasError, Example, NeuronRecord

__all__ = ["Atlas", "AtlasError", "Example", "NeuronRecord"]
