"""The application: the life cycle as its lifespan, the middlewares, the error handlers and the routes."""
import contextlib

from fastapi import FastAPI

from server import errors, middleware
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.routes import generation, model, operations


def build_app(lifecycle: Lifecycle, metrics: Metrics) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        lifecycle.start()
        yield
        lifecycle.shutdown()

    app = FastAPI(title="nanoserve", description="OpenAI-compatible LLM server", lifespan=lifespan)
    middleware.install(app, lifecycle, metrics)
    errors.install(app)
    for routes in (generation.router(lifecycle), model.router(lifecycle), operations.router(lifecycle, metrics)):
        app.include_router(routes)
    return app
