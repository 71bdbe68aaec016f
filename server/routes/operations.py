"""What orchestrators and monitoring ask, without an API key: liveness (/health), readiness (/ready), metrics."""
from fastapi import APIRouter
from fastapi.responses import Response

from server.errors import error_response
from server.lifecycle import Lifecycle
from server.metrics import Metrics


def router(lifecycle: Lifecycle, metrics: Metrics) -> APIRouter:
    routes = APIRouter()

    @routes.get("/health")
    async def health():
        """Liveness: 200 once the model is loaded and while its engine runs; 503 while it loads, and once the
        engine died or hung (the process then exits)."""
        return Response(status_code=200) if lifecycle.healthy else error_response(lifecycle.refusal())

    @routes.get("/ready")
    async def ready():
        """Readiness: loaded, warmed up, and not draining."""
        return Response(status_code=200) if lifecycle.accepting else error_response(lifecycle.refusal())

    @routes.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return routes
