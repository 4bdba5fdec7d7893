"""`coordinator assemble --fit-tau DATA.json`: the router temperature fitted on held-out data.

Why at assembly, not in a consumer's `atoll calibrate`: tau is part of the router every
consumer verifies, and the coordinator signs the manifest that holds it. A fit after
assembly would either rewrite a signed file or live beside it unsigned; fitted here, tau, the
fit data's digest and the likelihoods it reached are recorded in ``router.tau_fit`` and
signed with the rest (see :mod:`ensemble.calibration` for the fit itself).

The staged ensemble is loaded as a consumer would load it, each held-out question is scored
by every expert (teacher-forced), and the fitted tau goes into the manifest. The coordinator
never needs a GPU: tiny ensembles fit on CPU in seconds; a large one runs on the
coordinator's GPU when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocol.digests import file_sha256
from protocol.ensemble_manifest import MANIFEST_FILE
from protocol.errors import InvalidArgument
from protocol.progress import progress_bars

__all__ = ["COMPARED_TAUS", "fit_router_tau"]

COMPARED_TAUS = (1.0, 20.0, 50.0)


def fit_router_tau(
    staging: Path,
    manifest: dict[str, Any],
    data: Path,
    image_root: Path | None,
    device: str | None = None,
) -> dict[str, Any]:
    """Fits tau on ``data`` (an ``atoll eval`` file: questions about images with reference
    answers); returns the manifest's ``router.tau_fit`` entry (``tau`` is set by the caller).

    Raises:
        NotFound: the data file or one of its images is missing.
        InvalidArgument: no reference answers, or no question with an image.
    """
    from ensemble.calibration import answer_log_likelihoods, fit_tau
    from ensemble.evaluate import load_eval_data
    from ensemble.runtime import RoutedEnsemble

    root = image_root if image_root is not None else data.parent
    samples = [s for s in load_eval_data(data, root) if s.image is not None]
    if not samples:
        raise InvalidArgument(
            f"--fit-tau {data}: no question with an image (tau only weighs image routing)"
        )
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    try:
        ensemble = RoutedEnsemble.from_pretrained(staging, verify=False, device=device)
        with progress_bars() as bars:
            scores = answer_log_likelihoods(
                ensemble,
                [s.image for s in samples],
                [s.question for s in samples],
                [s.answers[0] for s in samples],
                progress=bars.add("fitting tau: scoring answers", len(samples)),
            )
    finally:
        (staging / MANIFEST_FILE).unlink(missing_ok=True)
    fit = fit_tau(scores, compare=COMPARED_TAUS)
    return {
        "tau": fit.tau,
        "data_file": data.name,
        "data_sha256": file_sha256(data),
        "samples": len(samples),
        "bounds": list(fit.bounds),
        "log_likelihood": fit.log_likelihood,
        "compared": {f"{t:g}": ll for t, ll in fit.compared.items()},
    }
