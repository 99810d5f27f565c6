"""What the split client and the full-model baseline both offer their users, over whichever engine they run: the
OpenAI-compatible HTTP API (api.py) and the command line's shared pieces (cli.py). Neither loads gRPC."""
