"""Property-based fuzzing (hypothesis) of everything that reads untrusted input.

* Every servicer handler, called as gRPC would call it (a request message, a context that
  carries the caller's certificate) with generated fields: huge and negative numbers, NaN,
  odd strings and bytes. The property: a reply, or an abort with a status that says what was
  wrong; INTERNAL (an unexpected exception at the coordinator) is a crash.
* Every parser of an untrusted file (recipe, data set, ensemble manifest, model signature
  bundle, provenance envelope, receipt, checkpoint, checkpoint note, exported audit log,
  enrolment token): a
  value, or an :class:`~protocol.errors.AtollError` naming what is wrong; never another
  exception.

CI runs ``ATOLL_FUZZ_EXAMPLES`` (default 40) examples per target; ``scripts/fuzz.sh`` runs
many more.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator import enrolment
from coordinator.federation import init_federation
from coordinator.images import record_images
from coordinator.servicer import Coordinator, FederationServicer
from coordinator.store import PlanRecord
from protocol import federation_pb2 as pb
from protocol.audit_export import verify_log_file
from protocol.audit_log import Checkpoint, Receipt
from protocol.checkpoint_note import open_note
from protocol.ensemble_manifest import parse_manifest
from protocol.errors import AtollError
from protocol.identity import EnrolmentToken
from protocol.provenance import verify_provenance
from protocol.recipe import load_recipe, parse_recipe
from protocol.signing import read_signed_digests, signer_certificate
from protocol.x509 import new_p256_key

EXAMPLES = int(os.environ.get("ATOLL_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=EXAMPLES <= 40,  # CI: the same inputs on every run
)

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
TEXT = st.text(max_size=300)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class FakeContext:
    """What a servicer sees of a call: the peer's certificate, abort, trailers."""

    def __init__(self, cert_pem: bytes | None) -> None:
        self._cert = cert_pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._cert]} if self._cert else {}

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def set_trailing_metadata(self, _: object) -> None:
        pass

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def peer_identities(self) -> None:
        return None

    def is_active(self) -> bool:
        return True


@dataclass
class Harness:
    servicer: FederationServicer
    cert_pem: bytes

    def call(self, method: str, request: Any, anonymous: bool = False) -> None:
        """Calls a handler; passes when it answers or aborts with anything but INTERNAL."""
        context = FakeContext(None if anonymous else self.cert_pem)
        try:
            reply = getattr(self.servicer, method)(request, context)
            if isinstance(reply, Iterator):
                for _ in zip(range(4), reply, strict=False):
                    pass
        except Aborted as aborted:
            assert aborted.code is not grpc.StatusCode.INTERNAL, str(aborted)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with tempfile.TemporaryDirectory() as tmp:
        state = init_federation(Path(tmp) / "coordinator", "fuzzfed")
        coordinator = Coordinator.open(state, heartbeat_seconds=1)
        store, ca = coordinator.store, coordinator.ca
        store.put_plan(PlanRecord("ab" * 32, 2, time.time()))
        record_images(state, store, Path(tmp))  # images/<sha256> names reach the index
        token = enrolment.invite(store, ca, "alpha", 3600)
        key = new_p256_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alpha")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        pem = csr.public_bytes(serialization.Encoding.PEM)
        enrolled = enrolment.enroll(store, ca, token.credential, "alpha", pem)
        coordinator.quota = type(coordinator.quota)(max_open=1_000_000, max_bytes=1 << 62)
        yield Harness(FederationServicer(coordinator), enrolled.certificate_pem)
        coordinator.store.close()


# -- servicer handlers -------------------------------------------------------------------


@FUZZ
@given(token=TEXT, site=TEXT, csr=st.binary(max_size=600))
def test_fuzz_enroll(harness: Harness, token: str, site: str, csr: bytes) -> None:
    request = pb.EnrollRequest(token=token, site_name=site, csr_pem=csr)
    harness.call("Enroll", request, anonymous=True)


@FUZZ
@given(st.booleans())
def test_fuzz_get_assignment_and_ensemble(harness: Harness, anonymous: bool) -> None:
    harness.call("GetAssignment", pb.GetAssignmentRequest(), anonymous)
    harness.call("GetEnsemble", pb.GetEnsembleRequest(), anonymous)


@FUZZ
@given(
    phase=st.one_of(st.sampled_from(["training", "waiting", "done"]), TEXT),
    step=U64,
    total=U64,
    loss=DOUBLES,
    speed=DOUBLES,
    eta=DOUBLES,
    message=TEXT,
)
def test_fuzz_heartbeat(
    harness: Harness,
    phase: str,
    step: int,
    total: int,
    loss: float,
    speed: float,
    eta: float,
    message: str,
) -> None:
    request = pb.HeartbeatRequest(
        phase=phase,
        step=step,
        total_steps=total,
        loss=loss,
        tokens_per_second=speed,
        eta_seconds=eta,
        message=message,
    )
    harness.call("Heartbeat", request)


@FUZZ
@given(
    name=st.one_of(
        st.sampled_from(["partition/expert-0.json", "../store.db", "images/" + "ab" * 32]),
        TEXT,
        st.builds("images/{}".format, TEXT),
    ),
    offset=U64,
)
def test_fuzz_download_artifact(harness: Harness, name: str, offset: int) -> None:
    harness.call("DownloadArtifact", pb.DownloadArtifactRequest(name=name, offset=offset))


FILES = st.lists(
    st.builds(
        pb.UploadFile,
        path=st.one_of(st.sampled_from(["model.safetensors", "a/b.json", "../x", "/etc"]), TEXT),
        size=U64,
        sha256=st.one_of(st.just("ab" * 32), TEXT),
    ),
    max_size=4,
)


