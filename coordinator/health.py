"""The standard gRPC health service (``grpc.health.v1.Health``) on both of the coordinator's
ports, so load balancers, Kubernetes probes and ``grpc_health_probe`` can ask whether it serves.

The enrolment port needs only server TLS, so a probe that trusts the federation CA (no client
certificate) can ask there; the mutual-TLS port answers callers with a federation certificate.
The overall status ("") and ``atoll.federation.v1.Federation`` are SERVING while the server
runs and NOT_SERVING once it starts draining.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from protocol import federation_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name


__all__ = ["SERVICE", "HealthServicer", "add_health", "check"]


def add_health(*servers: grpc.Server) -> HealthServicer:
    """Registers one health service on ``servers`` (the mutual-TLS and the enrolment server),
    reporting SERVING."""
    servicer = health.HealthServicer()
    for server in servers:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", SERVICE):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def check(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """The status name (``SERVING``, ``NOT_SERVING``...) the server reports for ``service``."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
