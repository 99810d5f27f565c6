"""The images' health checks (deploy/Containerfile's HEALTHCHECK), with nothing but what the image holds.

    python deploy/healthcheck.py grpc [PORT...]
                                        the trunk: gRPC health on 127.0.0.1:$GPT2_SERVER_PORT (or on each PORT:
                                        scripts/run_all.sh's replicas) is SERVING (over TLS when GPT2_TLS_CERT is
                                        set: trusting GPT2_HEALTH_CA, else that certificate, for the name
                                        GPT2_HEALTH_NAME, else localhost)
    python deploy/healthcheck.py http   the client: its app ($GPT2_CLIENT_PORT) or API ($GPT2_API_PORT) answers HTTP

Exit 0 when healthy, 1 with one line on stderr when not.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def grpc_ok(*ports: str) -> str | None:
    for port in ports or (os.environ.get("GPT2_SERVER_PORT", "50051"),):
        problem = _grpc_serving(f"127.0.0.1:{port}")
        if problem:
            return problem
    return None


def _grpc_serving(target: str) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cert = os.environ.get("GPT2_TLS_CERT")
    if cert:
        root = Path(os.environ.get("GPT2_HEALTH_CA") or cert).read_bytes()
        name = os.environ.get("GPT2_HEALTH_NAME", "localhost")
        channel = grpc.secure_channel(
            target, grpc.ssl_channel_credentials(root), options=[("grpc.ssl_target_name_override", name)]
        )
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
        except grpc.RpcError as e:
            return f"{target}: {e.code().name}"
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return None if serving else f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"


def http_ok(*_: str) -> str | None:
    tried = []
    for port in (os.environ.get("GPT2_CLIENT_PORT", "7860"), os.environ.get("GPT2_API_PORT", "8000")):
        url = f"http://127.0.0.1:{port}/"
        try:
            urllib.request.urlopen(url, timeout=4).close()
            return None
        except urllib.error.HTTPError as e:  # an answer: it serves (a login or a key may guard it)
            if e.code < 500:
                return None
            tried.append(f"{url}: HTTP {e.code}")
        except OSError as e:
            tried.append(f"{url}: {e}")
    return "; ".join(tried)


def main() -> int:
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    checks = {"grpc": grpc_ok, "http": http_ok}
    if kind not in checks:
        print("usage: healthcheck.py grpc|http", file=sys.stderr)
        return 2
    problem = checks[kind](*sys.argv[2:])
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
