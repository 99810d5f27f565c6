"""The app: its routes over an engine, their responses, and the entry point."""

from __future__ import annotations

import argparse
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from frontend.api.schema import (
    CHAT_MAX_TOKENS,
    CHAT_STOP,
    COMPLETION_MAX_TOKENS,
    GENERATION_RESPONSES,
    MAX_STOPS,
    MAX_USER,
    APIError,
    BaseRequest,
    ChatRequest,
    CompletionRequest,
    api_error,
    bad_request,
    chat_prompt,
    error_responses,
    include_usage,
)
from frontend.api.streaming import Job, Piece, chain, gather, merge, pieces, sse, timings, with_timings
from splitcore.engine import Engine
from splitcore.errors import SplitError
from splitcore.generate import PromptLogprobs
from splitcore.sampling import SamplingParams
from splitcore.settings import is_loopback

logger = logging.getLogger(__name__)


# --- the app ------------------------------------------------------------------------------------------------
class API:
    """The routes over one engine; `app` is the FastAPI application."""

    def __init__(self, engine: Engine, model_card: dict, api_key: str | None = None, max_concurrent: int = 64):
        self.engine, self.card, self.api_key = engine, model_card, api_key
        self.model_id = model_card["id"]
        self.limiter = anyio.CapacityLimiter(max_concurrent)  # worker threads for generations at once
        app = FastAPI(title="GPT-2 split client: OpenAI-compatible API", docs_url=None, redoc_url=None)
        app.add_exception_handler(APIError, lambda request, e: e.response())
        app.add_exception_handler(RequestValidationError, self._invalid)
        app.add_exception_handler(StarletteHTTPException, self._http_error)
        app.middleware("http")(self._authenticate)
        app.get("/v1/models", responses=error_responses(401))(self.models)
        app.get("/v1/models/{model_id:path}", responses=error_responses(401, 404))(self.model)
        app.post("/v1/completions", responses=GENERATION_RESPONSES)(self.completions)
        app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)(self.chat_completions)
        app.get("/health")(lambda: {"status": "ok"})
        app.openapi = functools.partial(_openapi, app, lambda: [c["id"] for c in self._cards()])
        self.app = app

    # --- plumbing ---
    async def _authenticate(self, request: Request, call_next):
        if self.api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
                what = "Incorrect API key provided" if got else "No API key provided (Authorization: Bearer ...)"
                return APIError(401, what, "invalid_request_error", None, "invalid_api_key").response()
        return await call_next(request)

    @staticmethod
    def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Errors the framework raises itself (a body that is not JSON text, an unknown path), in OpenAI's shape."""
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return APIError(e.status_code, str(e.detail), kind).response()

    @staticmethod
    def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif where:
            message = f"{'.'.join(where)}: {message}"
        return bad_request(message, ".".join(where) or None).response()

    def _check_model(self, model: str) -> str:
        """The adapter a request's `model` names: the base model's id ("") or an adapter's name; else a 404."""
        if model == self.model_id:
            return self.engine.BASE
        if model in self.engine.adapters:
            return model
        served = ", ".join([self.model_id, *self.engine.adapters])
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves {served} (GET /v1/models)",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    def _cards(self) -> list[dict]:
        """The base model's card and one per adapter, served as a model of its own (as vLLM serves LoRA)."""
        adapter = {"object": "model", "created": self.card["created"], "owned_by": "gpt2-split"}
        return [self.card] + [
            adapter | {"id": name, "parent": self.model_id, "root": self.model_id, "adapter": name}
            for name in self.engine.adapters
        ]

    def _job(self, r: BaseRequest, ids: list[int], max_new: int | None, default_max: int, logprobs: int | None) -> Job:
        if r.n != 1:
            raise bad_request("n must be 1: one completion per request (send several requests)", "n")
        stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise bad_request(f"stop takes up to {MAX_STOPS} non-empty strings", "stop")
        if not ids:
            raise bad_request("the prompt is empty: give at least one token of text", "prompt")
        room = self.engine.n_positions - len(ids)
        if max_new is None:
            max_new = min(default_max, room)
        if max_new > room or room < 1 and max_new:
            raise bad_request(
                f"This model's maximum context length is {self.engine.n_positions} tokens. However, you requested "
                f"{len(ids) + max_new} tokens ({len(ids)} in the prompt, {max_new} for the completion). Please "
                f"reduce the prompt or max_tokens.",
                "max_tokens" if room >= 1 else "prompt",
                "context_length_exceeded",
            )
        if r.user is not None and len(r.user) > MAX_USER:
            raise bad_request(f"user takes at most {MAX_USER} characters", "user")
        top_k = 0 if r.temperature == 0 else self.engine.tokenizer.vocab_size  # OpenAI has no top-k
        job = Job(ids, max_new, SamplingParams(r.temperature, top_k, r.top_p, r.seed), stops, logprobs)
        job.user = r.user or ""
        return job

    async def _stream_pieces(self, job: Job, request: Request | None = None) -> AsyncIterator[Piece]:
        """The pieces of a generation, each computed on a worker thread. When the client has gone (asked between
        tokens: uvicorn does not fail a write to a closed connection) or the task is cancelled, the thread's step
        finishes and the generation is closed, which ends its trunk session."""
        it = pieces(self.engine, job)
        try:
            while True:
                if request is not None and await request.is_disconnected():
                    logger.info("client gone: generation stopped after %d tokens", len(job.stats.tokens))
                    return
                piece = await anyio.to_thread.run_sync(next, it, None, limiter=self.limiter)
                if piece is None:
                    return
                yield piece
        except SplitError as e:
            raise api_error(e) from e
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(it.close)

    async def _collect(self, job: Job) -> list[Piece]:
        if job.max_new == 0:  # nothing to generate: the prompt scored alone, if asked
            if job.prompt_lps is not None:
                job.prompt_lps.extend(await self._score(job))
            return []
        return [p async for p in self._stream_pieces(job)]

    async def _score(self, job: Job) -> PromptLogprobs:
        try:
            score = functools.partial(self.engine.score, job.ids, job.logprobs or 0, job.adapter, job.user)
            return await anyio.to_thread.run_sync(score, limiter=self.limiter)
        except SplitError as e:
            raise api_error(e) from e

    async def _started(self, job: Job, request: Request) -> tuple[Piece | None, AsyncIterator[Piece]]:
        """The first piece and the rest: a request that cannot start (no trunk, say) fails with its status
        before the stream's 200 goes out."""
        rest = self._stream_pieces(job, request)
        return await anext(rest, None), rest

    # --- routes ---
    async def models(self) -> dict:
        return {"object": "list", "data": self._cards()}

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return next(c for c in self._cards() if c["id"] == model_id)

    def _prompts(self, prompt) -> list[tuple[list[int], str]]:
        """The request's prompts, each as (token ids, text), from any of OpenAI's four forms: a string, a list of
        strings, a list of token ids, a list of lists of token ids."""
        if prompt is None or prompt == [] or prompt == "":
            raise bad_request("you must provide a prompt", "prompt")
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        vocab = self.engine.tokenizer.vocab_size
        out = []
        for p in prompt:
            ids = self.engine.encode(p) if isinstance(p, str) else list(p)
            if any(not 0 <= i < vocab for i in ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
            out.append((ids, p if isinstance(p, str) else self.engine.decode(ids)))
        return out

    async def completions(self, r: CompletionRequest, request: Request):
        """Each prompt is a generation and a trunk session of its own, all at once (they batch on the trunk);
        choice i answers prompt i."""
        adapter = self._check_model(r.model)
        jobs = []
        for ids, text in self._prompts(r.prompt):
            job = self._job(r, ids, r.max_tokens, COMPLETION_MAX_TOKENS, r.logprobs)
            job.adapter = adapter
            job.echo = text if r.echo else ""
            job.prompt_lps = [] if r.echo and r.logprobs is not None else None
            jobs.append(job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": r.model}

        def choice(i: int, text: str, ps: list[Piece], finish: str | None, offset: int, echo: bool = False) -> dict:
            job, lp = jobs[i], None
            if job.logprobs is not None:
                lp = self._completion_logprobs(ps, offset)
                if echo and job.prompt_lps is not None:
                    lp = _joined(self._prompt_logprobs(job), lp)
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

        if not r.stream:
            results = await gather([self._collect(job) for job in jobs])
            choices = [
                choice(i, job.echo + "".join(p.text for p in ps), ps, _finish(ps), len(job.echo), echo=bool(job.echo))
                for i, (job, ps) in enumerate(zip(jobs, results, strict=True))
            ]
            return head | {"choices": choices, "usage": _usage(*jobs), "timings": timings(jobs[0].stats)}

        merged = merge([self._job_pieces(job, request) for job in jobs])
        first = await anext(merged, None)  # a request that cannot start fails with its status before the 200

        async def chunks() -> AsyncIterator[dict]:
            offsets = [len(job.echo) for job in jobs]
            for i, job in enumerate(jobs):
                if job.echo or job.max_new == 0:
                    done = "length" if job.max_new == 0 else None
                    yield head | {"choices": [choice(i, job.echo, [], done, 0, echo=True)]}
            async for i, p in chain(first, merged):
                yield with_timings(head | {"choices": [choice(i, p.text, [p], p.finish, offsets[i])]}, p, jobs[i])
                offsets[i] += len(p.text)
            if include_usage(r):
                yield head | {"choices": [], "usage": _usage(*jobs)}

        return sse(chunks(), merged)

    async def _job_pieces(self, job: Job, request: Request) -> AsyncIterator[Piece]:
        """A job's pieces as it streams; one with nothing to generate scores its prompt first, if asked."""
        if job.max_new == 0:
            await self._collect(job)
            return
        async for p in self._stream_pieces(job, request):
            yield p

    async def chat_completions(self, r: ChatRequest, request: Request):
        adapter = self._check_model(r.model)
        prompt = chat_prompt(r.messages)
        if r.top_logprobs is not None and not r.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (r.top_logprobs or 0) if r.logprobs else None
        max_new = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        job = self._job(r, self.engine.encode(prompt), max_new, CHAT_MAX_TOKENS, logprobs)
        job.stops = [*job.stops, CHAT_STOP]
        job.adapter = adapter
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def head(kind: str) -> dict:
            return {"id": rid, "object": kind, "created": created, "model": r.model}

        if not r.stream:
            ps = await self._collect(job)
            text = "".join(p.text for p in ps).lstrip()  # the template's "Assistant:" is followed by a space
            message = {"role": "assistant", "content": text}
            lp = {"content": self._chat_logprobs(ps)} if job.logprobs is not None else None
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": _finish(ps)}
            return head("chat.completion") | {
                "choices": [choice],
                "usage": _usage(job),
                "timings": timings(job.stats),
            }

        first, rest = await self._started(job, request)

        async def chunks() -> AsyncIterator[dict]:
            yield head("chat.completion.chunk") | {
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            }
            started = False
            async for p in chain(first, rest):
                text = p.text if started else p.text.lstrip()  # as the non-streamed answer
                started = started or bool(text)
                lp = {"content": self._chat_logprobs([p])} if job.logprobs is not None else None
                delta = {"content": text} if text else {}
                chunk = {"choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": p.finish}]}
                yield with_timings(head("chat.completion.chunk") | chunk, p, job)
            if include_usage(r):
                yield head("chat.completion.chunk") | {"choices": [], "usage": _usage(job)}

        return sse(chunks(), rest)

    # --- log-probabilities in OpenAI's two shapes ---
    def _token(self, token_id: int) -> str:
        return self.engine.tokenizer.convert_tokens_to_string([self.engine.tokenizer.convert_ids_to_tokens(token_id)])

    def _prompt_logprobs(self, job: Job) -> dict:
        """The echoed prompt's tokens in OpenAI's completion shape: the first has no log-probability (null)."""
        out = {"tokens": [], "token_logprobs": [None], "top_logprobs": [None], "text_offset": []}
        offset = 0
        for token_id in job.ids:
            token = self._token(token_id)
            out["tokens"].append(token)
            out["text_offset"].append(offset)
            offset += len(token)
        for lp, top in job.prompt_lps:
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._token(i): v for i, v in top})
        return out

    def _completion_logprobs(self, ps: list[Piece], offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for p in ps:
            if p.event is None:
                continue
            token = self._token(p.event.token_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(p.event.logprob)
            out["top_logprobs"].append({self._token(i): lp for i, lp in p.event.top_logprobs or []})
            out["text_offset"].append(offset)
            offset += len(p.text)
        return out

    def _chat_logprobs(self, ps: list[Piece]) -> list[dict]:
        def entry(token_id: int, lp: float) -> dict:
            token = self._token(token_id)
            return {"token": token, "logprob": lp, "bytes": list(token.encode())}

        return [
            entry(p.event.token_id, p.event.logprob)
            | {"top_logprobs": [entry(i, lp) for i, lp in p.event.top_logprobs or []]}
            for p in ps
            if p.event is not None
        ]


def _openapi(app: FastAPI, model_ids: Callable[[], list[str]]) -> dict:
    """FastAPI's schema, less the 422 it declares for every body (a malformed request gets a 400 here, as OpenAI's
    API answers it), and with the models a request may name (`model_ids`: the base model and its adapters)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for name in ("CompletionRequest", "ChatRequest"):
            schemas[name]["properties"]["model"]["enum"] = model_ids()
        app.openapi_schema = schema
    return app.openapi_schema


def _finish(ps: list[Piece]) -> str:
    return next((p.finish for p in reversed(ps) if p.finish), "length")


def _usage(*jobs: Job) -> dict:
    prompt, completion = sum(len(j.ids) for j in jobs), sum(len(j.stats.tokens) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _joined(a: dict, b: dict) -> dict:
    """Two stretches of completion log-probabilities, one after the other."""
    return {k: a[k] + b[k] for k in a}


# --- entry point --------------------------------------------------------------------------------------------
def model_card(engine) -> dict:
    """What GET /v1/models says of the model: OpenAI's fields, then the split's."""
    card = {"id": engine.model.spec, "object": "model", "created": int(time.time()), "owned_by": "gpt2-split"}
    card |= {
        "split": str(getattr(engine, "split", "")),
        "trunk": getattr(engine, "trunk_label", "in this process"),
        "context_length": engine.n_positions,
        "random_weights": engine.model.is_random,
        "adapters": list(engine.adapters),  # each also served as a model of its own name
    }
    return card


def serve(engine: Engine, args: argparse.Namespace) -> None:
    import uvicorn

    api = API(engine, model_card(engine), args.api_key)
    if not args.api_key and not is_loopback(args.host):
        logger.warning("the API listens on %s without --api-key: anyone who reaches it can generate", args.host)
    print(f"OpenAI-compatible API on http://{args.host}:{args.port}/v1 (model '{api.model_id}')", flush=True)
    try:
        uvicorn.run(api.app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
