"""One ensemble directory that behaves like one model.

:meth:`RoutedEnsemble.from_pretrained` reads ``atoll_ensemble.json`` (see
:mod:`protocol.ensemble_manifest`), verifies every file it lists, loads the router and the present
experts; :meth:`RoutedEnsemble.generate` answers a batch of prompts:

* **top-1** (the paper's setting): the batch is grouped by chosen expert and runs as one
  batched ``generate`` in which each row uses its expert's weights; the answer is the
  expert's own answer, token for token.
* **top-k > 1**: the chosen experts step in lock-step, each with its own KV cache, over the
  samples routed to it; the next token comes from the mixture
  ``log p(x) = logsumexp_k(log w_k + log p_k(x))``, greedily or sampled.
* **text-only prompts** (no image): ``uniform`` mixes every present expert equally,
  ``clip-text`` routes the CLIP text embedding against the image centroids, ``posterior`` is
  the exact router ``p(S_k | z) ∝ p(S_k) * prod_t p_k(z_t | z_<t)``, updated after every token
  (the prompt's own tokens included); it mixes the top-k of the current posterior, so
  ``top_k = K`` gives the exact mixture of the theory.

What keeps a routed batch at the cost of a dense one:

* **one model call per step**, not one per expert: full experts of one architecture are
  stacked (:class:`ensemble.stacked_experts.StackedExperts`: expert 0's module tree whose
  differing submodules send each stretch of rows to that expert's own weights); LoRA
  experts over one base are one peft model with the adapter chosen per row
  (``adapter_names``, where peft supports it: not beside a projector trained in full).
  Experts that differ in more than their weights run one call each.
* **calls of one expert** (``batch_size``): given many prompts, each expert's samples fill
  calls of their own and only the remainders share one (:mod:`ensemble.scheduling`). A
  call over several full experts reads all their weights at every step, and small-batch
  decoding is bound by reading weights; a call of one LoRA expert runs with its adapter
  active rather than per row.
* **the batch is encoded once** (chat template, tokens, pixels); each call takes its rows.
* **a shared tower**: when the router's encoder is a Hugging Face CLIP whose vision model is
  the LLaVA experts' own tower (same settings, weights and preprocessing), one tower pass
  per batch gives the routing features (its projected pooled output) and the experts' image
  features (its hidden layer), which their towers hand back instead of running again
  (:class:`ensemble.shared_tower.SharedTower`).

Example::

    ensemble = RoutedEnsemble.from_pretrained("ensemble/", verify=True)
    ensemble.generate([Image.open("cat.png")], ["What is this?"], max_new_tokens=32)
    ensemble.generate([None], ["Tell me a joke."], text_only="posterior", top_k=2)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ensemble.decoding import TokenWatcher, lockstep, top1
from ensemble.encoded_batch import EncodedBatch
from ensemble.expert_pool import ExpertPool, check_one_vocabulary
from ensemble.processor import chat_prompt, load_processor
from ensemble.router import (
    Router,
    Routing,
    load_centroids,
    load_feature_model,
    load_router,
    open_image,
)
from ensemble.sampling import Sampling
from ensemble.scheduling import batches, slices
from ensemble.shared_tower import SharedTower
from protocol.ensemble_manifest import (
    EnsembleManifest,
    TextOnlyStrategy,
    load_manifest,
    verify_files,
)
from protocol.errors import InvalidArgument, NotFound

__all__ = [
    "ImageInput",
    "RoutedEnsemble",
    "RoutedGeneration",
    "TokenWatcher",
    "Verifier",
    "chat_prompt",
    "load_centroids",
]

log = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path | None
"""An image, a path to one, or None for a text-only prompt."""

Verifier = Callable[[Path, EnsembleManifest], None]
"""Checks an ensemble directory against its manifest; raises VerificationFailed."""


@dataclass(frozen=True)
class RoutedGeneration:
    """What :meth:`RoutedEnsemble.generate_tokens` produced, per sample.

    Attributes:
        texts: The decoded answers (special tokens skipped).
        token_ids: The generated tokens, up to and without the end-of-sequence token.
        experts: The experts that were mixed (for ``posterior``: every present expert).
        weights: Their initial weights (the router's, renormalised over ``experts``).
        posteriors: For ``posterior``-routed samples, a ``(steps + 1, K)`` tensor: row 0 is
            ``p(S_k | prompt)``, row t the posterior after the t-th chosen token. The chosen
            tokens include the end-of-sequence token, which ``token_ids`` leaves out, so a
            sample that ends there has ``len(token_ids) + 2`` rows (the last one after that
            token); one cut off by ``max_new_tokens`` has ``len(token_ids) + 1``. The
            posterior-routed samples of one call decode together: ``steps`` is the most any
            of them took, and a sample that ended sooner repeats its last row to the end.
            None for other samples.
    """

    texts: list[str]
    token_ids: list[list[int]]
    experts: list[list[int]]
    weights: list[list[float]]
    posteriors: list[torch.Tensor | None] = field(default_factory=list)


class RoutedEnsemble:
    """A routed mixture of experts loaded from an ensemble directory.

    Use :meth:`from_pretrained`; the constructor takes already-loaded parts (tests, custom
    loading).
    """

    def __init__(
        self,
        manifest: EnsembleManifest,
        router: Router,
        feature_model: Any,
        experts: ExpertPool,
        processor: Any,
        device: torch.device,
    ) -> None:
        self.manifest = manifest
        self.router = router
        self.feature_model = feature_model
        self.experts = experts
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Prompts of a batch end where generation starts, so padding goes on the left.
        self.tokenizer.padding_side = "left"
        self.device = device
        self.log_priors = torch.tensor(manifest.router.cluster_priors).log()
        # Why the router does or does not share the experts' tower (logged, and for callers).
        self.shared_tower, self.shared_tower_reason = SharedTower.check(
            feature_model, experts, processor, manifest
        )
        log.info("[RoutedEnsemble] shared CLIP tower: %s", self.shared_tower_reason)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        verify: bool = True,
        verifier: Verifier | None = None,
        trust: bytes | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> RoutedEnsemble:
        """Loads an ensemble directory.

        Args:
            directory: Holds ``atoll_ensemble.json`` and what it lists.
            verify: Check every listed file first (size and sha256).
            verifier: The check to run when ``verify`` (default: with ``trust``, the full
                signature check of :func:`ensemble.verify.verify_ensemble`; without, the
                digests of :func:`protocol.ensemble_manifest.verify_files`).
            trust: The federation CA certificate (PEM bytes) that signatures must chain to.
            device: Where to run; default CUDA when available.
            dtype: Expert parameter dtype (default: as saved).

        Raises:
            NotFound: the directory, manifest or a present expert is missing.
            InvalidArgument: a manifest field is wrong (named), the centroids do not match the
                experts, or the experts do not share one vocabulary.
            VerificationFailed: a file does not match its digest (expected vs. actual).
        """
        root = Path(directory)
        if not root.is_dir():
            raise NotFound(f"{root}: not a directory")
        manifest = load_manifest(root)
        if verify:
            if verifier is None and trust is not None:
                from ensemble.verify import signature_verifier

                verifier = signature_verifier(trust)
            (verifier or verify_files)(root, manifest)
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        present = manifest.present_experts
        if manifest.missing_experts:
            log.warning(
                "[RoutedEnsemble] partial ensemble: experts %s are missing; the router is "
                "renormalised over %s",
                manifest.missing_experts,
                present,
            )
        router = load_router(root, manifest)
        encoder = manifest.router.encoder  # None: experts trained on text only
        feature_model = (
            None if encoder is None else load_feature_model(encoder, root, device=target)
        )
        experts = ExpertPool.load(root, manifest, target, dtype)
        check_one_vocabulary(manifest, experts)
        processor = load_processor(root, manifest)
        return cls(manifest, router, feature_model, experts, processor, target)

    # -- inputs -------------------------------------------------------------------------------

    def prompt_text(self, prompt: str, has_image: bool) -> str:
        """The chat-formatted prompt the experts were trained on, ready for generation."""
        return chat_prompt(self.processor, prompt, has_image)

    def encode_inputs(self, images: Sequence[Image.Image | None], prompts: Sequence[str]) -> Any:
        """The model inputs (left-padded ``input_ids``, ``attention_mask``, ``pixel_values``)
        of a batch, exactly as :meth:`generate` feeds them to an expert."""
        texts = [
            self.prompt_text(p, image is not None) for image, p in zip(images, prompts, strict=True)
        ]
        pictures = [image for image in images if image is not None]
        if pictures:
            batch = self.processor(images=pictures, text=texts, padding=True, return_tensors="pt")
        else:
            batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        return batch.to(self.device)

    # -- routing ------------------------------------------------------------------------------

    def route_images(
        self,
        images: Sequence[Image.Image],
        top_k: int | None = None,
        batch_size: int | None = None,
    ) -> Routing:
        """The router's decision for images, encoded ``batch_size`` at a time (default: all
        at once)."""
        if self.shared_tower is not None:
            pixels = self.processor.image_processor(images=list(images), return_tensors="pt")
            features, _ = self.shared_tower.encode(
                pixels["pixel_values"].to(self.device), batch_size
            )
            return self.router.route(features, top_k)
        parts = [
            self.feature_model.encode_images(images[part])
            for part in slices(len(images), batch_size)
        ]
        return self.router.route(torch.cat(parts), top_k)

    def static_routes(
        self,
        batch: EncodedBatch,
        prompts: Sequence[str],
        top_k: int,
        strategy: TextOnlyStrategy,
        batch_size: int | None,
    ) -> list[tuple[list[int], list[float]] | None]:
        """Per sample: (experts, weights), or None where the posterior decides per token."""
        routes: list[tuple[list[int], list[float]] | None] = [None] * len(prompts)
        with_image = [i for i, has in enumerate(batch.has_image) if has]
        if with_image:
            if self.shared_tower is not None and batch.one_row_per_image:
                # One pass of the tower: routed from here, handed to the experts later.
                features, batch.tower_output = self.shared_tower.encode(
                    batch.inputs["pixel_values"], batch_size
                )
                routing = self.router.route(features, top_k)
            else:
                pictures = [batch.pictures[i] for i in with_image]
                routing = self.route_images(pictures, top_k, batch_size)  # type: ignore[arg-type]
            for row, i in enumerate(with_image):
                routes[i] = (routing.experts[row].tolist(), routing.weights[row].tolist())
        text_only = [i for i, has in enumerate(batch.has_image) if not has]
        if text_only and strategy is TextOnlyStrategy.UNIFORM:
            present = self.manifest.present_experts
            for i in text_only:
                routes[i] = (present, [1.0 / len(present)] * len(present))
        elif text_only and strategy is TextOnlyStrategy.CLIP_TEXT:
            features = self.feature_model.encode_texts([prompts[i] for i in text_only])
            routing = self.router.route(features, top_k)
            for row, i in enumerate(text_only):
                routes[i] = (routing.experts[row].tolist(), routing.weights[row].tolist())
        return routes

    def handing_tower(self, batch: EncodedBatch) -> Any:
        """While generating: the experts' vision towers return the routing pass's output."""
        if self.shared_tower is None or batch.tower_output is None:
            return contextlib.nullcontext()
        return self.shared_tower.handing(batch)

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        *,
        top_k: int | None = None,
        text_only: str | TextOnlyStrategy | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> list[str]:
        """Answers a batch of prompts; see :meth:`generate_tokens` for the arguments."""
        return self.generate_tokens(
            images,
            prompts,
            max_new_tokens,
            top_k=top_k,
            text_only=text_only,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
        ).texts

    def generate_tokens(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        *,
        top_k: int | None = None,
        text_only: str | TextOnlyStrategy | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int | None = None,
        watch: TokenWatcher | None = None,
    ) -> RoutedGeneration:
        """Answers a batch of prompts, with the tokens and routing of each.

        Args:
            images: One per prompt: a PIL image, an image file, or None (text-only).
            prompts: The user's questions (the chat template is applied here).
            max_new_tokens: Longest answer; generation also stops at end-of-sequence.
            top_k: Experts mixed per sample (default: the manifest's ``router.top_k``).
            text_only: Strategy for prompts without an image (default: the manifest's).
            do_sample: Sample instead of greedy decoding.
            temperature: Sampling temperature (> 0), applied to the mixture.
            top_p: Nucleus sampling: sample among the most likely tokens whose probabilities
                add up to ``top_p`` (0 < top_p <= 1; 1 keeps every token).
            seed: Makes sampling reproducible.
            batch_size: Most rows of one model call (a sample mixing ``k`` experts takes
                ``k``); default: every sample in one call. Given many prompts at once, the
                samples of one expert (or set of experts) fill calls of their own, so each
                call reads one expert's weights, as a dense model's batch does
                (:func:`ensemble.scheduling.batches`). The prompts are encoded together:
                pass a few hundred at a time.
            watch: Sees every chosen token as it is chosen and may stop samples early
                (:data:`TokenWatcher`); the tokens it sees are the ones returned.

        Raises:
            InvalidArgument: mismatched lengths, a bad ``top_k``/``text_only``/``temperature``/
                ``batch_size``, an undecodable image.
            NotFound: an image file that does not exist.
        """
        if len(images) != len(prompts):
            raise InvalidArgument(f"{len(images)} images for {len(prompts)} prompts (one each)")
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise InvalidArgument(f"temperature: expected > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise InvalidArgument(f"top_p: expected 0 < top_p <= 1, got {top_p}")
        if batch_size is not None and batch_size < 1:
            raise InvalidArgument(f"batch_size: expected >= 1, got {batch_size}")
        k = self.router._check_top_k(self.manifest.router.top_k if top_k is None else top_k)
        strategy = self._strategy(text_only)
        if strategy is TextOnlyStrategy.CLIP_TEXT and not hasattr(
            self.feature_model, "encode_texts"
        ):
            raise InvalidArgument("text_only 'clip-text': the feature model has no text tower")
        if any(i is not None for i in images) and self.manifest.architecture == "causal-lm":
            raise InvalidArgument("images: a causal-lm ensemble answers text-only prompts")
        pictures = [None if image is None else open_image(image) for image in images]
        batch = EncodedBatch(self.encode_inputs, pictures, prompts)
        routes = self.static_routes(batch, prompts, k, strategy, batch_size)
        sampling = Sampling(do_sample, temperature, seed, top_p)

        n = len(prompts)
        token_ids: list[list[int]] = [[] for _ in range(n)]
        experts: list[list[int]] = [[] for _ in range(n)]
        weights: list[list[float]] = [[] for _ in range(n)]
        posteriors: list[torch.Tensor | None] = [None] * n
        single = [i for i, r in enumerate(routes) if r is not None and len(r[0]) == 1]
        mixed = [i for i, r in enumerate(routes) if r is not None and len(r[0]) > 1]
        dynamic = [i for i, r in enumerate(routes) if r is None]
        for i in single + mixed:
            experts[i], weights[i] = routes[i]  # type: ignore[misc]
        shown = [0] * n
        if watch is not None:
            user_watch = watch

            def watch(samples: list[int], tokens: list[int]) -> list[bool]:
                for i in samples:
                    shown[i] += 1
                return user_watch(samples, tokens)

        with self.handing_tower(batch), torch.inference_mode():
            # A call's position among its kind's calls seeds its sampling apart.
            for call, samples in enumerate(_calls(single, experts, batch_size)):
                chosen = {i: experts[i][0] for i in samples}
                answers = top1(self, batch, chosen, max_new_tokens, sampling, call, watch)
                for i, ids in answers.items():
                    token_ids[i] = ids
            for call, samples in enumerate(_calls(mixed, experts, batch_size)):
                plan = {i: (experts[i], weights[i]) for i in samples}
                result = lockstep(
                    self, batch, plan, k, max_new_tokens, sampling, False, call, watch
                )
                for i in samples:
                    token_ids[i] = result[i][0]
            present = self.manifest.present_experts
            prior = torch.softmax(self.log_priors[present], dim=0).tolist()
            for i in dynamic:
                experts[i], weights[i] = present, prior
            for call, samples in enumerate(_calls(dynamic, experts, batch_size)):
                plan = {i: (present, prior) for i in samples}
                result = lockstep(self, batch, plan, k, max_new_tokens, sampling, True, call, watch)
                for i in samples:
                    token_ids[i], posteriors[i] = result[i]
        if watch is not None:
            # A stopped sample's row went on as padding until its call ended.
            token_ids = [ids[: shown[i]] for i, ids in enumerate(token_ids)]
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return RoutedGeneration(texts, token_ids, experts, weights, posteriors)

    def _strategy(self, text_only: str | TextOnlyStrategy | None) -> TextOnlyStrategy:
        if text_only is None:
            return self.manifest.router.text_only
        try:
            return TextOnlyStrategy(text_only)
        except ValueError:
            choices = ", ".join(s.value for s in TextOnlyStrategy)
            raise InvalidArgument(
                f"text_only: expected one of {choices}, got {text_only!r}"
            ) from None


def _calls(samples: list[int], experts: list[list[int]], batch_size: int | None) -> list[list[int]]:
    """``samples`` split into model calls of at most ``batch_size`` rows (one row per expert
    a sample runs through), by their experts."""
    routes = [tuple(sorted(experts[i])) for i in samples]
    return [[samples[p] for p in call] for call in batches(routes, batch_size)]
