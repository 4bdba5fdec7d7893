"""``continuation_log_likelihood`` (lmms-eval's ``loglikelihood``): top-1 is the routed
expert's own likelihood, the posterior is Bayes' mixture of sequence likelihoods, computed
here from the experts loaded with plain transformers; a greedy answer is greedy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ensemble_runtime.builders import picture
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ensemble.likelihood import continuation_log_likelihood
from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import expert_path

QUESTION = "What is in the picture?"
ANSWER = " a red square"


def _token_log_probs(directory: Path, text: str, image: Any) -> torch.Tensor:
    """log p(token t | tokens before) for every token but the first, by one plain expert."""
    processor = AutoProcessor.from_pretrained(directory)
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    if image is None:
        inputs = processor.tokenizer([text], return_tensors="pt")
    else:
        inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    return torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]


def test_top1_is_the_routed_experts_own_likelihood(
    ensemble: RoutedEnsemble, ensemble_dir: Path
) -> None:
    image = picture("blue-circle", 1)
    prompt = ensemble.prompt_text(QUESTION, True)
    whole = _token_log_probs(ensemble_dir / expert_path(1), prompt + ANSWER, image)
    head = _token_log_probs(ensemble_dir / expert_path(1), prompt, image)
    scored = continuation_log_likelihood(ensemble, image, QUESTION, ANSWER, top_k=1)
    total = scored.log_probability
    assert scored.tokens == len(whole) - len(head)
    assert total == pytest.approx(float(whole[len(head) :].sum()), abs=1e-4)
    other = _token_log_probs(ensemble_dir / expert_path(0), prompt + ANSWER, image)
    assert abs(float(other[len(head) :].sum()) - total) > 1e-2  # the router chose expert 1


def test_the_posterior_is_bayes_mixture(ensemble: RoutedEnsemble, ensemble_dir: Path) -> None:
    prompt = ensemble.prompt_text(QUESTION, False)
    log_prior = torch.softmax(ensemble.log_priors, 0).log()
    joint, prefix = [], []
    for k in (0, 1):
        whole = _token_log_probs(ensemble_dir / expert_path(k), prompt + ANSWER, None)
        head = _token_log_probs(ensemble_dir / expert_path(k), prompt, None)
        joint.append(log_prior[k] + whole.sum())
        prefix.append(log_prior[k] + head.sum())
    bayes = torch.logsumexp(torch.stack(joint), 0) - torch.logsumexp(torch.stack(prefix), 0)
    scored = continuation_log_likelihood(ensemble, None, QUESTION, ANSWER, top_k=2)
    assert scored.log_probability == pytest.approx(float(bayes), abs=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_greedy_answer_is_greedy(ensemble: RoutedEnsemble, top_k: int) -> None:
    image = picture("red-square", 2)
    tokens = ensemble.generate_tokens([image], [QUESTION], 6, top_k=top_k).token_ids[0]
    # The tiny byte-level vocabulary decodes some tokens to U+FFFD, which does not encode back
    # to them: score the longest greedy prefix whose text does.
    prompt = ensemble.prompt_text(QUESTION, True)
    start = len(ensemble.processor(images=[image], text=[prompt])["input_ids"][0])
    answer = ""
    for end in range(1, len(tokens) + 1):
        text = ensemble.tokenizer.decode(tokens[:end])
        encoded = ensemble.processor(images=[image], text=[prompt + text])["input_ids"][0]
        if list(encoded[start:]) != tokens[:end]:
            break
        answer = text
    assert answer
    best = continuation_log_likelihood(ensemble, image, QUESTION, answer, top_k=top_k)
    assert best.greedy
    worse = continuation_log_likelihood(ensemble, image, QUESTION, answer + "zq", top_k)
    assert not worse.greedy and worse.log_probability < best.log_probability
