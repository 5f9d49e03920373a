"""Exceptions shared by every sga package."""


class SgaError(Exception):
    """A failure the user can fix: the message names the file and the fix.

    The CLI prints it without a traceback and exits with status 2.
    """


class ShardReadError(SgaError):
    """A shard could not be read completely (truncated, corrupt or unreadable).

    ``samples_read`` counts the complete samples yielded before the failure, so callers can
    record the remainder as errors instead of losing it silently.
    """

    def __init__(self, uri: str, reason: str, samples_read: int = 0):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason
        self.samples_read = samples_read


class SampleError(SgaError):
    """One sample was rejected; it becomes an error row (key, stage, reason) in the manifest."""

    def __init__(self, key: str, stage: str, reason: str):
        super().__init__(f"{key}: {stage}: {reason}")
        self.key = key
        self.stage = stage
        self.reason = reason


class JobFailed(SgaError):
    """A job ran to its end but its outcome is a failure (too many rejected samples, a shard lost whole).

    Unlike a refusal (exit status 2, nothing done), what the job wrote is kept and its summary is printed;
    the CLI then prints the message on stderr and exits with :data:`JOB_FAILED_EXIT` so schedulers notice.
    """

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


JOB_FAILED_EXIT = 3
