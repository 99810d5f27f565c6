"""The API's schema and errors: OpenAI's request bodies, its error body and statuses, the chat template."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from splitcore.errors import InvalidInput, LimitExceeded, RemoteError, RemoteUnavailable

logger = logging.getLogger(__name__)

MAX_USER = 256  # characters of a request's `user`
CHAT_TEMPLATE = {"system": "System: {}\n", "user": "User: {}\n", "assistant": "Assistant: {}\n"}
CHAT_PROMPT_END = "Assistant:"
CHAT_STOP = "\nUser:"
MAX_STOPS = 4
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions
CHAT_MAX_TOKENS = 256  # chat's default, or what is left of the context if less


class APIError(Exception):
    """An error with OpenAI's body and an HTTP status."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body: what every status but 200 carries."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """The error statuses a route returns, declared with their body in its OpenAPI schema."""
    why = {
        400: "Bad request: a wrong or missing field, or too many tokens (code context_length_exceeded)",
        401: "Missing or wrong API key (--api-key)",
        404: "Unknown model (GET /v1/models lists them)",
        502: "The trunk server refused the request",
        503: "The trunk server cannot be reached or has no room",
    }
    return {s: {"model": ErrorBody, "description": why[s]} for s in statuses}


STREAMED = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events: `data: {chunk}` each, then "
        "`data: [DONE]`",
        "content": {"text/event-stream": {"schema": {}}},  # each event: a chunk of the JSON answer, or [DONE]
    }
}
GENERATION_RESPONSES = STREAMED | error_responses(400, 401, 404, 502, 503)


# --- requests -----------------------------------------------------------------------------------------------
class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of OpenAI's that do not apply here are accepted and unused

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None


class CompletionRequest(BaseRequest):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None  # OpenAI's four forms
    max_tokens: int | None = Field(COMPLETION_MAX_TOKENS, ge=0)  # 0, with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The conversation as a GPT-2 prompt (CHAT_TEMPLATE), ending where the assistant's answer starts."""
    if not messages:
        raise bad_request("messages must hold at least one message", "messages")
    turns = []
    for i, m in enumerate(messages):
        content = m.content or ""
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise bad_request("only text content parts are supported", f"messages[{i}].content")
            content = "".join(str(part.get("text", "")) for part in content)
        turns.append(CHAT_TEMPLATE["system" if m.role == "developer" else m.role].format(content.strip()))
    return "".join(turns) + CHAT_PROMPT_END


def include_usage(r: BaseRequest) -> bool:
    """OpenAI's stream_options.include_usage: one more chunk, with usage and no choices."""
    return bool((r.stream_options or {}).get("include_usage"))


def api_error(e: Exception) -> APIError:
    if isinstance(e, RemoteUnavailable):
        return APIError(503, f"the trunk server cannot be reached: {e}", "server_error", None, "trunk_unavailable")
    if isinstance(e, RemoteError) and e.status == "RESOURCE_EXHAUSTED":  # no free KV slot, sessions
        return APIError(503, f"the trunk server is at capacity: {e}", "server_error", None, "trunk_busy")
    if isinstance(e, RemoteError):
        return APIError(502, f"the trunk server refused the request: {e}", "server_error", None, "trunk_error")
    if isinstance(e, LimitExceeded):
        return bad_request(str(e), None, "context_length_exceeded")
    if isinstance(e, InvalidInput):
        return bad_request(str(e))
    return APIError(500, str(e), "server_error")
