"""The trunk server process: loads the middle blocks, serves sessions, streams monitoring, logs."""
