"""Rollout errors, in a module free of torch so the CLI can catch them without importing it."""


class WeightSyncError(RuntimeError):
    """The engine does not hold the weights that were pushed (a failed sync check, or an engine
    that returns non-finite log-probs): continuing would train on wrong behaviour log-probs."""


class RolloutFailure(RuntimeError):
    """A rollout component died or failed (the engine during generation, verifier workers that
    cannot start): the message names which, on which rank, and what it said."""
