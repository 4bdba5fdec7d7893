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
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ensemble.router import (
    Router,
    Routing,
    load_centroids,
    load_feature_model,
    load_router,
    open_image,
)
from ensemble.scheduling import batches, slices
from ensemble.shared_tower import SharedTower, take_rows
from ensemble.stacked_experts import StackedExperts, runs, vision_tower
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

TokenWatcher = Callable[[list[int], list[int]], list[bool]]
"""Called after every decoding step with the samples still decoding (their positions in the
call) and the token each just chose (the end-of-sequence token included, once); returns, per
sample, whether to stop it there (a server streams the tokens and stops a sample whose client
left or whose own ``max_tokens`` is reached). A stopped sample keeps the tokens it chose."""


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


def chat_prompt(processor: Any, prompt: str, has_image: bool) -> str:
    """``prompt`` as one user turn (after an image placeholder when there is an image) in the
    processor's chat template, ready for generation."""
    content: list[dict[str, str]] = [{"type": "text", "text": prompt}]
    if has_image:
        content.insert(0, {"type": "image"})
    text: str = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return text


def _model_class(architecture: str) -> Any:
    from transformers import (
        AutoModelForCausalLM,
        InternVLForConditionalGeneration,
        LlavaForConditionalGeneration,
    )

    return {
        "llava": LlavaForConditionalGeneration,
        "internvl": InternVLForConditionalGeneration,
        "causal-lm": AutoModelForCausalLM,
    }[architecture]


