"""The front door: every Classify call goes through the same ordered chain of small stages.

    validate (validation.py)        protobuf -> ClassifyRequest, or INVALID_ARGUMENT
    authenticate, name the tenant   (authentication.py; the interceptor refuses unknown callers)
    route to a version              (routing.py: the bundle, or the repository's live/canary)
    cache                           (caching.py: per tenant, keyed on the version's content)
    admit                           (serving/traffic/admission.py, on a cache miss)
    compute                         (the version's CascadeEngine; shadow copies after)
    observe                         (observation.py: metrics, drift, the log line)

chain.py runs them in that order; serving/server.py only maps gRPC to the chain and errors to
status codes (serving/status_codes.py).
"""
