"""The partitioner's features at scale: a cache of computed features, and precomputed files.

The encoders themselves (naming, loading, preprocessing, normalisation) are the one feature
model that routing uses too, :mod:`protocol.feature_model`.

Features are cached by image content digest under the state directory, per encoder
identity, so re-running or adding images only encodes what is new. ``--features FILE.npz``
supplies them instead: arrays ``ids`` (image paths as written in the data set), ``features``
(N x D) and ``encoder`` (the spec of the encoder that computed them; or ``--feature-encoder
SPEC``): the router must compute the same features at inference, so a plan without its
encoder cannot be assembled.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protocol.canonical import canonical_digest
from protocol.digests import file_sha256
from protocol.errors import InvalidArgument, NotFound

__all__ = ["FeatureCache", "load_features_file"]


class FeatureCache:
    """Features by image content digest, for one encoder identity.

    Each run that encodes something adds one shard file (written to a temporary name, then
    renamed), so a crash never corrupts what was cached before and nothing is rewritten.
    """

    def __init__(self, root: Path, identity: dict[str, Any]) -> None:
        self.directory = root / canonical_digest(identity)[:32]

    def _shards(self) -> Iterator[Path]:
        if self.directory.is_dir():
            yield from sorted(self.directory.glob("shard-*.npz"))

    def load(self, wanted: set[str]) -> dict[str, np.ndarray]:
        """The cached features of the wanted digests (others are not read into memory)."""
        found: dict[str, np.ndarray] = {}
        for shard in self._shards():
            try:
                with np.load(shard, allow_pickle=False) as data:
                    digests, features = data["digests"], data["features"]
            except (OSError, ValueError, KeyError):
                continue  # an unreadable shard is only a cache miss
            for row, digest in enumerate(digests.tolist()):
                if digest in wanted and digest not in found:
                    found[digest] = features[row]
        return found

    def add(self, digests: Sequence[str], features: np.ndarray) -> None:
        """Stores new features (rows match ``digests``)."""
        if not digests:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{hashlib.sha256(''.join(digests).encode()).hexdigest()[:16]}"
        descriptor, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.directory)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.savez(handle, digests=np.array(digests), features=features)
            os.replace(tmp, self.directory / f"{name}-{uuid.uuid4().hex[:8]}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_features_file(
    path: Path, references: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Precomputed features for the given image references.

    Args:
        path: an ``.npz`` with ``ids`` (N image paths as written in the data set),
            ``features`` (N x D) and optionally ``encoder``, one string: the spec of the
            encoder that computed them (``hf:PATH`` or ``open_clip:MODEL[:PRETRAINED]``).
        references: every image reference the data set uses.

    Returns:
        ``(features by reference (unit rows), source)``: the file's name, sha256, dimension
        and the encoder it names (None if it names none).

    Raises:
        NotFound: no such file.
        InvalidArgument: missing arrays, wrong shapes, duplicate ids, non-finite or zero rows,
            or data set images the file has no features for.
    """
    if not path.is_file():
        raise NotFound(f"--features {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "ids" not in data or "features" not in data:
                raise InvalidArgument(
                    f"--features {path}: expected arrays 'ids' and 'features', "
                    f"found {sorted(data.files)}"
                )
            ids, features = data["ids"], data["features"]
            named = data.get("encoder")
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"--features {path}: not a readable .npz file ({error})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise InvalidArgument(
            f"--features {path}: ids: expected a 1-D array of strings, got {ids.dtype} "
            f"with shape {ids.shape}"
        )
    if features.ndim != 2 or features.shape[0] != ids.shape[0] or features.dtype.kind != "f":
        raise InvalidArgument(
            f"--features {path}: features: expected a float array of shape "
            f"({ids.shape[0]}, D), got {features.dtype} with shape {features.shape}"
        )
    id_list = [str(i) for i in ids.tolist()]
    row_of: dict[str, int] = {}
    for row, image_id in enumerate(id_list):
        if image_id in row_of:
            raise InvalidArgument(
                f"--features {path}: ids[{row}]: duplicate id {image_id!r} "
                f"(also ids[{row_of[image_id]}])"
            )
        row_of[image_id] = row
    absent = [ref for ref in references if ref not in row_of]
    if absent:
        shown = ", ".join(repr(a) for a in absent[:5])
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise InvalidArgument(
            f"--features {path}: its ids do not match the data set: no features for "
            f"{len(absent)} image(s): {shown}{more} (ids must be image paths as written in "
            "the data set)"
        )
    out: dict[str, np.ndarray] = {}
    for ref in references:
        row = row_of[ref]
        vector = features[row].astype(np.float32)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise InvalidArgument(
                f"--features {path}: features[{row}] (id {ref!r}) is "
                f"{'not finite' if not np.isfinite(norm) else 'all zeros'}"
            )
        out[ref] = vector / norm
    encoder = None
    if named is not None:
        if named.ndim > 1 or named.size != 1 or named.dtype.kind not in "US":
            raise InvalidArgument(
                f"--features {path}: encoder: expected one string naming the encoder (e.g. "
                f"'hf:/models/clip-vit-large-patch14-336'), got {named.dtype} with shape "
                f"{named.shape}"
            )
        encoder = str(named.reshape(()).item())
    source = {
        "file": path.name,
        "sha256": file_sha256(path),
        "dim": int(features.shape[1]),
        "encoder": encoder,
    }
    return out, source