class _Experts:
    """The present experts: full models side by side, or one base with a peft adapter each.

    :meth:`units` is how a batch runs: rows grouped by expert become as few model calls as the
    experts allow -- one call for LoRA adapters over one base (peft picks each row's adapter)
    and for full experts of one architecture
    (:class:`~ensemble.stacked_experts.StackedExperts`), one call per expert otherwise.
    """

    def __init__(
        self,
        models: dict[int, nn.Module],
        adapters: nn.Module | None,
        stacked: StackedExperts | None = None,
    ) -> None:
        self._models = models
        self._adapters = adapters
        # peft's per-row adapters (adapter_names) support only some layer types; a projector
        # trained in full beside the adapter (modules_to_save, LLaVA's recipe) is not one.
        self._per_row_adapters = adapters is not None and _per_row_adapters(adapters)
        self.stacked = stacked

    @classmethod
    def load(
        cls, directory: Path, manifest: EnsembleManifest, device: torch.device, dtype: Any
    ) -> _Experts:
        loader = _model_class(manifest.architecture)
        lora = [e for e in manifest.experts if e.present and e.kind == "lora"]
        full = [e for e in manifest.experts if e.present and e.kind == "full"]
        for expert in lora + full:
            if not (directory / expert.path).is_dir():
                raise NotFound(
                    f"experts[{expert.index}]: {expert.path} is not in {directory} (the "
                    "manifest says it is present; copy the whole ensemble directory again)"
                )
        models: dict[int, nn.Module] = {}
        for expert in full:
            models[expert.index] = _load_model(loader, directory / expert.path, dtype, device)
        adapters: nn.Module | None = None
        if lora:
            from peft import PeftModel

            assert manifest.base is not None  # the manifest validator guarantees it
            base = _load_model(loader, directory / manifest.base.path, dtype, device)
            # One base in memory; each adapter is a few MB, chosen per row (adapter_names).
            first, *rest = lora
            peft_model = PeftModel.from_pretrained(
                base, directory / first.path, adapter_name=_adapter(first.index)
            )
            for expert in rest:
                peft_model.load_adapter(
                    directory / expert.path, adapter_name=_adapter(expert.index)
                )
            adapters = peft_model.to(device).eval()
            for expert in lora:
                models[expert.index] = adapters
        stacked = None
        if len(full) > 1 and not lora:
            stacked = StackedExperts.build(
                {e.index: models[e.index] for e in full}, manifest.architecture
            )
        return cls(models, adapters, stacked)

    def model(self, index: int) -> nn.Module:
        """Expert ``index``, ready to run (its adapter active, for LoRA experts)."""
        model = self._models[index]
        if model is self._adapters:
            model.set_adapter(_adapter(index))  # type: ignore[operator]
        return model

    def engines(self) -> list[nn.Module]:
        """Every distinct model a unit can run (the peft model once, the stacked model)."""
        engines = {id(model): model for model in self._models.values()}
        if self.stacked is not None:
            engines[id(self.stacked.model)] = self.stacked.model
        return list(engines.values())

    def vision_towers(self) -> list[nn.Module]:
        """Every distinct vision tower a unit can run (empty for text-only experts)."""
        towers: dict[int, nn.Module] = {}
        for engine in self.engines():
            tower = vision_tower(engine)
            if tower is not None:
                towers[id(tower)] = tower
        return list(towers.values())

    def units(self, row_experts: Sequence[int], image_rows: Sequence[bool]) -> list[_Unit]:
        """Model calls that together run every row through its own expert.

        Args:
            row_experts: Each row's expert; rows of one expert must be adjacent.
            image_rows: Whether each row has an image (its ``pixel_values`` row).
        """
        row_runs = runs(row_experts)
        if len({expert for expert, _, _ in row_runs}) != len(row_runs):
            raise ValueError(f"rows must be grouped by expert, got {list(row_experts)}")
        everyone = {expert for expert, _, _ in row_runs}
        images = [e for e, has in zip(row_experts, image_rows, strict=True) if has]
        if self._adapters is not None and all(self._models[e] is self._adapters for e in everyone):
            if len(everyone) == 1:
                # One adapter: peft's plain forward adds it to the base's output, without the
                # per-adapter row gathers and scatters that adapter_names costs every layer.
                (expert,) = everyone
                return [_Unit(self._adapters, 0, len(row_experts), {}, adapter=_adapter(expert))]
            if self._per_row_adapters:
                names = [_adapter(e) for e in row_experts]
                return [_Unit(self._adapters, 0, len(row_experts), {"adapter_names": names})]
        if self.stacked is not None and everyone <= self.stacked.experts and len(row_runs) > 1:
            return [
                _Unit(self.stacked.model, 0, len(row_experts), {}, self.stacked, row_runs, images)
            ]
        units = []
        for expert, start, end in row_runs:
            model = self._models[expert]
            adapter = _adapter(expert) if model is self._adapters else None
            units.append(_Unit(model, start, end, {}, adapter=adapter))
        return units

    def vocab_size(self, index: int) -> int:
        config: Any = self._models[index].config
        text = config.get_text_config()
        return int(text.vocab_size)


@dataclass
class _Unit:
    """One model call over rows ``[start, end)`` of a batch, each row through its own expert."""

    model: nn.Module
    start: int
    end: int
    kwargs: dict[str, Any]
    stacked: StackedExperts | None = None
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    image_experts: list[int] = field(default_factory=list)
    adapter: str | None = None

    def __call__(self, method: str, /, **inputs: Any) -> Any:
        """``model.<method>(**inputs)``, with this unit's rows assigned to their experts."""
        if self.stacked is not None:
            self.stacked.assign(self.runs, runs(self.image_experts))
        model: Any = self.model
        if self.adapter is not None and model.active_adapter != self.adapter:
            model.set_adapter(self.adapter)
        return getattr(self.model, method)(**inputs, **self.kwargs)


def _adapter(index: int) -> str:
    return f"expert-{index}"


def _per_row_adapters(model: nn.Module) -> bool:
    from peft.utils.other import ModulesToSaveWrapper

    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return all(
        isinstance(module.original_module, supported)
        for module in model.modules()
        if isinstance(module, ModulesToSaveWrapper)
    )


