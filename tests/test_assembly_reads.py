"""Assembly reads each accepted expert file once: it copies and hashes in one pass, then the
signature check, the manifest, the coordinator's model.sig and the served artifacts reuse those
digests. Counted at two levels: every ``open`` in the process (which file, how many bytes), and
the kernel's count of bytes this process read (``/proc/self/io``), which no code path escapes."""

from __future__ import annotations

import builtins
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from assembly_helpers import Site, join, sign_and_upload, write_plan
from safetensors.numpy import save_file

from coordinator.assembly import AssemblyConfig, assemble
from coordinator.audit_report import provenance_table
from coordinator.upload_writer import upload_files_dir
from protocol.ensemble_manifest import load_manifest, verify_files
from protocol.signing import PROVENANCE_FILE, SIGNATURE_FILE, verify_model

WEIGHTS = "model.safetensors"
PARSED = {SIGNATURE_FILE, PROVENANCE_FILE, "config.json"}  # small JSON read to be understood


def large_expert(directory: Path, seed: int) -> None:
    """An expert whose weights (4 MiB) dwarf everything else assembly reads."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((1024, 1024)).astype(np.float32)}, str(directory / WEIGHTS))
    (directory / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}\n')


class _Counted:
    """A file object that adds what is read through it to ``counts[key]``."""

    def __init__(self, handle: Any, key: str, counts: Counter[str]) -> None:
        self._handle, self._key, self._counts = handle, key, counts

    def read(self, *args: Any) -> Any:
        data = self._handle.read(*args)
        self._counts[self._key] += len(data)
        return data

    def read1(self, *args: Any) -> Any:
        data = self._handle.read1(*args)
        self._counts[self._key] += len(data)
        return data

    def readinto(self, buffer: Any) -> Any:
        count = self._handle.readinto(buffer)
        self._counts[self._key] += count or 0
        return count

    def readline(self, *args: Any) -> Any:
        line = self._handle.readline(*args)
        self._counts[self._key] += len(line)
        return line

    def __iter__(self) -> Iterator[Any]:
        for line in self._handle:
            self._counts[self._key] += len(line)
            yield line

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Counter[str]:
    """Bytes read through ``open`` (builtins, io, pathlib) from files under ``tmp_path``, by
    resolved path, from the moment the fixture's test calls ``reads.clear()``."""
    counts: Counter[str] = Counter()
    real_open = io.open
    root = tmp_path.resolve()

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, int) or any(c in mode for c in "wax+"):
            return handle
        path = Path(file).resolve()
        return _Counted(handle, str(path), counts) if path.is_relative_to(root) else handle

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return counts


def _process_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar line")


@pytest.fixture
def sites(running: Any, tmp_path: Path) -> Iterator[list[Site]]:
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((2, 32)).astype(np.float32)
    write_plan(running, centroids / np.linalg.norm(centroids, axis=1, keepdims=True), [3, 3])
    joined = join(running, tmp_path, ["alpha", "beta"])
    yield joined
    for site in joined:
        site.client.close()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_assembly_reads_each_expert_file_once(
    running: Any, sites: list[Site], tmp_path: Path, reads: Counter[str]
) -> None:
    store = running.coordinator.store
    for site in sites:
        result = sign_and_upload(running, site, tmp_path / f"upload-{site.name}", large_expert)
        assert result.accepted, result.reason
    accepted = {}  # (expert, relative path) -> (source path, size)
    for row in provenance_table(store):
        record = store.get_upload(row.upload_id)
        for item in record.files:
            source = upload_files_dir(running.state, row.upload_id) / item.path
            accepted[(row.expert, item.path)] = (str(source.resolve()), item.size)
    expert_bytes = sum(size for _, size in accepted.values())
    assert expert_bytes > 8 << 20

    reads.clear()
    before = _process_read_bytes()
    assembled = assemble(running.state, store, AssemblyConfig())
    process_read = _process_read_bytes() - before

    for (k, relative), (source, size) in accepted.items():
        # The accepted file: read exactly once, whole.
        assert reads[source] == size, (k, relative, reads[source], size)
        # Its copy in the ensemble (at its staging path, then its final one): the weights
        # never again; the small signature, provenance and config only to be parsed.
        copies = [
            count
            for path, count in reads.items()
            if Path(path).is_relative_to(running.state.ensembles_dir.resolve())
            and path.endswith(f"experts/expert-{k}/{relative}")
        ]
        if relative == WEIGHTS:
            assert sum(copies) == 0, (k, relative, copies)
        else:
            assert relative in PARSED and sum(copies) <= size, (k, relative, copies)
    # The kernel's count: every byte this process read while assembling (any code path),
    # one pass over the experts plus a little (JSON, SQLite, centroids); it was 6x before.
    assert expert_bytes <= process_read < 1.25 * expert_bytes, (process_read, expert_bytes)

    # And what was signed and listed is what is on disk, hashed afresh.
    root = assembled.directory
    verify_files(root, load_manifest(root))
    signed = verify_model(root, trusted_ca_pem=running.state.ca_cert.read_bytes())
    assert f"experts/expert-0/{WEIGHTS}" in signed.digests.files
