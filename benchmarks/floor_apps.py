"""The ASGI apps bench_http_floor.py serves: a bare one (answers every request with a fixed
submit-shaped body, no framework) and, where FastAPI is installed (pyoco-server's venv), the
same route as a FastAPI endpoint with a pydantic body model, as pyoco-server declares it.
(No ``from __future__ import annotations``: FastAPI reads the local model from the annotation.)"""


from typing import Any

BODY = b'{"run_id":"00000000-0000-4000-8000-000000000000","status":"PENDING","bundle_hash":null}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # read the request body, as a real handler must
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def __getattr__(name: str) -> Any:
    if name != "fastapi_app":
        raise AttributeError(name)
    from fastapi import FastAPI
    from pydantic import BaseModel

    class RunSubmit(BaseModel):
        flow_name: str
        params: dict[str, Any] = {}
        tag: str | None = None
        tags: list[str] | None = None

    app = FastAPI()

    @app.post("/runs")
    async def submit(body: RunSubmit) -> dict[str, Any]:
        return {"run_id": "00000000-0000-4000-8000-000000000000", "status": "PENDING", "bundle_hash": None}

    return app
