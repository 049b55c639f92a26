"""The base of every error dcgan_jax reports to its users in one line.

Each module raises its own kind (ConfigError, DataError, CheckpointError, ...), all derived
from `UserFacingError`, so a command line catches this one type and prints the message,
while programming errors keep their tracebacks. Imports nothing.
"""


class UserFacingError(Exception):
    """A problem with what the user gave (a config field, a path, a file, a flag), told in
    one actionable line that names it."""
