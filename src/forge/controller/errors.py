"""Errors the runtime raises in the caller. Each names the actor, endpoint and replica."""


class ForgeRuntimeError(RuntimeError):
    pass


class ActorError(ForgeRuntimeError):
    """An endpoint raised. The original exception is the `__cause__` (and `.original`)."""

    def __init__(self, message: str, original: BaseException | None = None):
        super().__init__(message)
        self.original = original


class ReplicaDeadError(ForgeRuntimeError):
    """The replica's process died (or was killed) while serving or before a call."""


class NoHealthyReplicaError(ForgeRuntimeError):
    pass


class ReplicaLostError(NoHealthyReplicaError):
    """A replica died and its restart policy forbids ('fail') or could not complete ('restore')
    bringing its state back: the service never serves from it again. Names the service, the
    replica and why."""


class CallTimeoutError(ForgeRuntimeError, TimeoutError):
    pass


class AdverbError(ForgeRuntimeError, TypeError):
    """A service adverb used on an actor handle or the other way round."""


class ResourceError(ForgeRuntimeError):
    """A placement asks for more than the host has (GPUs, ...)."""
