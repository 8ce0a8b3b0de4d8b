"""Pure computation on tensors: models and hook sites, corpora, streaming statistics.

Nothing here knows about Prefect, Ray or Zarr; ``flows`` wires these pieces to storage.
"""
