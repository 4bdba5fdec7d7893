"""Atoll's routed ensemble, for whoever downloaded one: verify it, load it, route, generate.

An ensemble directory holds ``atoll_ensemble.json`` (:mod:`protocol.ensemble_manifest`) and
everything it lists: K experts fine-tuned from one base (full models, or LoRA adapters over
one base), the router's CLIP encoder and its centroids, and the coordinator's signatures.
:class:`RoutedEnsemble` makes the directory behave like one model: a prompt's image picks
its experts (``softmax(tau * cos(features, centroids))``, top-k, renormalised); top-1
answers exactly as the chosen expert would, top-k > 1 mixes the experts' next-token
probabilities. Nothing here imports the coordinator.

Worked example
--------------

Fetch the published ensemble from the federation (a reader token from ``coordinator invite
--role reader NAME``) and verify it; ``atoll download`` does the same from a shell::

    from pathlib import Path
    from ensemble import download_ensemble, verify_ensemble

    report = download_ensemble("coordinator.example.org:7443", Path("ens"), token=TOKEN)
    # A directory copied by other means: check every signature against the federation CA.
    verify_ensemble(Path("ens"), Path("ca.pem").read_bytes())

Load it (``verify=True`` checks every file's size and sha256 first; pass
``trust=ca_pem_bytes`` to check the signatures too) and look at the router's decision for
a picture: one row per image, its experts (most probable first) and their weights::

    >>> from PIL import Image
    >>> from ensemble import RoutedEnsemble
    >>> model = RoutedEnsemble.from_pretrained(directory, verify=True, device="cpu")
    >>> routing = model.route_images([Image.open(photo)], top_k=2)
    >>> routing.experts.shape, round(routing.weights.sum().item(), 5)
    (torch.Size([1, 2]), 1.0)

Answer questions, a batch at a time (an image, a path to one, or ``None`` per prompt). With
top-1 (the paper's setting) the routed expert answers on its own; ``top_k=2`` mixes two::

    >>> answers = model.generate([photo], ["What is in the picture?"], max_new_tokens=8)
    >>> mixed = model.generate([photo], ["What is in the picture?"], max_new_tokens=8, top_k=2)
    >>> len(answers), len(mixed)
    (1, 1)

A prompt without an image has nothing to route by: ``text_only`` (default: the manifest's)
is ``"uniform"`` (every expert, equal weights), ``"clip-text"`` (the CLIP text embedding
against the image centroids) or ``"posterior"``, the exact router of the theory, updated
after every token. :meth:`RoutedEnsemble.generate_tokens` also says who answered, with
which weights::

    >>> result = model.generate_tokens(
    ...     [photo, None],
    ...     ["What is in the picture?", "Tell me a joke."],
    ...     max_new_tokens=8,
    ...     text_only="uniform",
    ...     top_k=2,
    ... )
    >>> result.experts[1], result.weights[1]
    ([0, 1], [0.5, 0.5])

Sampling takes ``do_sample=True, temperature=..., top_p=..., seed=...`` (a seed makes it
reproducible); ``batch_size`` caps the rows of one model call.

Beyond Python: ``atoll generate`` (one prompt from a shell), ``atoll eval`` (score a
benchmark file, :mod:`ensemble.evaluate`), ``atoll serve`` (an OpenAI-compatible server,
:mod:`ensemble.serve`) and the lmms-eval model ``atoll`` (:mod:`ensemble.lmms_eval_model`).

The names below load on first use, so ``import ensemble`` stays cheap (no torch) for the
tools that only need a submodule.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ensemble.decoding import TokenWatcher
    from ensemble.download import download_ensemble
    from ensemble.likelihood import Likelihood, continuation_log_likelihood
    from ensemble.router import Routing
    from ensemble.runtime import ImageInput, RoutedEnsemble, RoutedGeneration
    from ensemble.verify import verify_ensemble
    from protocol.ensemble_manifest import TextOnlyStrategy

__all__ = [
    "ImageInput",
    "Likelihood",
    "RoutedEnsemble",
    "RoutedGeneration",
    "Routing",
    "TextOnlyStrategy",
    "TokenWatcher",
    "continuation_log_likelihood",
    "download_ensemble",
    "verify_ensemble",
]

# Where each public name lives; imported when first asked for (torch is heavy).
_HOMES = {
    "ImageInput": "ensemble.runtime",
    "Likelihood": "ensemble.likelihood",
    "RoutedEnsemble": "ensemble.runtime",
    "RoutedGeneration": "ensemble.runtime",
    "Routing": "ensemble.router",
    "TextOnlyStrategy": "protocol.ensemble_manifest",
    "TokenWatcher": "ensemble.decoding",
    "continuation_log_likelihood": "ensemble.likelihood",
    "download_ensemble": "ensemble.download",
    "verify_ensemble": "ensemble.verify",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ensemble' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
