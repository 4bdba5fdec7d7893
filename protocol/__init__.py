"""What the coordinator, the site agent and the ensemble runtime agree on.

* ``federation.proto`` and its generated stubs (``federation_pb2*``), wrapped by ``serde`` so
  generated types never reach domain code;
* ``messages``: the plain dataclasses that cross the wire;
* ``identity``: federation and site names, SPIFFE ids, enrolment tokens;
* ``canonical`` and ``digests``: canonical JSON and streaming sha256;
* ``errors`` and ``exit_codes``: one error hierarchy, one table of exit codes.
"""

__all__ = ["PROTOCOL_VERSION"]

PROTOCOL_VERSION = "atoll.federation.v1"
