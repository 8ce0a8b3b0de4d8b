"""Errors raised for bad input. Each message names the offending field, file or model."""


class NeuronmapError(Exception):
    """Base class for user-facing errors: bad input that retrying cannot fix."""


class ModelError(NeuronmapError):
    """A model cannot be loaded or has no known MLP neuron site."""


class CorpusError(NeuronmapError):
    """A corpus is missing, empty or malformed."""


class ConfigError(NeuronmapError, ValueError):
    """An option of an ``ops`` computation is invalid (a ``ValueError`` too, for callers that
    catch those); the message names the option."""
