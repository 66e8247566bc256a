"""The error family and the exit codes it maps to.

Every failure a user can act on is one of these; the CLI prints `str(error)` as a single line and
exits with `error.exit_code`. Where a built-in fits (ValueError, FileNotFoundError, OSError,
TimeoutError) a class also inherits it, so callers that only know Python's exceptions still catch
it sensibly; IntegrityError, CheckpointChanged, CommandNotFound and Interrupted have no such twin
and inherit only AgentError. Every public error class of the agent is here, with its exit code.
"""

EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_NOT_FOUND = 3
EXIT_STORE = 4
EXIT_INTEGRITY = 5
EXIT_LOCAL = 6
EXIT_TIMEOUT = 7
EXIT_COMMAND_NOT_FOUND = 127
EXIT_SIGINT = 130  # Ctrl-C before our handlers were installed (a signal we catch exits 128 + signum)


class AgentError(Exception):
    """Base of every error the agent reports to the user."""

    exit_code = EXIT_INTERNAL


class ConfigError(AgentError, ValueError):
    """The spec, an environment variable or a flag is wrong: the user must fix it."""

    exit_code = EXIT_CONFIG


class NotFoundError(AgentError, FileNotFoundError):
    """A referenced job, checkpoint or object is not in the store."""

    exit_code = EXIT_NOT_FOUND


class StoreError(AgentError, OSError):
    """The store could not be reached or refused us (credentials, network, missing bucket)."""

    exit_code = EXIT_STORE


class TransientError(StoreError):
    """A failure worth retrying: reset, truncated or stalled body, 5xx, throttling."""


class ThrottledError(TransientError):
    """The store asked us to slow down (503 SlowDown, 429): retry, and send fewer requests at once."""


class ChecksumMismatch(TransientError):
    """A part did not match its checksum: retried once more in case the wire, not the store, was at fault."""


class IntegrityError(AgentError):
    """Data or a manifest does not match what was committed: never hand it to the trainer."""

    exit_code = EXIT_INTEGRITY


class LocalError(AgentError, OSError):
    """The local side is unusable: download folder, free space, the folder lock."""

    exit_code = EXIT_LOCAL


class CheckpointChanged(AgentError):
    """A file changed while the checkpoint was uploaded; the commit was not written."""

    exit_code = EXIT_LOCAL


class UnsafeEntry(ConfigError):
    """A link or special file the checkpoint cannot be uploaded with (never read through)."""


class CommandNotFound(AgentError):
    """The training command does not exist or cannot be executed (the shell's 127)."""

    exit_code = EXIT_COMMAND_NOT_FOUND


class LoadTimeoutError(AgentError, TimeoutError):
    """The overall deadline passed before everything was in place."""

    exit_code = EXIT_TIMEOUT


class Interrupted(AgentError):
    """A signal asked us to stop; state on disk is left resumable."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}; partial files kept for resume")
        self.exit_code = 128 + signum
