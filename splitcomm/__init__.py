"""The network without models: tensor codec, gRPC channels and servers, the trunk client, monitoring samples."""
