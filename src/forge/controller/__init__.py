"""The actor runtime: `ForgeActor`, `endpoint`, services, provisioners (local | monarch)."""

from forge.controller.actor import ActorOptions, ForgeActor, endpoint
from forge.controller.errors import (
    ActorError,
    AdverbError,
    CallTimeoutError,
    ForgeRuntimeError,
    NoHealthyReplicaError,
    ReplicaDeadError,
    ReplicaLostError,
    ResourceError,
)
from forge.controller.provisioner import get_provisioner, init_provisioner, shutdown
from forge.controller.service import ActorHandle, Service, ServiceHandle
from forge.observability.metrics import set_remote_source

# the MetricLogger's records from other processes: every service's procs, through the current
# provisioner (observability sits below the controller, so the controller plugs itself in)
set_remote_source(lambda: get_provisioner().collect_metrics())

__all__ = [
    "ActorError",
    "ActorHandle",
    "ActorOptions",
    "AdverbError",
    "CallTimeoutError",
    "ForgeActor",
    "ForgeRuntimeError",
    "NoHealthyReplicaError",
    "ReplicaDeadError",
    "ReplicaLostError",
    "ResourceError",
    "Service",
    "ServiceHandle",
    "endpoint",
    "get_provisioner",
    "init_provisioner",
    "shutdown",
]
