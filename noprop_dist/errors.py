"""User-facing errors.

Every problem a user can cause (bad config, bad data, corrupt checkpoint, missing
cluster) is raised as a :class:`NoPropError` subclass whose message is one line that
names the problem and the fix. The CLI prints that line and exits with ``exit_code``
instead of showing a traceback.
"""


class NoPropError(Exception):
    """Base class: a one-line, actionable message; the CLI exits with ``exit_code``."""

    exit_code = 1


class ConfigError(NoPropError):
    """The configuration or the command line is wrong (checked before any work starts)."""

    exit_code = 2


class DataError(NoPropError):
    """A dataset is missing, malformed, or inconsistent."""


class CheckpointError(NoPropError):
    """A run directory or one of its files is missing, corrupt, or of an unknown schema."""


class ClusterError(NoPropError):
    """The Ray cluster is unreachable or cannot satisfy the requested placement."""


class TrainingDiverged(NoPropError):
    """A unit's loss stopped being finite: the run stops, its last finite checkpoints stay."""
