"""vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info): what lm-eval's remote tokenizer and other
clients use to count and cut text exactly as the served model does."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from sputnik.serve.backend import EngineBackend
from sputnik.serve.chat import chat_prompt
from sputnik.serve.keys import KeyRecord
from sputnik.serve.protocol import _CONFIG, APIError, ChatMessage, prompt_messages
from sputnik.serve.server import Backend, Server


class TokenizeRequest(BaseModel):
    """Text (`prompt`) or chat `messages` to tokenize, as vLLM takes them."""

    model_config = _CONFIG

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # messages only; the template's generation prompt is always added


class DetokenizeRequest(BaseModel):
    """Token ids to turn back into text."""

    model_config = _CONFIG

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def _engine(b: Backend) -> EngineBackend:
    if not isinstance(b, EngineBackend):
        raise APIError(400, "this server forwards to an upstream; tokenize there", code="not_supported")
    return b


def tokens_router(server: Server) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest, _: KeyRecord | None = Depends(server.authorize)) -> dict[str, Any]:
        b = _engine(server.backend())
        await server.check_model(b, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either `prompt` or `messages`", param="prompt")
        if body.messages is not None:
            ids = chat_prompt(b, prompt_messages(body.messages))[0]
        else:
            ids = b.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": b.context}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, _: KeyRecord | None = Depends(server.authorize)) -> dict:
        b = _engine(server.backend())
        await server.check_model(b, body.model)
        bad = [t for t in body.tokens if t >= b.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary of {b.tokenizer.vocab_size}",
                           param="tokens")
        return {"prompt": b.tokenizer.decode(body.tokens)}

    @router.get("/tokenizer_info")
    async def tokenizer_info(_: KeyRecord | None = Depends(server.authorize)) -> dict:
        tok = _engine(server.backend()).tokenizer
        return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "chat_template": tok.chat_template, "vocab_size": tok.vocab_size, "model_max_length":
                server.backend().context}

    return router
