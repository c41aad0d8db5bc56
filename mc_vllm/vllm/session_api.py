"""HTTP routes for persistent sessions, added to vLLM's API server beside the OpenAI ones.

* ``GET /v1/mc/sessions``: every stored session (:class:`~mc_vllm.core.sessions.SessionInfo`),
  most recently updated first, and the retention limits;
* ``GET /v1/mc/sessions/{id}``: one session (404 when unknown);
* ``DELETE /v1/mc/sessions/{id}``: delete it (404 unknown, 409 while a request uses it).

Errors use the OpenAI error body vLLM answers with (``{"error": {"message", "type",
"param", "code"}}``). No vLLM import: FastAPI only.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from ..core.sessions import SessionError, SessionRoot
from ..core.storage import StorageError

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError"}


def error_body(message: str, status: int, param: str = "mc_session") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": _TYPES.get(status, "BadRequestError"), "param": param,
        "code": status}})


def attach_session_routes(app: FastAPI, root: Callable[[], SessionRoot]) -> None:
    """Add the session routes to ``app``; ``root()`` gives the server's session root."""
    router = APIRouter()

    @router.get("/v1/mc/sessions")
    def list_sessions() -> JSONResponse:
        r = root()
        return JSONResponse({"object": "list", "root": str(r.root),
                             "max_tokens_per_session": r.max_tokens,
                             "max_bytes": r.max_bytes,
                             "data": [s.to_dict() for s in r.list()]})

    @router.get("/v1/mc/sessions/{session_id}")
    def get_session(session_id: str) -> JSONResponse:
        try:
            return JSONResponse(root().info(session_id).to_dict())
        except SessionError as e:
            return error_body(str(e), e.status)
        except StorageError as e:
            return error_body(f"mc_session={session_id!r}: unreadable ({e})", 409)

    @router.delete("/v1/mc/sessions/{session_id}")
    def delete_session(session_id: str) -> JSONResponse:
        try:
            root().delete(session_id)
        except SessionError as e:
            return error_body(str(e), e.status)
        return JSONResponse({"id": session_id, "deleted": True})

    app.include_router(router)
