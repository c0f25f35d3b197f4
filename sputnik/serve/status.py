"""/health, /metrics and /v1/models: what a load balancer, Prometheus and a client ask before a request."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from sputnik.serve.keys import KeyRecord
from sputnik.serve.server import Server


def status_router(server: Server) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health():
        if server.loaded is not None:
            return {"status": "ok"}
        status = "error" if server.error else "loading"
        return JSONResponse({"status": status, "error": server.error}, status_code=503)

    @router.get("/metrics")  # an API key, as for every route that shows how the server is used
    async def metrics_text(_: KeyRecord | None = Depends(server.authorize)):
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/models")
    async def models(_: KeyRecord | None = Depends(server.authorize)):
        b = server.backend()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "sputnik"}
                                           for n in await server.served_names(b)]}

    return router
