"""Per-token timings and per-generation statistics, shared by the split client and the full baseline."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class TokenTiming:
    """Where one token's time went. server/network are None when there is no server (full model)."""

    total_ms: float  # wall time from the start of this step to the token being chosen
    client_ms: float  # local compute: embeddings, bottom, top, head, sampling
    server_ms: float | None = None  # trunk compute as reported by the server
    network_ms: float | None = None  # total - client - server: transport, serialisation, queues
    bytes_out: int = 0  # bytes sent to the trunk for this step
    bytes_in: int = 0  # bytes received from the trunk for this step


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0}
    return {
        "mean": statistics.fmean(values),
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }


@dataclass
class GenerationStats:
    """Statistics of one generation; token 0's latency is the time to first token (includes the prefill)."""

    prompt_tokens: int = 0
    tokens: list[TokenTiming] = field(default_factory=list)
    wall_s: float = 0.0  # from request to last token
    speculation: object = None  # SpeculationStats of a speculative generation (splitcore/speculative.py)

    def add(self, t: TokenTiming) -> None:
        self.tokens.append(t)

    @property
    def ttft_ms(self) -> float:
        return self.tokens[0].total_ms if self.tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_ms(self) -> list[float]:
        """Latencies of the tokens after the first: the steady per-token cost."""
        return [t.total_ms for t in self.tokens[1:]]

    def to_dict(self) -> dict:
        def col(name: str) -> list:
            return [getattr(t, name) for t in self.tokens]

        split = any(t.server_ms is not None for t in self.tokens)
        d = {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": len(self.tokens),
            "ttft_ms": self.ttft_ms,
            "tokens_per_s": self.tokens_per_s,
            "wall_s": self.wall_s,
            "per_token_ms": col("total_ms"),
            "decode_ms": summarize(self.decode_ms),
            "client_ms": col("client_ms"),
        }
        if split:
            d |= {
                "server_ms": col("server_ms"),
                "network_ms": col("network_ms"),
                "bytes_out": col("bytes_out"),
                "bytes_in": col("bytes_in"),
            }
        if self.speculation is not None:
            d["speculation"] = self.speculation.to_dict(len(self.tokens))
        return d

    def rows(self) -> list[dict]:
        return [{"token": i, **asdict(t)} for i, t in enumerate(self.tokens)]
