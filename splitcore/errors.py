"""Exception types that core code raises and the server maps to gRPC status codes; a remote part's failures
(the trunk server's) are RemoteError, so that code above the network (the HTTP API) maps them without gRPC."""


class SplitError(Exception):
    """Base class for errors the project raises on purpose, each with a readable message."""


class InvalidInput(SplitError, ValueError):
    """A request or argument is malformed: wrong shape, dtype, range or value (INVALID_ARGUMENT)."""


class LimitExceeded(SplitError):
    """A configured or model limit was passed: context length, sessions, tokens (RESOURCE_EXHAUSTED)."""


class Mismatch(SplitError):
    """Both sides of a split disagree on the model, its weights or split points (FAILED_PRECONDITION)."""


class ModelSpecError(SplitError, ValueError):
    """A model spec cannot be resolved or loaded: bad name, missing directory, wrong architecture."""


class RemoteError(SplitError):
    """A remote part (the trunk server) refused or failed a call; `status` names its status (a gRPC code's name)."""

    @property
    def status(self) -> str:
        return "UNKNOWN"


class RemoteUnavailable(RemoteError):
    """A remote part cannot be reached, or went away."""
