"""Errors that userlens expects and reports to people as one clear message.

Anything raised as `UserlensError` is an *expected* failure (bad input, missing data, no
network): the CLI prints its message and exits non-zero without a traceback. Any other
exception is a bug and keeps its traceback.
"""


class UserlensError(Exception):
    """An expected failure with a message written for the person running userlens."""

    exit_code = 2
    # True where trying again may help (network, a remote store); orchestrators retry only these.
    retryable = False


class DataError(UserlensError):
    """Input data that cannot be read or does not match what userlens needs."""


class ValidationFailed(UserlensError):
    """The Great Expectations suites rejected the data; nothing downstream ran."""

    exit_code = 3


class ConfigError(UserlensError):
    """A bad value in params.yaml or on the command line."""


class DownloadError(DataError):
    """A download failed on the network: trying again may help."""

    retryable = True


class ServingError(UserlensError):
    """The feature store cannot answer: nothing published yet, an unknown user, a failed publish."""
