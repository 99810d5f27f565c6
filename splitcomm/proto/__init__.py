"""Generated gRPC stubs for protos/trunk.proto (scripts/gen_protos.py)."""
