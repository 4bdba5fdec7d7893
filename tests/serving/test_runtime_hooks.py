"""What the server needs from ``RoutedEnsemble.generate_tokens``: ``watch`` sees each token as
it is chosen and stops samples without changing the others; ``top_p`` keeps the nucleus."""

from __future__ import annotations

import pytest
from ensemble_runtime.builders import picture

from ensemble.runtime import RoutedEnsemble
from protocol.errors import InvalidArgument

PROMPTS = ["What is in the picture?", "Describe it.", "Tell me a joke."]


@pytest.mark.parametrize("top_k", [1, 2])
def test_watch_streams_tokens_and_stops_samples(ensemble: RoutedEnsemble, top_k: int) -> None:
    images = [picture("red-square", 1), picture("blue-circle", 2), None]
    full = ensemble.generate_tokens(images, PROMPTS, 10, top_k=top_k)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def watch(samples: list[int], tokens: list[int]) -> list[bool]:
        for sample, token in zip(samples, tokens, strict=True):
            seen[sample].append(token)
        return [sample == 1 and len(seen[1]) == 3 for sample in samples]

    stopped = ensemble.generate_tokens(images, PROMPTS, 10, top_k=top_k, watch=watch)
    assert stopped.token_ids[1] == full.token_ids[1][:3] == seen[1]
    # The others ran on, unchanged, every token shown as it came.
    assert stopped.token_ids[0] == full.token_ids[0] == seen[0]
    assert stopped.token_ids[2] == full.token_ids[2] == seen[2]
    assert stopped.texts[1] == ensemble.tokenizer.decode(seen[1], skip_special_tokens=True)


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_tiny_nucleus_samples_the_greedy_answer(ensemble: RoutedEnsemble, top_k: int) -> None:
    image = [picture("blue-circle", 1)]
    greedy = ensemble.generate(image, PROMPTS[:1], 10, top_k=top_k)
    nucleus = ensemble.generate(
        image, PROMPTS[:1], 10, top_k=top_k, do_sample=True, temperature=1.5, top_p=1e-6, seed=1
    )
    sampled = ensemble.generate(image, PROMPTS[:1], 10, top_k=top_k, do_sample=True, seed=1)
    assert nucleus == greedy != sampled
    with pytest.raises(InvalidArgument, match=r"top_p: expected 0 < top_p <= 1, got 0"):
        ensemble.generate(image, PROMPTS[:1], 2, do_sample=True, top_p=0)
