"""Errors a person can act on: each message says what is wrong and what to do."""


class SvcnetError(Exception):
    """Base class: the CLI prints the message and exits non-zero."""

    exit_code = 1


class ValidationError(SvcnetError):
    """Input that can never be valid as given (bad name, bad CIDR, ...)."""

    exit_code = 2


class NotFoundError(SvcnetError):
    """A named object does not exist."""


class ConflictError(SvcnetError):
    """The input is valid but clashes with what is already there (name, IP, subnet)."""


class ExhaustedError(SvcnetError):
    """A subnet has no free address left."""


class EtcdUnavailableError(SvcnetError):
    """etcd cannot be reached."""


class AgentUnavailableError(SvcnetError):
    """The local svcnet agent cannot be reached or started."""
