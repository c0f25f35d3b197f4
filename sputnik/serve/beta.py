"""DeepSeek's /beta endpoints: chat prefix completion (/beta/chat/completions, the last message an assistant's with
"prefix": true) and fill-in-the-middle (/beta/completions with a `suffix`). Both run the /v1 code paths; prefix
completion is refused on /v1, as DeepSeek does."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from sputnik.serve.chat import chat_response
from sputnik.serve.completions import completions_router
from sputnik.serve.keys import KeyRecord
from sputnik.serve.protocol import ChatCompletionRequest
from sputnik.serve.server import Server


def beta_router(server: Server) -> APIRouter:
    router = APIRouter()

    @router.post("/beta/chat/completions")
    async def beta_chat(body: ChatCompletionRequest, request: Request,
                        _: KeyRecord | None = Depends(server.authorize)):
        return await chat_response(server, body, request, beta=True)

    router.include_router(completions_router(server, prefix="/beta"))
    return router