@FUZZ
@given(expert=st.integers(min_value=0, max_value=(1 << 32) - 1), files=FILES)
def test_fuzz_begin_upload(harness: Harness, expert: int, files: list[pb.UploadFile]) -> None:
    harness.call("BeginUpload", pb.BeginUploadRequest(expert_index=expert, files=files))


@FUZZ
@given(
    files=FILES,
    chunks=st.lists(
        st.tuples(st.one_of(st.just("model.safetensors"), TEXT), U64, st.binary(max_size=64)),
        max_size=4,
    ),
    commit=st.booleans(),
)
def test_fuzz_upload_chunks_and_commit(
    harness: Harness,
    files: list[pb.UploadFile],
    chunks: list[tuple[str, int, bytes]],
    commit: bool,
) -> None:
    context = FakeContext(harness.cert_pem)
    upload_id = "0" * 32
    try:
        begun = harness.servicer.BeginUpload(
            pb.BeginUploadRequest(expert_index=0, files=files), context
        )
        upload_id = begun.upload_id
    except Aborted as aborted:
        assert aborted.code is not grpc.StatusCode.INTERNAL, str(aborted)
    stream = iter(
        [
            pb.UploadChunkRequest(upload_id=upload_id, path=path, offset=offset, data=data)
            for path, offset, data in chunks
        ]
    )
    harness.call("UploadChunk", stream)
    if commit:
        harness.call("CommitUpload", pb.CommitUploadRequest(upload_id=upload_id))


@FUZZ
@given(upload_id=TEXT)
def test_fuzz_commit_unknown(harness: Harness, upload_id: str) -> None:
    harness.call("CommitUpload", pb.CommitUploadRequest(upload_id=upload_id))


@FUZZ
@given(csr=st.binary(max_size=600))
def test_fuzz_renew_certificate(harness: Harness, csr: bytes) -> None:
    harness.call("RenewCertificate", pb.RenewCertificateRequest(csr_pem=csr))


# -- parsers of untrusted files ----------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)


def _only_atoll_errors(parse: Callable[[], object]) -> None:
    with contextlib.suppress(AtollError):  # a clear error is a pass; anything else fails
        parse()


def _with_keys(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects that mostly have the right keys with wrong or odd values."""
    return st.dictionaries(st.sampled_from(keys), JSON, max_size=len(keys))


@FUZZ
@given(data=st.one_of(JSON, _with_keys(["name", "base_model", "training", "data", "model"])))
def test_fuzz_recipe(data: Any) -> None:
    _only_atoll_errors(lambda: parse_recipe(data))


@FUZZ
@given(raw=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_fuzz_recipe_file(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(raw)
    _only_atoll_errors(lambda: load_recipe(path))


@FUZZ
@given(
    data=st.one_of(
        JSON, _with_keys(["format", "experts", "router", "files", "base_model", "top_k", "tau"])
    )
)
def test_fuzz_ensemble_manifest(data: Any) -> None:
    _only_atoll_errors(lambda: parse_manifest(data))


@FUZZ
@given(
    records=st.lists(
        st.one_of(
            JSON,
            _with_keys(["id", "image", "conversations"]),
            st.fixed_dictionaries(
                {
                    "id": TEXT,
                    "image": TEXT,
                    "conversations": st.lists(_with_keys(["from", "value"]), max_size=3),
                }
            ),
        ),
        max_size=4,
    ),
    jsonl=st.booleans(),
)
def test_fuzz_dataset(tmp_path: Path, records: list[Any], jsonl: bool) -> None:
    from coordinator.partition.dataset import load_dataset

    if jsonl:
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records))
    _only_atoll_errors(lambda: load_dataset(path))


@FUZZ
@given(raw=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_signature_bundle(raw: bytes) -> None:
    _only_atoll_errors(lambda: read_signed_digests(raw))
    _only_atoll_errors(lambda: signer_certificate(raw))


@FUZZ
@given(raw=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_provenance_envelope(raw: bytes) -> None:
    key = new_p256_key().public_key()
    _only_atoll_errors(lambda: verify_provenance(raw, key))


@FUZZ
@given(
    data=st.one_of(
        JSON,
        _with_keys(["event", "index", "inclusion_proof", "checkpoint"]),
        _with_keys(["log_id", "tree_size", "root_hash", "timestamp", "key_id", "signature"]),
    )
)
def test_fuzz_receipt_and_checkpoint(data: Any) -> None:
    _only_atoll_errors(lambda: Receipt.from_json(data))
    _only_atoll_errors(lambda: Checkpoint.from_json(data))


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            JSON.map(json.dumps),
            st.fixed_dictionaries({"type": st.sampled_from(["event", "checkpoint"])}).map(
                json.dumps
            ),
            st.text(max_size=40),
        ),
        max_size=5,
    )
)
def test_fuzz_exported_audit_log(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("\n".join(lines))
    key = new_p256_key().public_key()
    _only_atoll_errors(lambda: verify_log_file(path, key))


@FUZZ
@given(
    text=st.one_of(
        TEXT,
        st.lists(st.one_of(st.just("fuzzfed/coordinator"), st.just(""), TEXT), max_size=6).map(
            "\n".join
        ),
    )
)
def test_fuzz_checkpoint_note(text: str) -> None:
    key = new_p256_key().public_key()
    _only_atoll_errors(lambda: open_note(text, key, "spiffe://fuzzfed/coordinator"))


@FUZZ
@given(text=st.one_of(TEXT, st.lists(TEXT, min_size=5, max_size=5).map(".".join)))
def test_fuzz_enrolment_token(text: str) -> None:
    _only_atoll_errors(lambda: EnrolmentToken.parse("atoll1." + text))
    _only_atoll_errors(lambda: EnrolmentToken.parse(text))
