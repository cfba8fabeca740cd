"""Generated gRPC stubs for proto/cascade.proto (package catcascade.v1).

Regenerate with ``make proto`` (``python -m catcascade.serving.api.generate``); a test fails when the
committed stubs differ from what the pinned grpcio-tools produces.
"""
