"""catcascade's cross-cutting pieces: ``errors`` (imported by every layer, imports nothing)
and ``cli`` (the ``catcascade`` command line, which imports every layer's commands)."""
