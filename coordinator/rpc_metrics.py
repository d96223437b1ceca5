"""Per-RPC metrics for the gRPC API: requests and latency by service, method and status
code, from a server interceptor placed first so that refused calls are counted too."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

Ctx = grpc.aio.ServicerContext[Any, Any]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _split(method: str) -> tuple[str, str]:
    """'/hvplace.v1.VMService/GetVM' -> ('VMService', 'GetVM')."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service.rpartition(".")[2], name


def _code(context: Ctx, error: BaseException | None) -> str:
    """The status the caller sees: what the handler (or an interceptor) set, else OK, or
    UNKNOWN for an exception that set none (grpc reports it so)."""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK.name if error is None else grpc.StatusCode.UNKNOWN.name
    return str(getattr(code, "name", code))


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every call of a registered method; times the unary ones (a stream's length
    is how long its watcher stayed, not a latency)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["service", "method", "code"]
        self.requests = Counter(
            "hvplace_api_requests_total",
            "gRPC calls finished, by service, method and status code.",
            labels,
            registry=registry,
        )
        self.latency = Histogram(
            "hvplace_api_request_duration_seconds",
            "Duration of unary gRPC calls, by service, method and status code.",
            labels,
            buckets=_BUCKETS,
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED, unlabelled
            return handler
        service, method = _split(details.method)
        requests, latency = self.requests, self.latency

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Ctx) -> Any:
                started = time.perf_counter()
                error: BaseException | None = None
                try:
                    return await inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    code = _code(context, error)
                    requests.labels(service, method, code).inc()
                    latency.labels(service, method, code).observe(time.perf_counter() - started)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def count(context: Ctx, error: BaseException | None) -> None:
                requests.labels(service, method, _code(context, error)).inc()

            if inspect.isasyncgenfunction(inner_stream):

                async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
                    error: BaseException | None = None
                    try:
                        async for item in inner_stream(request, context):
                            yield item
                    except BaseException as e:
                        error = e
                        raise
                    finally:
                        count(context, error)

                behaviour: Any = stream
            else:  # a coroutine that writes through the context (grpc's health Watch)

                async def writer(request: Any, context: Ctx) -> None:
                    error: BaseException | None = None
                    try:
                        await inner_stream(request, context)
                    except BaseException as e:
                        error = e
                        raise
                    finally:
                        count(context, error)

                behaviour = writer
            return grpc.unary_stream_rpc_method_handler(
                behaviour,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs exist
