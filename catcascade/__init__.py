"""catcascade's cross-cutting pieces: ``errors`` (imported by every layer, imports nothing),
``cli`` (the ``catcascade`` command line, which imports every layer's commands) and ``client``
(the public import path of the Python client in serving/client/)."""
