"""The asyncio client (grpc.aio)."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Iterable

import grpc

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
from catcascade.client.bulk import progress_bar
from catcascade.client.connection import Connection
from catcascade.client.request import ImageInput, classify_request
from catcascade.client.results import ClassifyResult, ModelInfo
from catcascade.client.retry import Attempts, CatcascadeRpcError, RetryPolicy
from catcascade.client.sync_client import OnRetry

log = logging.getLogger(__name__)


class AsyncCatcascadeClient:
    """The asyncio twin of `CatcascadeClient` (same arguments, same results), for callers
    that run an event loop:

        async with AsyncCatcascadeClient("127.0.0.1:50051") as client:
            results = await client.classify_many(paths, concurrency=16, progress=True)
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
        self.channel = self.connection.aio_channel()
        self.stub = pb_grpc.CatClassifierStub(self.channel)

    async def _call(self, method, request, timeout_s: float | None, metadata):
        attempts = Attempts(self.retry, self.timeout_s if timeout_s is None else timeout_s)
        md = self.connection.metadata(metadata)
        while True:
            try:
                return await method(request, timeout=attempts.remaining(), metadata=md), attempts.made
            except grpc.RpcError as e:
                wait = attempts.after_failure(e)
                log.debug("%s: %s; retry %d in %.2f s", self.target, e.code().name, attempts.made, wait)
                if self.on_retry:
                    self.on_retry(attempts.made, e.code(), wait)
                await asyncio.sleep(wait)

    async def classify(self, image: ImageInput, top_k: int = 0, mode="auto", request_id: str = "", *,
                       priority="interactive", explain: bool = False, timeout_s: float | None = None, model_version: str = "",
                       metadata=None) -> ClassifyResult:
        """See `CatcascadeClient.classify`."""
        req = classify_request(image, top_k, mode, request_id, priority, explain, model_version)
        resp, attempts = await self._call(self.stub.Classify, req, timeout_s, metadata)
        return ClassifyResult.from_proto(resp, attempts)

    async def classify_many(self, images: Iterable[ImageInput], *, concurrency: int = 8, progress: bool = False,
                            **classify_kwargs) -> list[ClassifyResult | CatcascadeRpcError | OSError]:
        """See `CatcascadeClient.classify_many`: at most ``concurrency`` calls in flight,
        answers in input order, a failed image as its error."""
        images = list(images)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        out: list = [None] * len(images)
        next_index = iter(range(len(images)))

        async def worker(bar):
            for i in next_index:
                try:
                    out[i] = await self.classify(images[i], **classify_kwargs)
                except (grpc.RpcError, OSError) as e:
                    out[i] = e
                bar.update(1)

        with progress_bar(len(images), progress) as bar:
            await asyncio.gather(*(worker(bar) for _ in range(min(concurrency, max(1, len(images))))))
        return out

    async def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        resp, _ = await self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s, None)
        return ModelInfo.from_proto(resp)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncCatcascadeClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
