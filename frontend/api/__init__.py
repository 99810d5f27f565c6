"""An OpenAI-compatible HTTP API over any engine: `python -m client api` (the split model) and `python -m baseline
api` (the full model), port 8000 (env GPT2_API_PORT).

Existing tools (the `openai` package, LangChain, curl, lm-evaluation-harness) talk to it unchanged, and prompts
still never leave this machine: the split client's API runs where the client runs, and only hidden states go to
the trunk. Nothing here imports gRPC: a trunk's failures arrive as RemoteError.

- `POST /v1/completions` and `POST /v1/chat/completions`, streamed as server-sent events (`stream: true`) or
  not. `max_tokens`, `temperature`, `top_p`, `seed`, `stop` (up to 4 strings), `n` (1 only), `logprobs`
  (completions: 0-5; chat: `logprobs` + `top_logprobs` 0-20), `echo` (completions, without logprobs),
  `stream_options.include_usage`; `usage` counts tokens. Log-probabilities are the model's own (its logits
  before temperature and top-p), as OpenAI's are.
- `GET /v1/models`: the model, its split and trunk, and the adapter if one is loaded.
- Each request is a trunk session of its own, so concurrent requests batch on the trunk. A client that
  disconnects mid-stream stops its generation and its session closes.
- Bad input gets OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`) and status: 400 for
  wrong or missing fields and for too many tokens (`context_length_exceeded`), 401 for a missing or wrong key
  (`--api-key`), 404 for an unknown model, 503 when the trunk cannot be reached or has no room (no free KV
  slot), 502 when it refuses a request otherwise.
- Every response carries `timings`, which OpenAI's clients ignore: time to first token, and the client, server
  and network ms of the generation (the split's own breakdown; `GenerationStats`).

GPT-2 has no chat template; chat turns become a prompt by this one (CHAT_TEMPLATE, in the README too):

    System: {system message}
    User: {user message}
    Assistant: {assistant message}
    User: {user message}
    Assistant:

and "\\nUser:" is a stop sequence of every chat completion, so that the model's answer ends where it would start
writing the user's next turn.
"""

from frontend.api.routes import API, model_card, serve
from frontend.api.schema import CHAT_STOP, ChatMessage, chat_prompt

__all__ = ["API", "CHAT_STOP", "ChatMessage", "chat_prompt", "model_card", "serve"]
