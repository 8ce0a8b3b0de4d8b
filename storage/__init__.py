"""The atlas: Zarr v3 layout, shard-aligned writers, completion manifest, read/query API.

Knows nothing about models: tokens are decoded with the vocabulary stored in the atlas.
"""
