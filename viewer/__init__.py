"""Web viewer of an atlas: ``neuronmap view ATLAS`` (see :mod:`viewer.app`)."""
