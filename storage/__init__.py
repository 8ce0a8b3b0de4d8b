"""The atlas: layout (``layout``), the read-only query API (``Atlas``), the writers flows use
(``Store``), and what queries return (``records``).

Knows nothing about models: tokens are decoded with the vocabulary stored in the atlas.
"""

from storage.atlas import Atlas
from storage.errors import AtlasError
from storage.records import Example, FeatureRecord, NeuronRecord, SteeringRecord
from storage.store import Store

__all__ = ["Atlas", "AtlasError", "Example", "FeatureRecord", "NeuronRecord", "SteeringRecord",
           "Store"]
