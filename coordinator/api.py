"""The gRPC API: translation only (proto ↔ records, errors ↔ status) around the API nouns
(operations/), one servicer per service, plus the standard health service and server
reflection."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from hvplace.coordinator.auth import Authenticator, AuthInterceptor, Role, ServerTLS
from hvplace.coordinator.config import CoordinatorConfig
from hvplace.coordinator.convert import from_proto, to_proto
from hvplace.coordinator.errors_grpc import rich_status, unexpected
from hvplace.coordinator.host_labels import label_host
from hvplace.coordinator.operations import Operations
from hvplace.coordinator.operations.cluster import Cluster
from hvplace.coordinator.operations.hosts import Hosts
from hvplace.coordinator.operations.images import Catalogue
from hvplace.coordinator.operations.rules import Rules
from hvplace.coordinator.operations.vms import VMs
from hvplace.coordinator.rebalance import Rebalancing
from hvplace.coordinator.rpc_metrics import RpcMetricsInterceptor
from hvplace.coordinator.vm_labels import label_vm
from hvplace.proto import records
from hvplace.proto.errors import HvplaceError, InvalidInput
from hvplace.proto.names import clip
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[Any, Any]

SERVICES = (
    "VMService",
    "RuleService",
    "HostService",
    "ClusterService",
    "ImageService",
    "MaintenanceService",
)


async def _abort(context: Ctx, exc: BaseException) -> NoReturn:
    err = exc if isinstance(exc, HvplaceError) else unexpected(exc)
    if not isinstance(exc, HvplaceError):
        log.exception("unexpected error in an API call", exc_info=exc)
    # grpc-stubs lacks abort_with_status on the aio context; grpc.aio has it.
    await context.abort_with_status(rich_status(err))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # it always raises


async def _guard(context: Ctx, work: Awaitable[T]) -> T:
    """Run one operation; any error leaves as a gRPC status with the reason word."""
    try:
        return await work
    except HvplaceError as e:
        await _abort(context, e)
    except Exception as e:
        await _abort(context, e)


class VMServicer(pb_grpc.VMServiceServicer):
    def __init__(self, vms: VMs) -> None:
        self.vms = vms

    async def CreateVMs(self, request: pb.CreateVMsRequest, context: Ctx) -> pb.CreateVMsResponse:
        async def run() -> pb.CreateVMsResponse:
            vms = [from_proto(records.VM, m) for m in request.vms]
            result = await self.vms.create(request.request_id, vms, request.atomic)
            return to_proto(result, pb.CreateVMsResponse)

        return await _guard(context, run())

    async def GetVM(self, request: pb.VMRef, context: Ctx) -> pb.VMView:
        async def run() -> pb.VMView:
            return to_proto(await self.vms.get(request.scope, request.name), pb.VMView)

        return await _guard(context, run())

    async def ListVMs(self, request: pb.ListVMsRequest, context: Ctx) -> pb.ListVMsResponse:
        async def run() -> pb.ListVMsResponse:
            views = await self.vms.list(request.scope, request.host, request.phase)
            return pb.ListVMsResponse(vms=[to_proto(v, pb.VMView) for v in views])

        return await _guard(context, run())

    async def DeleteVM(self, request: pb.DeleteVMRequest, context: Ctx) -> pb.Empty:
        async def run() -> pb.Empty:
            await self.vms.delete(request.scope, request.name)
            return pb.Empty()

        return await _guard(context, run())

    async def StartVM(self, request: pb.VMRef, context: Ctx) -> pb.VMView:
        async def run() -> pb.VMView:
            view = await self.vms.set_power(request.scope, request.name, records.Power.RUNNING)
            return to_proto(view, pb.VMView)

        return await _guard(context, run())

    async def StopVM(self, request: pb.VMRef, context: Ctx) -> pb.VMView:
        async def run() -> pb.VMView:
            view = await self.vms.set_power(request.scope, request.name, records.Power.STOPPED)
            return to_proto(view, pb.VMView)

        return await _guard(context, run())

    async def ExplainVM(self, request: pb.VMRef, context: Ctx) -> pb.Explanation:
        async def run() -> pb.Explanation:
            e = await self.vms.explain(request.scope, request.name)
            return to_proto(e, pb.Explanation)

        return await _guard(context, run())

    async def LabelVM(self, request: pb.LabelVMRequest, context: Ctx) -> pb.VMView:
        async def run() -> pb.VMView:
            view = await label_vm(
                self.vms, request.scope, request.name, dict(request.set), list(request.remove)
            )
            return to_proto(view, pb.VMView)

        return await _guard(context, run())


class RuleServicer(pb_grpc.RuleServiceServicer):
    def __init__(self, rules: Rules) -> None:
        self.rules = rules

    async def CreateRule(self, request: pb.CreateRuleRequest, context: Ctx) -> pb.RuleResponse:
        async def run() -> pb.RuleResponse:
            rule = from_proto(records.Rule, request.rule)
            result = await self.rules.create(request.request_id, rule, request.rebalance)
            return to_proto(result, pb.RuleResponse)

        return await _guard(context, run())

    async def GetRule(self, request: pb.RuleRef, context: Ctx) -> pb.RuleView:
        async def run() -> pb.RuleView:
            return to_proto(await self.rules.get(request.scope, request.name), pb.RuleView)

        return await _guard(context, run())

    async def ListRules(self, request: pb.ListRulesRequest, context: Ctx) -> pb.ListRulesResponse:
        async def run() -> pb.ListRulesResponse:
            views = await self.rules.list(request.scope)
            return pb.ListRulesResponse(rules=[to_proto(v, pb.RuleView) for v in views])

        return await _guard(context, run())

    async def UpdateRule(self, request: pb.UpdateRuleRequest, context: Ctx) -> pb.RuleResponse:
        async def run() -> pb.RuleResponse:
            rule = from_proto(records.Rule, request.rule)
            result = await self.rules.update(rule, request.rebalance)
            return to_proto(result, pb.RuleResponse)

        return await _guard(context, run())

    async def DeleteRule(self, request: pb.DeleteRuleRequest, context: Ctx) -> pb.Empty:
        async def run() -> pb.Empty:
            await self.rules.delete(request.scope, request.name, request.force)
            return pb.Empty()

        return await _guard(context, run())

    async def SetScopePolicy(self, request: pb.ScopePolicy, context: Ctx) -> pb.ScopePolicy:
        async def run() -> pb.ScopePolicy:
            # `rebalance` belongs to the request, not to the stored record.
            record = pb.ScopePolicy()
            record.CopyFrom(request)
            record.ClearField("rebalance")
            policy = await self.rules.set_policy(
                from_proto(records.ScopePolicy, record), rebalance=request.rebalance
            )
            return to_proto(policy, pb.ScopePolicy)

        return await _guard(context, run())

    async def GetScopePolicy(self, request: pb.ScopeRef, context: Ctx) -> pb.ScopePolicy:
        async def run() -> pb.ScopePolicy:
            return to_proto(await self.rules.get_policy(request.scope), pb.ScopePolicy)

        return await _guard(context, run())


class HostServicer(pb_grpc.HostServiceServicer):
    def __init__(self, hosts: Hosts, rebalancing: Rebalancing) -> None:
        self.hosts = hosts
        self.rebalancing = rebalancing

    async def ListHosts(self, request: pb.Empty, context: Ctx) -> pb.ListHostsResponse:
        async def run() -> pb.ListHostsResponse:
            views = await self.hosts.list()
            return pb.ListHostsResponse(hosts=[to_proto(v, pb.HostView) for v in views])

        return await _guard(context, run())

    async def GetHost(self, request: pb.HostRef, context: Ctx) -> pb.HostView:
        async def run() -> pb.HostView:
            return to_proto(await self.hosts.get(request.name), pb.HostView)

        return await _guard(context, run())

    async def CordonHost(self, request: pb.HostRef, context: Ctx) -> pb.HostView:
        async def run() -> pb.HostView:
            return to_proto(await self.hosts.cordon(request.name), pb.HostView)

        return await _guard(context, run())

    async def UncordonHost(self, request: pb.HostRef, context: Ctx) -> pb.HostView:
        async def run() -> pb.HostView:
            return to_proto(await self.hosts.uncordon(request.name), pb.HostView)

        return await _guard(context, run())

    async def DrainHost(self, request: pb.HostRef, context: Ctx) -> pb.HostView:
        async def run() -> pb.HostView:
            return to_proto(await self.hosts.drain(request.name), pb.HostView)

        return await _guard(context, run())

    async def LabelHost(self, request: pb.LabelHostRequest, context: Ctx) -> pb.HostView:
        async def run() -> pb.HostView:
            view = await label_host(
                self.hosts,
                self.rebalancing,
                request.name,
                dict(request.set),
                list(request.remove),
                request.rebalance,
            )
            return to_proto(view, pb.HostView)

        return await _guard(context, run())


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    def __init__(self, cluster: Cluster, rebalancing: Rebalancing) -> None:
        self.cluster = cluster
        self.rebalancing = rebalancing

    async def GetClusterStatus(self, request: pb.Empty, context: Ctx) -> pb.ClusterStatus:
        async def run() -> pb.ClusterStatus:
            return to_proto(await self.cluster.status(), pb.ClusterStatus)

        return await _guard(context, run())

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Ctx
    ) -> AsyncIterator[pb.Event]:
        try:
            async for event in self.cluster.events(request.kinds):
                yield to_proto(event, pb.Event)
        except HvplaceError as e:
            await _abort(context, e)

    async def Simulate(self, request: pb.SimulateRequest, context: Ctx) -> pb.SimulateResponse:
        async def run() -> pb.SimulateResponse:
            result = await self.cluster.simulate(
                list(request.fail_hosts), request.topology_key, request.domain
            )
            return to_proto(result, pb.SimulateResponse)

        return await _guard(context, run())

    async def CheckAdmission(self, request: pb.Empty, context: Ctx) -> pb.AdmissionReport:
        async def run() -> pb.AdmissionReport:
            return to_proto(await self.cluster.headroom(), pb.AdmissionReport)

        return await _guard(context, run())

    async def PreviewRebalance(
        self, request: pb.RebalanceRequest, context: Ctx
    ) -> pb.RebalanceResponse:
        async def run() -> pb.RebalanceResponse:
            view = await self.rebalancing.preview(request.max_moves)
            return to_proto(view, pb.RebalanceResponse)

        return await _guard(context, run())

    async def Rebalance(self, request: pb.RebalanceRequest, context: Ctx) -> pb.RebalanceResponse:
        async def run() -> pb.RebalanceResponse:
            view = await self.rebalancing.apply(request.max_moves)
            return to_proto(view, pb.RebalanceResponse)

        return await _guard(context, run())


class ImageServicer(pb_grpc.ImageServiceServicer):
    def __init__(self, images: Catalogue) -> None:
        self.images = images

    async def AddImage(self, request: pb.Image, context: Ctx) -> pb.Image:
        async def run() -> pb.Image:
            image = await self.images.add(from_proto(records.Image, request))
            return to_proto(image, pb.Image)

        return await _guard(context, run())

    async def GetImage(self, request: pb.ImageRef, context: Ctx) -> pb.Image:
        async def run() -> pb.Image:
            return to_proto(await self.images.get(request.name), pb.Image)

        return await _guard(context, run())

    async def ListImages(self, request: pb.Empty, context: Ctx) -> pb.ListImagesResponse:
        async def run() -> pb.ListImagesResponse:
            images = await self.images.list_all()
            return pb.ListImagesResponse(images=[to_proto(i, pb.Image) for i in images])

        return await _guard(context, run())

    async def DeleteImage(self, request: pb.DeleteImageRequest, context: Ctx) -> pb.Empty:
        async def run() -> pb.Empty:
            await self.images.delete(request.name, request.force)
            return pb.Empty()

        return await _guard(context, run())


@dataclass(frozen=True, slots=True)
class _Malformed:
    """What the request deserializer yields for bytes that are no valid message."""

    error: str


# grpc-stubs make the interceptor generic; the runtime class is not subscriptable.
class _MalformedIsIncorrect(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Bytes that do not decode (bad UTF-8 in a string, a truncated field) are refused as
    `incorrect` like any malformed input; gRPC alone would answer UNKNOWN."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def safe_decode(raw: bytes) -> Any:
            try:
                return decode(raw)
            except DecodeError as e:
                return _Malformed(str(e))

        def refusal(request: _Malformed) -> grpc.Status:
            return rich_status(InvalidInput(f"malformed request: {clip(request.error)}"))

        if handler.unary_unary is not None:
            call = handler.unary_unary

            async def unary(request: Any, context: Ctx) -> Any:
                if isinstance(request, _Malformed):
                    await context.abort_with_status(refusal(request))  # type: ignore[attr-defined]
                return await call(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, safe_decode, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def streaming(request: Any, context: Ctx) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await context.abort_with_status(refusal(request))  # type: ignore[attr-defined]
                async for item in stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                streaming, safe_decode, handler.response_serializer
            )
        return handler


@dataclass
class ApiServer:
    """A running gRPC server; `port` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def api_security(cfg: CoordinatorConfig) -> dict[str, Any]:
    """The authenticator and TLS settings `start_api_server` takes, from the config."""
    auth = Authenticator(
        auth_file=Path(cfg.auth_file) if cfg.auth_file else None,
        anonymous_role=Role.parse(cfg.anonymous_role, "anonymous_role")
        if cfg.anonymous_role
        else None,
    )
    tls = ServerTLS.load(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert else None
    if tls is None and auth.anonymous_role is None:
        log.warning("the API serves plain text: bearer tokens cross the network unencrypted")
    return {"auth": auth, "tls": tls}


async def start_api_server(
    ops: Operations,
    address: str = "127.0.0.1:7400",
    *,
    auth: Authenticator | None = None,
    tls: ServerTLS | None = None,
    rpc_metrics: RpcMetricsInterceptor | None = None,
) -> ApiServer:
    """Serve the five hvplace services, health and reflection on `address` (host:port).
    With `auth`, every hvplace call is authenticated and authorised (None: tests of the
    API logic only; the daemon always passes one). `rpc_metrics` goes first, so that the
    calls `auth` refuses are counted too."""
    interceptors: list[Any] = [rpc_metrics] if rpc_metrics is not None else []
    interceptors.append(_MalformedIsIncorrect())
    if auth is not None:
        interceptors.append(AuthInterceptor(auth))
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_VMServiceServicer_to_server(VMServicer(ops.vms), server)
    pb_grpc.add_RuleServiceServicer_to_server(RuleServicer(ops.rules), server)
    pb_grpc.add_HostServiceServicer_to_server(HostServicer(ops.hosts, ops.rebalancing), server)
    pb_grpc.add_ClusterServiceServicer_to_server(
        ClusterServicer(ops.cluster, ops.rebalancing), server
    )
    pb_grpc.add_ImageServiceServicer_to_server(ImageServicer(ops.images), server)
    from hvplace.coordinator.maintenance_api import MaintenanceServicer

    pb_grpc.add_MaintenanceServiceServicer_to_server(MaintenanceServicer(ops), server)
    checker = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    package = pb.DESCRIPTOR.package
    names = [f"{package}.{s}" for s in SERVICES]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    if tls is not None:
        port = server.add_secure_port(address, tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ["", *names]:
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ApiServer(server=server, port=port, health=checker)
