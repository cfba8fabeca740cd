"""The blocking client."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterable

import grpc

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
from catcascade.client.bulk import progress_bar
from catcascade.client.connection import Connection
from catcascade.client.request import ImageInput, classify_request
from catcascade.client.results import ClassifyResult, ModelInfo
from catcascade.client.retry import Attempts, CatcascadeRpcError, RetryPolicy

log = logging.getLogger(__name__)
OnRetry = Callable[[int, grpc.StatusCode, float], None]
"""Called before each retry with (attempt just failed, its status code, seconds until the next)."""


class CatcascadeClient:
    """A blocking CatClassifier client with deadlines and retries.

        with CatcascadeClient("127.0.0.1:50051", token="...") as client:
            r = client.classify("cat.jpg")
            print(r.top.label, r.top.probability, r.escalation_reason.name)

    ``timeout_s`` is each call's overall deadline, retries included (None = none). Calls that
    fail with UNAVAILABLE or RESOURCE_EXHAUSTED are retried per ``retry`` (None or
    `RetryPolicy.never()` = no retries). Failures raise `CatcascadeRpcError` (a grpc.RpcError).
    """

    def __init__(self, target: str, timeout_s: float | None = 30.0, token: str | None = None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, server_name: str | None = None,
                 retry: RetryPolicy | None = RetryPolicy(), propagate_trace: bool = False,
                 on_retry: OnRetry | None = None):
        self.connection = Connection(target, token, tls_ca, tls_cert, tls_key, server_name, propagate_trace)
        self.target = target
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy.never()
        self.on_retry = on_retry
        self.channel = self.connection.channel()
        self.stub = pb_grpc.CatClassifierStub(self.channel)

    def _call(self, method, request, timeout_s: float | None, metadata):
        attempts = Attempts(self.retry, self.timeout_s if timeout_s is None else timeout_s)
        md = self.connection.metadata(metadata)
        while True:
            try:
                return method(request, timeout=attempts.remaining(), metadata=md), attempts.made
            except grpc.RpcError as e:
                wait = attempts.after_failure(e)
                log.debug("%s: %s; retry %d in %.2f s", self.target, e.code().name, attempts.made, wait)
                if self.on_retry:
                    self.on_retry(attempts.made, e.code(), wait)
                time.sleep(wait)

    def classify(self, image: ImageInput, top_k: int = 0, mode="auto", request_id: str = "", *,
                 priority="interactive", explain: bool = False, timeout_s: float | None = None, model_version: str = "",
                 metadata=None) -> ClassifyResult:
        """Classifies one image (a path or encoded bytes). ``mode``: auto, never or always;
        ``priority``: interactive or batch; ``explain`` asks the VLM for a short rationale
        (``result.rationale``); ``timeout_s`` overrides the client's deadline;
        ``metadata``: extra gRPC metadata (a dict or pairs); ``model_version`` pins a model
        repository's served version (the live one or the candidate; NOT_FOUND for others)."""
        req = classify_request(image, top_k, mode, request_id, priority, explain, model_version)
        resp, attempts = self._call(self.stub.Classify, req, timeout_s, metadata)
        return ClassifyResult.from_proto(resp, attempts)

    def classify_many(self, images: Iterable[ImageInput], *, concurrency: int = 8, progress: bool = False,
                      **classify_kwargs) -> list[ClassifyResult | CatcascadeRpcError | OSError]:
        """Classifies many images with at most ``concurrency`` calls in flight; the answers
        come back in input order, a failed image as its error (the others still finish).
        ``progress`` shows a progress bar on stderr. Files are read as their turn comes."""
        images = list(images)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        out: list = [None] * len(images)

        def one(i: int):
            try:
                out[i] = self.classify(images[i], **classify_kwargs)
            except (grpc.RpcError, OSError) as e:
                out[i] = e

        with ThreadPoolExecutor(min(concurrency, max(1, len(images)))) as pool, \
                progress_bar(len(images), progress) as bar:
            for f in as_completed([pool.submit(one, i) for i in range(len(images))]):
                f.result()
                bar.update(1)
        return out

    def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        resp, _ = self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s, None)
        return ModelInfo.from_proto(resp)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CatcascadeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