def _load_model(loader: Any, path: Path, dtype: Any, device: torch.device) -> nn.Module:
    try:
        model: nn.Module = loader.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidArgument(f"{path}: does not load as a model ({error})") from None
    return model.to(device).eval()


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
        experts: _Experts,
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
        experts = _Experts.load(root, manifest, target, dtype)
        _check_one_vocabulary(manifest, experts)
        processor = _load_processor(root, manifest)
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

    def _static_routes(
        self,
        batch: _Batch,
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

    def _handing_tower(self, batch: _Batch) -> Any:
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
        batch = _Batch(self, pictures, prompts)
        routes = self._static_routes(batch, prompts, k, strategy, batch_size)
        sampling = _Sampling(do_sample, temperature, seed, top_p)

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

        with self._handing_tower(batch), torch.inference_mode():
            # A call's position among its kind's calls seeds its sampling apart.
            for call, samples in enumerate(_calls(single, experts, batch_size)):
                chosen = {i: experts[i][0] for i in samples}
                top1 = self._top1(batch, chosen, max_new_tokens, sampling, call, watch)
                for i, ids in top1.items():
                    token_ids[i] = ids
            for call, samples in enumerate(_calls(mixed, experts, batch_size)):
                plan = {i: (experts[i], weights[i]) for i in samples}
                result = self._lockstep(
                    batch, plan, k, max_new_tokens, sampling, False, call, watch
                )
                for i in samples:
                    token_ids[i] = result[i][0]
            present = self.manifest.present_experts
            prior = torch.softmax(self.log_priors[present], dim=0).tolist()
            for i in dynamic:
                experts[i], weights[i] = present, prior
            for call, samples in enumerate(_calls(dynamic, experts, batch_size)):
                plan = {i: (present, prior) for i in samples}
                result = self._lockstep(batch, plan, k, max_new_tokens, sampling, True, call, watch)
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

    def _eos(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return {int(eos)} if eos is not None else set()

    def _trim(self, ids: list[int]) -> list[int]:
        # Tokens after end-of-sequence are padding that batching added.
        eos = self._eos()
        for position, token in enumerate(ids):
            if token in eos:
                return ids[:position]
        return ids

    def _top1(
        self,
        batch: _Batch,
        chosen: dict[int, int],
        max_new_tokens: int,
        sampling: _Sampling,
        call: int,
        watch: TokenWatcher | None = None,
    ) -> dict[int, list[int]]:
        """Top-1: the samples grouped by expert, each unit one batched ``generate`` (one for
        the whole batch when the experts stack or are LoRA adapters over one base)."""
        order = sorted(chosen, key=lambda i: (chosen[i], i))
        units = self.experts.units([chosen[i] for i in order], [batch.has_image[i] for i in order])
        options: dict[str, Any] = {"do_sample": sampling.do_sample}
        if sampling.do_sample:
            options.update(temperature=sampling.temperature, top_k=0, top_p=sampling.top_p)
        tokens: dict[int, list[int]] = {}
        for unit in units:
            members = order[unit.start : unit.end]
            inputs = batch.select(members)
            if watch is not None:
                options["stopping_criteria"] = _watching(watch, members, self._eos())
            with torch.random.fork_rng(devices=_rng_devices(self.device)):
                if sampling.seed is not None:
                    torch.manual_seed(_call_seed(sampling.seed, call) + unit.start)
                output = unit(
                    "generate",
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **options,
                )
            start = inputs["input_ids"].shape[1]
            for i, row in zip(members, output[:, start:].tolist(), strict=True):
                tokens[i] = self._trim(row)
        return tokens

    def _lockstep(
        self,
        batch: _Batch,
        plan: dict[int, tuple[list[int], list[float]]],
        top_k: int,
        max_new_tokens: int,
        sampling: _Sampling,
        posterior: bool,
        call: int,
        watch: TokenWatcher | None = None,
    ) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """Top-k > 1 and the posterior: experts step together, each with its own KV cache over
        the samples routed to it, and the next token comes from the mixture.

        A row is one (sample, expert) pair; rows are grouped by expert and run as few model
        calls as :meth:`_Experts.units` allows (one, for stacked or LoRA experts). Sample
        ``b``'s ``j``-th expert writes ``log_probs[b, j]``; ``log_weights[b, j]`` is its
        ``log w``. With ``posterior``, ``plan`` holds the priors; every expert's probability
        of the prompt and of each chosen token updates ``log p(S_k | z)``, and the step
        mixes its top-k.
        """
        samples = sorted(plan)
        width = max(len(chosen) for chosen, _ in plan.values())
        vocab = self.experts.vocab_size(self.manifest.present_experts[0])
        # -inf marks an unused slot (a sample mixing fewer experts than the widest).
        log_weights = torch.full((len(samples), width), float("-inf"))
        rows: list[tuple[int, int, int]] = []  # (expert, sample position, slot)
        for b, sample in enumerate(samples):
            chosen, ws = plan[sample]
            log_weights[b, : len(chosen)] = torch.tensor(ws).log()
            rows.extend((expert, b, j) for j, expert in enumerate(chosen))
        rows.sort()
        log_weights = log_weights.to(self.device)
        row_sample = torch.tensor([b for _, b, _ in rows], device=self.device)
        row_slot = torch.tensor([j for _, _, j in rows], device=self.device)
        units = self.experts.units(
            [e for e, _, _ in rows], [batch.has_image[samples[b]] for _, b, _ in rows]
        )
        log_probs = torch.full((len(samples), width, vocab), float("-inf"), device=self.device)
        states: list[tuple[_Unit, _ExpertState, slice]] = []
        for unit in units:
            part = slice(unit.start, unit.end)
            inputs = batch.select([samples[b] for _, b, _ in rows[part]])
            state, logits = _ExpertState.prefill(unit, inputs, all_logits=posterior)
            at = (row_sample[part], row_slot[part])
            log_probs[at] = torch.log_softmax(logits[:, -1].float(), -1)
            if posterior:
                log_weights[at] += _sequence_log_likelihood(logits, inputs)
            states.append((unit, state, part))
        history: list[torch.Tensor] = []
        if posterior:
            log_weights = torch.log_softmax(log_weights, dim=-1)
            history.append(log_weights.exp())
        eos = torch.tensor(sorted(self._eos()), dtype=torch.long, device=self.device)
        pad = torch.tensor(self.tokenizer.pad_token_id, device=self.device)
        finished = torch.zeros(len(samples), dtype=torch.bool, device=self.device)
        everyone = torch.arange(len(samples), device=self.device)
        chosen_tokens: list[torch.Tensor] = []
        generator = sampling.generator(self.device, call)
        for position in range(max_new_tokens):
            mix = _top_k_renormalised(log_weights, top_k) if posterior else log_weights
            mixed = torch.logsumexp(mix[:, :, None] + log_probs, dim=1)
            next_tokens = torch.where(finished, pad, sampling.choose(mixed, generator))
            chosen_tokens.append(next_tokens)
            if posterior:
                step = log_probs[everyone, :, next_tokens]
                update = torch.where(finished[:, None], torch.zeros_like(step), step)
                log_weights = torch.log_softmax(log_weights + update, dim=-1)
                history.append(log_weights.exp())
            if watch is not None:
                live = (~finished).nonzero()[:, 0].tolist()
                stop = watch([samples[b] for b in live], next_tokens[live].tolist())
                finished[[b for b, s in zip(live, stop, strict=True) if s]] = True
            finished |= torch.isin(next_tokens, eos)
            if position == max_new_tokens - 1 or bool(finished.all()):
                break
            for unit, state, part in states:
                logits = state.step(unit, next_tokens[row_sample[part]])
                log_probs[row_sample[part], row_slot[part]] = torch.log_softmax(logits.float(), -1)
        generated = torch.stack(chosen_tokens, dim=1).tolist()
        results: dict[int, tuple[list[int], torch.Tensor | None]] = {}
        for b, sample in enumerate(samples):
            trajectory = None
            if posterior:
                chosen = plan[sample][0]
                trajectory = torch.zeros(len(history), self.manifest.num_experts)
                trajectory[:, chosen] = torch.stack([h[b, : len(chosen)] for h in history]).cpu()
            results[sample] = (self._trim(generated[b]), trajectory)
        return results


class _Batch:
    """A batch encoded once (chat template, tokens, left padding, pixels); every unit of
    generation takes its rows from here, so nothing is preprocessed twice."""

    def __init__(
        self,
        ensemble: RoutedEnsemble,
        pictures: list[Image.Image | None],
        prompts: Sequence[str],
    ) -> None:
        self.ensemble = ensemble
        self.pictures = pictures
        self.prompts = list(prompts)
        self.has_image = [p is not None for p in pictures]
        self.inputs = ensemble.encode_inputs(pictures, prompts)
        pixels = self.inputs.get("pixel_values")
        # LLaVA gives each image one row of pixel_values; models that tile (InternVL) do not,
        # and their rows are encoded again per unit.
        self.one_row_per_image = pixels is None or len(pixels) == sum(self.has_image)
        rows = itertools.accumulate(self.has_image, initial=0)
        self.image_row = list(rows)[:-1]
        self.tower_output: Any = None
        self.handed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def select(self, samples: Sequence[int]) -> dict[str, torch.Tensor]:
        """The model inputs of ``samples`` (repeats allowed), in that order; padding columns
        that no selected row needs are dropped."""
        if not self.one_row_per_image and any(self.has_image[i] for i in samples):
            batch = self.ensemble.encode_inputs(
                [self.pictures[i] for i in samples], [self.prompts[i] for i in samples]
            )
            return dict(batch)
        device = self.inputs["input_ids"].device
        index = torch.tensor(list(samples), device=device)
        mask = self.inputs["attention_mask"][index]
        first = int(mask.any(dim=0).int().argmax())
        selected = {
            "input_ids": self.inputs["input_ids"][index, first:],
            "attention_mask": mask[:, first:],
        }
        image_rows = [self.image_row[i] for i in samples if self.has_image[i]]
        if image_rows:
            rows = torch.tensor(image_rows, device=device)
            pixels = self.inputs["pixel_values"][rows]
            if self.tower_output is not None:
                self.handed[id(pixels)] = (pixels, rows)
            selected["pixel_values"] = pixels
        return selected

    def handed_output(self, pixels: torch.Tensor) -> Any:
        """The routing pass's tower output for ``pixels`` if :meth:`select` made them."""
        entry = self.handed.get(id(pixels))
        if entry is None or entry[0] is not pixels:
            return None
        return take_rows(self.tower_output, entry[1])


@dataclass(frozen=True)
class _Sampling:
    do_sample: bool
    temperature: float
    seed: int | None
    top_p: float = 1.0

    def generator(self, device: torch.device, call: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        if self.seed is not None:
            generator.manual_seed(_call_seed(self.seed, call))
        else:
            generator.seed()
        return generator

    def choose(self, log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.do_sample:
            return log_probs.argmax(dim=-1)
        probabilities = torch.softmax(log_probs / self.temperature, dim=-1)
        if self.top_p < 1:
            # The nucleus: the most likely tokens until their mass reaches top_p (the first
            # always stays), as transformers' TopPLogitsWarper keeps them.
            ordered, order = probabilities.sort(dim=-1, descending=True)
            outside = ordered.cumsum(dim=-1) - ordered >= self.top_p
            kept = ordered.masked_fill(outside, 0.0)
            probabilities = torch.zeros_like(probabilities).scatter(-1, order, kept)
        return torch.multinomial(probabilities, 1, generator=generator)[:, 0]


def _watching(watch: TokenWatcher, members: list[int], eos: set[int]) -> Any:
    """``watch`` as transformers' stopping criteria of one ``generate`` over ``members``:
    called after each step, it stops the rows ``watch`` stops; rows past their
    end-of-sequence token (padding from then on) are not shown again."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Watching(StoppingCriteria):
        def __init__(self) -> None:
            self.done = [False] * len(members)

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            tokens = input_ids[:, -1].tolist()
            live = [row for row, done in enumerate(self.done) if not done]
            stop = watch([members[row] for row in live], [tokens[row] for row in live])
            stopped = torch.zeros(len(members), dtype=torch.bool, device=input_ids.device)
            for row, halt in zip(live, stop, strict=True):
                self.done[row] = halt or tokens[row] in eos
                stopped[row] = halt
            return stopped

    return StoppingCriteriaList([Watching()])


def _call_seed(seed: int, call: int) -> int:
    # Call 0 keeps the seed itself: one call of every sample samples as it always did.
    return seed + 1_000_003 * call


def _calls(samples: list[int], experts: list[list[int]], batch_size: int | None) -> list[list[int]]:
    """``samples`` split into model calls of at most ``batch_size`` rows (one row per expert
    a sample runs through), by their experts."""
    routes = [tuple(sorted(experts[i])) for i in samples]
    return [[samples[p] for p in call] for call in batches(routes, batch_size)]


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


@dataclass
class _ExpertState:
    """One unit's KV cache and attention mask over its rows."""

    past: Any
    attention_mask: torch.Tensor
    last_position: torch.Tensor

    @classmethod
    def prefill(
        cls, unit: _Unit, inputs: dict[str, torch.Tensor], all_logits: bool
    ) -> tuple[_ExpertState, torch.Tensor]:
        mask = inputs["attention_mask"]
        # As transformers' generate does for left-padded batches: positions count real tokens.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        keep = 0 if all_logits else 1  # the prompt's likelihood needs every position
        output = unit(
            "__call__", **inputs, position_ids=positions, use_cache=True, logits_to_keep=keep
        )
        return cls(output.past_key_values, mask, positions[:, -1:]), output.logits

    def step(self, unit: _Unit, tokens: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((len(tokens), 1))], dim=-1
        )
        self.last_position = self.last_position + 1
        output = unit(
            "__call__",
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            position_ids=self.last_position,
            past_key_values=self.past,
            use_cache=True,
        )
        self.past = output.past_key_values
        logits: torch.Tensor = output.logits[:, -1]
        return logits


def _sequence_log_likelihood(logits: torch.Tensor, inputs: Any) -> torch.Tensor:
    """``sum_t log p(z_t | z_<t)`` of each prompt (padding and the first token excluded)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    counted = (mask[:, :-1] * mask[:, 1:]).bool()
    return torch.where(counted, per_token, torch.zeros_like(per_token)).sum(dim=-1)


def _top_k_renormalised(log_weights: torch.Tensor, top_k: int) -> torch.Tensor:
    values, indices = log_weights.topk(top_k, dim=-1)
    kept = torch.full_like(log_weights, float("-inf")).scatter(-1, indices, values)
    return torch.log_softmax(kept, dim=-1)


def _check_one_vocabulary(manifest: EnsembleManifest, experts: _Experts) -> None:
    """Mixing adds up probabilities of the same token id: every expert needs one vocabulary."""
    sizes = {index: experts.vocab_size(index) for index in manifest.present_experts}
    if len(set(sizes.values())) > 1:
        raise InvalidArgument(
            f"experts: their vocabularies differ in size ({sizes}); an "
            "ensemble needs experts fine-tuned from one base"
        )
    tokenizers = {
        e.index: e.files["tokenizer.json"].sha256
        for e in manifest.experts
        if e.present and "tokenizer.json" in e.files
    }
    if len(set(tokenizers.values())) > 1:
        raise InvalidArgument(
            f"experts: their tokenizer.json files differ (experts {sorted(tokenizers)}); an "
            "ensemble needs experts fine-tuned from one base"
        )


def _load_processor(directory: Path, manifest: EnsembleManifest) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    first = manifest.experts[manifest.present_experts[0]]
    # A LoRA adapter folder may hold only the adapter; the base always has the processor.
    folder = directory / (
        first.path if first.kind == "full" or manifest.base is None else manifest.base.path
    )
    if (directory / first.path / "tokenizer_config.json").is_file():
        folder = directory / first.path
    loader: Any = AutoTokenizer if manifest.architecture == "causal-lm" else AutoProcessor
    try:
        processor = loader.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidArgument(f"{folder}: cannot load its processor ({error})") from None
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor
