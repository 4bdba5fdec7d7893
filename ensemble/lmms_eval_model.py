"""The ensemble as an lmms-eval model: ``lmms-eval --model atoll --model_args ensemble=DIR``.

lmms-eval finds it through the ``lmms_eval.models`` entry point (:func:`manifest`), so the
paper's benchmarks that lmms-eval implements (VQAv2, GQA, VizWiz, ScienceQA-IMG, TextVQA,
POPE, MME, MMBench, ChartQA, DocVQA, AI2D, ...) run on a routed ensemble unchanged.

* ``generate_until``: ``RoutedEnsemble.generate`` over each group of requests that share
  generation settings (``batch_size`` rows per model call, scheduled by expert), cut at the
  task's ``until`` strings.
* ``loglikelihood``: the continuation's likelihood under the mixture the ensemble generates
  from (:func:`ensemble.likelihood.continuation_log_likelihood`), answered as lmms-eval's own
  models answer and as its multiple-choice scorer expects (it takes the argmin): the mean
  negative log-likelihood per continuation token, and whether every token is the mixture's
  most likely one.

Model arguments: ``ensemble`` (the directory), ``top_k`` (default: the manifest's),
``batch_size`` (rows per model call), ``device``, ``verify`` (check every file first,
default true).

lmms-eval pins ``wandb==0.25.0``, which needs ``protobuf<7``, and Atoll's stubs need
protobuf 7: install it in a venv of its own (see the README).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from ensemble.likelihood import continuation_log_likelihood
from ensemble.runtime import RoutedEnsemble
from protocol.progress import progress_bars

__all__ = ["AtollEnsemble", "manifest"]


def manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point: model ``atoll`` is :class:`AtollEnsemble`."""
    return ModelManifest(model_id="atoll", simple_class_path=f"{__name__}.AtollEnsemble")


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in {"0", "false", "no", "off"}
    return bool(value)


class AtollEnsemble(lmms):
    """A routed ensemble behind lmms-eval's model interface (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        ensemble: str,
        top_k: int | str | None = None,
        batch_size: int | str | None = 16,
        device: str | None = None,
        verify: bool | str = True,
        **_: Any,  # what lmms-eval passes every model (max_length, ...)
    ) -> None:
        super().__init__()
        self.model = RoutedEnsemble.from_pretrained(ensemble, verify=_flag(verify), device=device)
        self.top_k = None if top_k in (None, "", "None") else int(top_k)
        size = None if batch_size in (None, "", "auto") else int(batch_size)
        self.batch_size_per_call = size

    # -- lmms-eval's interface ----------------------------------------------------------------

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(position)
        with progress_bars(self.rank == 0) as bars:
            advance = bars.add("atoll generate_until", len(requests))
            for members in groups.values():
                settings: dict[str, Any] = dict(requests[members[0]].args[1])
                until = settings.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                temperature = float(settings.get("temperature", 0) or 0)
                do_sample = _flag(settings.get("do_sample", False)) and temperature > 0
                texts = self.model.generate(
                    [self._visual(requests[i].args) for i in members],
                    [requests[i].args[0] for i in members],
                    int(settings.get("max_new_tokens", 32)),
                    top_k=self.top_k,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else 1.0,
                    top_p=float(settings.get("top_p") or 1.0) if do_sample else 1.0,
                    batch_size=self.batch_size_per_call,
                )
                for i, text in zip(members, texts, strict=True):
                    answers[i] = _cut(text, until)
                advance(len(members))
        return [answer or "" for answer in answers]

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        results: list[Any] = []
        with progress_bars(self.rank == 0) as bars:
            advance = bars.add("atoll loglikelihood", len(requests))
            for request in requests:
                context, target, _, doc_id, task, split = request.args
                continuation = (
                    target if isinstance(target, str) else target(self._doc(task, split, doc_id))
                )
                image = self._visual(request.args)
                scored = continuation_log_likelihood(
                    self.model, image, context, continuation, self.top_k
                )
                # As lmms-eval's own models answer (llava_hf: the language-model loss), and as its
                # multiple-choice scorer expects (the argmin wins): the mean negative
                # log-likelihood per continuation token.
                loss = -scored.log_probability / max(1, scored.tokens)
                results.append((loss, scored.greedy))
                advance(1)
        if _stringifies_pairs():
            from lmms_eval.api.instance import GenerationResult

            # lmms-eval 0.7.3 turns any output that is not text into str(output), so every
            # multiple-choice task would parse "(-3.2, False)"; its own wrapper passes the
            # pair through unchanged.
            return [GenerationResult(text=pair) for pair in results]
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("atoll: multi-round generation is not supported")

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visual(self, args: Sequence[Any]) -> Image.Image | None:
        """The request's one image (None: text-only)."""
        doc_to_visual, doc_id, task, split = args[2], args[3], args[4], args[5]
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(
                f"{task} doc {doc_id}: {len(visuals)} images; the ensemble answers about one"
            )
        if visuals and not isinstance(visuals[0], Image.Image):
            raise ValueError(
                f"{task} doc {doc_id}: expected a PIL image, got {type(visuals[0]).__name__}"
            )
        return visuals[0].convert("RGB") if visuals else None


def _stringifies_pairs() -> bool:
    """Whether this lmms-eval turns a ``(log p, is_greedy)`` answer into its ``str``."""
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # older releases hand answers to the task as they are
        return False
    return isinstance(unwrap_generation_output((0.0, True))[0], str)


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first of the ``until`` strings."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
