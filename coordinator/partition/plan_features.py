"""One CLIP feature per unique image for a plan, and the encoder the router will need.

Features come from the encoder (``--encoder SPEC``, cached by image digest) or from a file
computed elsewhere (``--features FILE.npz``, the normal path for 665k images). Either way the
plan names the encoder: the router must compute the same features for a new image, so a
features file must say which encoder made it (an ``encoder`` entry in the .npz, or
``--feature-encoder SPEC``). When that encoder loads here, a sample of the file's features is
recomputed and must agree; when it does not (its files are at another machine), the plan
records it unchecked and ``coordinator assemble`` checks its files later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.partition.dataset import resolve_image
from coordinator.partition.features import FeatureCache, load_features_file
from coordinator.state import StateDir
from protocol.encoder_files import EncoderName
from protocol.errors import InvalidArgument, NotFound
from protocol.feature_model import FeatureModel, load_encoder

if TYPE_CHECKING:
    from coordinator.partition.plan import PartitionConfig

__all__ = ["SPOT_CHECK_IMAGES", "SPOT_CHECK_MIN_COSINE", "PlanFeatures", "plan_features"]

Reporter = Callable[[str, int | None], Callable[[int], None]]
# Enough images to catch another model or another preprocessing (both move every feature),
# few enough to cost seconds. fp16 on a GPU moves a CLIP feature by ~1e-3 in cosine.
SPOT_CHECK_IMAGES = 16
SPOT_CHECK_MIN_COSINE = 0.99


@dataclass
class PlanFeatures:
    """What the plan needs from its features.

    Attributes:
        by_digest: one unit feature per image digest.
        identity: the encoder identity recorded in the plan (``unchecked`` when the named
            encoder of a features file could not be loaded here).
        encoder_spec: the spec naming the encoder (for the assembly to find its files).
        unreadable: images that could not be decoded, with why.
        source: for ``--features``: the file's name, sha256 and the spot check's result.
    """

    by_digest: dict[str, np.ndarray]
    identity: dict[str, Any]
    encoder_spec: str
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    source: dict[str, Any] | None = None


def plan_features(
    config: PartitionConfig,
    state: StateDir,
    digests: dict[str, str],
    references: list[str],
    reporter: Reporter,
) -> PlanFeatures:
    """Features, encoder identity and undecodable images for the plan.

    Raises:
        InvalidArgument: a features file that names no encoder, names another encoder than
            ``--feature-encoder``, or disagrees with the encoder it names.
    """
    first_ref: dict[str, str] = {}
    for ref in references:
        first_ref.setdefault(digests[ref], ref)
    if config.features is not None:
        return _from_file(config, first_ref, references)
    assert config.encoder is not None
    encoder = load_encoder(config.encoder, device=config.device)
    identity = encoder.identity
    cache = FeatureCache(state.root / "cache" / "features", identity)
    found = cache.load(set(first_ref))
    todo = [d for d in first_ref if d not in found]
    unreadable: list[tuple[str, str]] = []
    if todo:
        paths = [resolve_image(config.image_root, first_ref[d]) for d in todo]
        encoded, failures = encoder.encode(
            paths,
            batch_size=config.batch_size,
            workers=config.workers,
            progress=reporter("encoding images", len(paths)),
        )
        failed_paths = {f.path: f.reason for f in failures}
        good = [i for i, p in enumerate(paths) if p not in failed_paths]
        cache.add([todo[i] for i in good], encoded[good])
        for i in good:
            found[todo[i]] = encoded[i]
        for i, path in enumerate(paths):
            if path in failed_paths:
                # Every reference to the bad picture fails with it.
                for ref in references:
                    if digests[ref] == todo[i]:
                        unreadable.append((ref, failed_paths[path]))
    return PlanFeatures(found, identity, config.encoder, unreadable)


def _from_file(
    config: PartitionConfig, first_ref: dict[str, str], references: list[str]
) -> PlanFeatures:
    assert config.features is not None
    by_ref, source = load_features_file(config.features, references)
    named = source.pop("encoder")
    if named is not None and config.feature_encoder is not None and named != config.feature_encoder:
        raise InvalidArgument(
            f"--feature-encoder {config.feature_encoder!r}: the features file {config.features} "
            f"names encoder {named!r}; give the one that computed the features (or leave "
            "--feature-encoder out)"
        )
    spec = config.feature_encoder or named
    if spec is None:
        raise InvalidArgument(
            f"--features {config.features}: the file does not name the encoder that computed "
            "its features, and the router must compute the same features for new images: "
            "pass --feature-encoder SPEC (e.g. hf:/models/clip-vit-large-patch14-336) or save "
            "the spec in the .npz as encoder='SPEC'"
        )
    flag = "--feature-encoder" if named is None else f"--features {config.features} encoder"
    name = EncoderName.parse(spec, flag)
    # The same picture under two paths is one image: its first path's features count.
    by_digest = {d: by_ref[ref] for d, ref in first_ref.items()}
    try:
        encoder = load_encoder(spec, device=config.device, flag=flag)
    except NotFound as error:
        # The encoder's files live where the features were computed: record it unchecked.
        source["checked"] = None
        source["unchecked_because"] = str(error)
        identity = {"backend": name.backend, "model": name.model, "dim": source["dim"]}
        identity["unchecked"] = True
        return PlanFeatures(by_digest, identity, spec, [], source)
    identity = encoder.identity
    if int(identity["dim"]) != source["dim"]:
        raise InvalidArgument(
            f"--features {config.features}: features of dimension {source['dim']}, but encoder "
            f"{spec!r} gives {identity['dim']}: the features were computed by another model"
        )
    source["checked"] = _spot_check(config, encoder, spec, first_ref, by_digest)
    return PlanFeatures(by_digest, identity, spec, [], source)


def _spot_check(
    config: PartitionConfig,
    encoder: FeatureModel,
    spec: str,
    first_ref: dict[str, str],
    by_digest: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Recomputes a seeded sample of the file's features; every one must agree."""
    digests = sorted(first_ref)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5C0F]))
    chosen = sorted(rng.choice(len(digests), min(SPOT_CHECK_IMAGES, len(digests)), replace=False))
    sample = [digests[int(i)] for i in chosen]
    paths = [resolve_image(config.image_root, first_ref[d]) for d in sample]
    encoded, failures = encoder.encode(paths, batch_size=len(paths))
    failed = {f.path for f in failures}
    cosines = {
        first_ref[d]: float(encoded[i] @ by_digest[d])
        for i, d in enumerate(sample)
        if paths[i] not in failed
    }
    worst = sorted(cosines.items(), key=lambda item: item[1])
    bad = [(ref, c) for ref, c in worst if c < SPOT_CHECK_MIN_COSINE]
    if bad:
        shown = ", ".join(f"{ref!r}: {c:.3f}" for ref, c in bad[:5])
        raise InvalidArgument(
            f"--features {config.features}: the features disagree with encoder {spec!r}: "
            f"{len(bad)} of {len(cosines)} images recomputed here have cosine below "
            f"{SPOT_CHECK_MIN_COSINE} with the file's features ({shown}); they were computed "
            "by another model or another image preprocessing"
        )
    return {
        "images": len(cosines),
        "min_cosine": round(worst[0][1], 6) if worst else None,
    }
