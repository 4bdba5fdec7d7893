"""Reading and validating the instruction data set to partition.

Two formats are accepted:

* **LLaVA**: a JSON list (or a JSONL file, one object per line) of samples
  ``{"id", "image"?, "conversations": [{"from": "human" | "gpt", "value"}, ...]}``, where
  ``image`` is absent (a text-only sample), one path, or a list of paths relative to the image
  root.
* **InternVL meta**: a JSON object mapping data set names to
  ``{"root", "annotation", "repeat_time", "length"}``; ``annotation`` is a JSONL file of samples
  like LLaVA's (``id`` optional), ``root`` is where that data set's images live (relative roots
  are taken from the image root, relative annotation paths from the meta file's folder).

Every error names the file, the line or index, the field and what was expected. Images are
identified by the sha256 of their bytes, so the same picture under two paths is one image.
An image is referred to by the path *as written* in the data set (for InternVL, the data set's
root joined with the path): that is the key of a ``--features`` file and what an expert's shard
manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from protocol.canonical import canonical_digest
from protocol.digests import file_sha256
from protocol.errors import InvalidArgument, NotFound

__all__ = [
    "Dataset",
    "ImageIndex",
    "Sample",
    "hash_images",
    "load_dataset",
]

DatasetFormat = Literal["llava", "internvl"]
_ROLES = ("human", "gpt")
# How many missing images an error lists before it says "and N more".
_LISTED = 5


@dataclass(frozen=True)
class Sample:
    """One training sample.

    Attributes:
        key: unique within the data set (LLaVA: the id; InternVL: ``name/id`` or ``name/line N``).
        record: the sample exactly as read.
        images: its image references as written (InternVL: joined with the data set's root).
        source: the InternVL data set it came from (None for LLaVA).
    """

    key: str
    record: dict[str, Any]
    images: tuple[str, ...]
    source: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A validated data set.

    Attributes:
        path: the file named on the command line.
        format: ``"llava"`` or ``"internvl"``.
        sha256: digest of the manifest (InternVL: of the meta file and every annotation file).
        samples: every sample, in file order.
        meta: InternVL only: the meta entries by data set name, as read.
        files: sha256 of every file read, by path (the manifest and any annotations).
    """

    path: Path
    format: DatasetFormat
    sha256: str
    samples: list[Sample]
    meta: dict[str, dict[str, Any]] | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def image_references(self) -> list[str]:
        """Every distinct image reference, in first-seen order."""
        seen: dict[str, None] = {}
        for sample in self.samples:
            for image in sample.images:
                seen.setdefault(image, None)
        return list(seen)


def load_dataset(path: Path) -> Dataset:
    """Reads and validates a LLaVA JSON/JSONL file or an InternVL meta file.

    Raises:
        NotFound: the file (or an annotation file) does not exist.
        InvalidArgument: malformed JSON or a sample that breaks a rule, naming where.
    """
    raw = _read(path, "data set")
    text = raw.decode("utf-8", errors="strict") if raw else ""
    if path.suffix == ".jsonl":
        samples = _llava_samples(_jsonl_records(text, path), path)
        return Dataset(path, "llava", hashlib.sha256(raw).hexdigest(), samples, None, {})
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            # Several objects one after another: JSONL under another file name.
            samples = _llava_samples(_jsonl_records(text, path), path)
            return Dataset(path, "llava", hashlib.sha256(raw).hexdigest(), samples, None, {})
        raise InvalidArgument(
            f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if isinstance(document, list):
        records = ((f"[{index}]", record) for index, record in enumerate(document))
        samples = _llava_samples(records, path)
        return Dataset(path, "llava", hashlib.sha256(raw).hexdigest(), samples, None, {})
    if isinstance(document, dict):
        return _internvl(document, path, hashlib.sha256(raw).hexdigest())
    raise InvalidArgument(
        f"{path}: expected a JSON list of samples (LLaVA) or an object of data sets "
        f"(InternVL meta), got {type(document).__name__}"
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{what} {path}: is a directory, expected a file") from None
    except OSError as error:
        raise InvalidArgument(f"{what} {path}: unreadable ({error.strerror})") from None


def _jsonl_records(text: str, path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidArgument(
                f"{path}: line {number}: malformed JSON at column {error.colno}: {error.msg}"
            ) from None


def _llava_samples(records: Iterable[tuple[str, Any]], path: Path) -> list[Sample]:
    samples: list[Sample] = []
    first_seen: dict[str, str] = {}
    for where, record in records:
        images = _check_record(record, f"{path}: {where}", id_required=True)
        key = str(record["id"])
        if key in first_seen:
            raise InvalidArgument(
                f"{path}: {where}: duplicate sample id {record['id']!r} "
                f"(first used at {first_seen[key]})"
            )
        first_seen[key] = where
        samples.append(Sample(key, record, images))
    return samples


def _check_record(record: Any, where: str, *, id_required: bool) -> tuple[str, ...]:
    """Validates one sample and returns its image references."""
    if not isinstance(record, dict):
        raise InvalidArgument(f"{where}: expected a sample object, got {type(record).__name__}")
    if "id" in record or id_required:
        sample_id = record.get("id")
        if isinstance(sample_id, bool) or not isinstance(sample_id, str | int) or sample_id == "":
            raise InvalidArgument(
                f"{where}: id: expected a non-empty string or integer, got {sample_id!r}"
            )
        where = f"{where} (id {sample_id!r})"
    image = record.get("image")
    if image is None and "image" not in record:
        images: tuple[str, ...] = ()
    elif isinstance(image, str) and image:
        images = (image,)
    elif isinstance(image, list) and image and all(isinstance(i, str) and i for i in image):
        images = tuple(image)
    else:
        raise InvalidArgument(
            f"{where}: image: expected a path or a non-empty list of paths, got {image!r}"
        )
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise InvalidArgument(
            f"{where}: conversations: expected a non-empty list of turns, got {conversations!r}"
        )
    for turn_index, turn in enumerate(conversations):
        turn_where = f"{where}: conversations[{turn_index}]"
        if not isinstance(turn, dict):
            raise InvalidArgument(f"{turn_where}: expected an object with 'from' and 'value'")
        if turn.get("from") not in _ROLES:
            raise InvalidArgument(
                f"{turn_where}.from: expected 'human' or 'gpt', got {turn.get('from')!r}"
            )
        if not isinstance(turn.get("value"), str):
            raise InvalidArgument(
                f"{turn_where}.value: expected a string, got {turn.get('value')!r}"
            )
    return images


def _internvl(document: dict[str, Any], path: Path, meta_sha256: str) -> Dataset:
    if not document:
        raise InvalidArgument(f"{path}: the InternVL meta object names no data sets")
    samples: list[Sample] = []
    meta: dict[str, dict[str, Any]] = {}
    files = {str(path): meta_sha256}
    annotations: dict[str, str] = {}
    for name, entry in document.items():
        where = f"{path}: {name!r}"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where}: expected an object with root, annotation, ...")
        for key in ("root", "annotation"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise InvalidArgument(f"{where}: {key}: expected a path, got {entry.get(key)!r}")
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int | float) or not repeat > 0:
            raise InvalidArgument(f"{where}: repeat_time: expected a number > 0, got {repeat!r}")
        length = entry.get("length")
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or length < 0
        ):
            raise InvalidArgument(f"{where}: length: expected an integer >= 0, got {length!r}")
        annotation = Path(entry["annotation"])
        if not annotation.is_absolute():
            annotation = path.parent / annotation
        raw = _read(annotation, f"{where}: annotation")
        annotations[name] = files[str(annotation)] = hashlib.sha256(raw).hexdigest()
        root = PurePosixPath(entry["root"])
        first_seen: dict[str, str] = {}
        count = 0
        for line_where, record in _jsonl_records(raw.decode("utf-8"), annotation):
            record_where = f"{annotation}: {line_where}"
            images = _check_record(record, record_where, id_required=False)
            key = f"{name}/{record['id']}" if "id" in record else f"{name}/{line_where}"
            if key in first_seen:
                raise InvalidArgument(
                    f"{record_where}: duplicate sample id {record['id']!r} in data set "
                    f"{name!r} (first used at {first_seen[key]})"
                )
            first_seen[key] = line_where
            joined = tuple(str(root / image) for image in images)
            samples.append(Sample(key, record, joined, name))
            count += 1
        if length is not None and length != count:
            raise InvalidArgument(
                f"{where}: length: the meta file says {length} samples, {annotation} has {count}"
            )
        meta[name] = dict(entry)
    digest = canonical_digest({"meta": meta_sha256, "annotations": annotations})
    return Dataset(path, "internvl", digest, samples, meta, files)


@dataclass(frozen=True)
class ImageIndex:
    """The content digest of every image reference that could be read.

    Attributes:
        digests: sha256 by image reference.
        missing: ``(reference, reason)`` of images that are missing or unreadable.
    """

    digests: dict[str, str]
    missing: list[tuple[str, str]]

    def describe_missing(self) -> str:
        """The first few missing images, for an error message."""
        shown = ", ".join(f"{ref} ({why})" for ref, why in self.missing[:_LISTED])
        more = len(self.missing) - _LISTED
        return shown + (f" and {more} more" if more > 0 else "")


def resolve_image(image_root: Path, reference: str) -> Path:
    """Where an image reference points: absolute paths as they are, else under the root."""
    candidate = Path(reference)
    return candidate if candidate.is_absolute() else image_root / candidate


def hash_images(
    references: list[str],
    image_root: Path,
    *,
    workers: int = 8,
    progress: Callable[[int], None] | None = None,
) -> ImageIndex:
    """sha256 of every referenced image, read in parallel (hashing releases the GIL).

    Args:
        references: image references as written in the data set.
        image_root: the folder relative references are resolved against.
        workers: reader threads (reading is I/O bound).
        progress: called with the number of images finished after each one.
    """

    def digest(reference: str) -> tuple[str, str | None, str | None]:
        path = resolve_image(image_root, reference)
        try:
            return reference, file_sha256(path), None
        except FileNotFoundError:
            return reference, None, "no such file"
        except IsADirectoryError:
            return reference, None, "a directory"
        except OSError as error:
            return reference, None, error.strerror or "unreadable"

    digests: dict[str, str] = {}
    missing: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, (os.cpu_count() or 1) * 4))) as pool:
        for reference, sha256, reason in pool.map(digest, references):
            if sha256 is None:
                missing.append((reference, reason or "unreadable"))
            else:
                digests[reference] = sha256
            if progress is not None:
                progress(1)
    return ImageIndex(digests, missing)
