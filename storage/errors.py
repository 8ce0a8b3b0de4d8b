"""Storage errors (kept apart so every storage module can raise them without cycles)."""


class AtlasError(Exception):
    """The atlas is missing, incomplete, or does not hold what was asked for."""
