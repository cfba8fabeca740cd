"""The ModelAdmin gRPC service: list, reload, candidate, promote, roll back, agreement report.

It runs as its own grpc.aio server on ``models.admin_port`` (loopback by default), behind
its own bearer tokens, so a client token can never change what is served and the admin port
can stay off the network that clients reach.
"""
from __future__ import annotations

import contextlib
import logging

import grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
from catcascade.serving.front_door.authentication import Authenticator, BearerTokenInterceptor
from catcascade.serving.model_repository.loading import VersionRejected
from catcascade.serving.model_repository.router import MODES, ModelRouter, ReloadOutcome

log = logging.getLogger(__name__)
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelAdmin"].full_name
MODE_NAMES = {v: k for k, v in MODES.items()}


def routing_to_proto(router: ModelRouter) -> pb.Routing:
    r = router.routing
    return pb.Routing(live=r.live or "", candidate=r.candidate or "", mode=MODES[r.mode], share=r.share,
                      previous=r.previous or "", seed=r.seed)


def model_list(router: ModelRouter) -> pb.ModelList:
    out = pb.ModelList(routing=routing_to_proto(router))
    for name, state, version, error in router.states():
        s = out.versions.add(version=name, state=state, error=error)
        if version is not None:
            s.versions.CopyFrom(version.versions)
            s.inflight = version.inflight
            s.adapter = version.adapter or ""
    return out


def reload_report(router: ModelRouter, outcome: ReloadOutcome) -> pb.ReloadReport:
    return pb.ReloadReport(models=model_list(router), loaded=outcome.loaded, changed=outcome.changed,
                           rejected=[pb.RejectedVersion(version=e.version, reason=e.reason, message=e.message)
                                     for e in outcome.rejected])


def agreement_report(router: ModelRouter) -> pb.AgreementReport:
    rep = router.window.report()
    return pb.AgreementReport(routing=routing_to_proto(router), live=pb.VersionTraffic(**rep["live"]),
                              candidate=pb.VersionTraffic(**rep["candidate"]), compared=rep["compared"],
                              top1_agreement=rep["top1_agreement"], shadow_dropped=rep["shadow_dropped"],
                              window_s=rep["window_s"])


class ModelAdminServicer(pb_grpc.ModelAdminServicer):
    def __init__(self, router: ModelRouter):
        self.router = router

    async def _run(self, context, what: str, op):
        try:
            return await op()
        except VersionRejected as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "; ".join(err["msg"] for err in e.errors())[:500])
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OSError as e:  # the routing file could not be written
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{what}: {e}")

    async def ListModels(self, request, context):
        return model_list(self.router)

    async def ReloadModels(self, request, context):
        outcome = await self._run(context, "reload", lambda: self.router.reload(cause="ReloadModels"))
        return reload_report(self.router, outcome)

    async def SetCandidate(self, request, context):
        if request.version and request.mode == pb.TRAFFIC_MODE_UNSPECIFIED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "mode must be TRAFFIC_MODE_CANARY or "
                                "TRAFFIC_MODE_SHADOW")
        mode = MODE_NAMES.get(request.mode, self.router.routing.mode)
        log.info("admin: candidate %s (%s, %.3f)", request.version or "none", mode, request.share)
        await self._run(context, "set candidate",
                        lambda: self.router.set_candidate(request.version, mode, request.share))
        return model_list(self.router)

    async def Promote(self, request, context):
        log.info("admin: promote %s", request.version or "the candidate")
        await self._run(context, "promote", lambda: self.router.promote(request.version or None))
        return model_list(self.router)

    async def Rollback(self, request, context):
        log.info("admin: roll back")
        await self._run(context, "roll back", self.router.rollback)
        return model_list(self.router)

    async def GetAgreementReport(self, request, context):
        return agreement_report(self.router)


@contextlib.asynccontextmanager
async def run_admin_server(router: ModelRouter, host: str, port: int, tokens: list[str], tls=None,
                           client_tokens: list[str] | None = None, grace_s: float = 2.0):
    """Serves ModelAdmin on ``host:port`` (0 = any free port) and yields the bound port."""
    if not tokens:
        raise ValueError("models.admin_port is set but no admin token is configured "
                         "(models.admin_tokens or models.admin_tokens_env)")
    shared = set(tokens) & set(client_tokens or ())
    if shared:
        raise ValueError("admin tokens must differ from the client tokens (auth.bearer_tokens): "
                         f"{len(shared)} token(s) appear in both")
    from catcascade.serving.server import EXCLUSIVE_PORT, bind_port

    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(Authenticator(tokens))], options=EXCLUSIVE_PORT)
    pb_grpc.add_ModelAdminServicer_to_server(ModelAdminServicer(router), server)
    reflection.enable_server_reflection((ADMIN_SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = bind_port(server, f"{host}:{port}", tls, "the ModelAdmin server")
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(grace_s)
