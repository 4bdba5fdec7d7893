"""Routed generation: top-1 is the expert's own generate, top-2 and text-only strategies are
the mixtures they claim, computed here by hand from full forward passes (no KV cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import expert_path
from protocol.errors import InvalidArgument, NotFound

from .builders import picture

PROMPT = "What is in the picture?"


def _own_generate(
    expert_dir: Path, images: list[Image.Image], max_new_tokens: int
) -> list[list[int]]:
    """The expert alone, loaded with plain transformers: greedy tokens per sample."""
    processor = AutoProcessor.from_pretrained(expert_dir)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(expert_dir).eval()
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = processor.tokenizer.eos_token_id
    rows = []
    for row in output[:, inputs["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


def test_top1_equals_the_experts_own_generate(ensemble: RoutedEnsemble, ensemble_dir: Path) -> None:
    red = [picture("red-square", 1), picture("red-square", 2)]
    blue = [picture("blue-circle", 2)]
    # Interleaved: the ensemble groups by expert and runs each group as one batch.
    result = ensemble.generate_tokens([red[0], blue[0], red[1]], [PROMPT] * 3, max_new_tokens=10)
    assert result.experts == [[0], [1], [0]]
    assert result.weights == [[1.0], [1.0], [1.0]]
    own_red = _own_generate(ensemble_dir / expert_path(0), red, 10)
    own_blue = _own_generate(ensemble_dir / expert_path(1), blue, 10)
    assert result.token_ids == [own_red[0], own_blue[0], own_red[1]]
    assert all(len(ids) > 0 for ids in result.token_ids)
    # The two experts answer differently (the test would be vacuous otherwise).
    assert _own_generate(ensemble_dir / expert_path(1), red[:1], 10)[0] != own_red[0]
    texts = ensemble.generate([red[0]], [PROMPT], max_new_tokens=10)
    assert texts == [ensemble.tokenizer.decode(own_red[0], skip_special_tokens=True)]


def _log_probs(
    ensemble: RoutedEnsemble,
    expert: int,
    image: Image.Image | None,
    prompt: str,
    generated: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert, no cache: (next-token log-probs after prompt + generated, log-likelihood of
    the prompt's tokens after the first and of each generated token)."""
    inputs = ensemble.encode_inputs([image], [prompt])
    ids = torch.cat([inputs["input_ids"], torch.tensor([generated], dtype=torch.long)], dim=1)
    feed: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image is not None:
        feed["pixel_values"] = inputs["pixel_values"]
    with torch.inference_mode():
        logits = ensemble.experts.model(expert)(**feed).logits[0].float()
    log_probs = torch.log_softmax(logits, -1)
    per_token = log_probs[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    return log_probs[-1], per_token


def test_top2_mixes_log_probabilities(ensemble: RoutedEnsemble) -> None:
    image = picture("red-square", 1)
    routing = ensemble.route_images([image], top_k=2)
    weights = routing.weights[0]
    result = ensemble.generate_tokens([image], [PROMPT], max_new_tokens=4, top_k=2)
    assert result.experts == [routing.experts[0].tolist()]
    generated: list[int] = []
    for step in range(len(result.token_ids[0])):
        per_expert = torch.stack(
            [_log_probs(ensemble, int(e), image, PROMPT, generated)[0] for e in routing.experts[0]]
        )
        mixed = torch.logsumexp(weights.log()[:, None] + per_expert, dim=0)
        if step == 0:
            # The mixture is a distribution, and not simply the heavier expert's argmax here.
            torch.testing.assert_close(mixed.exp().sum(), torch.tensor(1.0))
        generated.append(int(mixed.argmax()))
    assert result.token_ids[0] == generated


def test_top2_sampling_is_seeded(ensemble: RoutedEnsemble) -> None:
    images = [picture("red-square", 1), picture("blue-circle", 1)]

    def run(seed: int) -> list[list[int]]:
        return ensemble.generate_tokens(
            images,
            [PROMPT] * 2,
            max_new_tokens=6,
            top_k=2,
            do_sample=True,
            temperature=1.5,
            seed=seed,
        ).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)
    with pytest.raises(InvalidArgument, match="temperature"):
        ensemble.generate(images, [PROMPT] * 2, do_sample=True, temperature=0.0)


def test_uniform_mixes_every_expert_equally(ensemble: RoutedEnsemble) -> None:
    result = ensemble.generate_tokens([None], ["Hello"], max_new_tokens=1, text_only="uniform")
    assert result.experts == [[0, 1]] and result.weights == [[0.5, 0.5]]
    per_expert = torch.stack([_log_probs(ensemble, e, None, "Hello", [])[0] for e in (0, 1)])
    expected = int(torch.logsumexp(per_expert + torch.tensor(0.5).log(), dim=0).argmax())
    assert result.token_ids[0] in ([expected], [])  # [] when the token is end-of-sequence


def test_clip_text_routes_the_text_embedding(ensemble: RoutedEnsemble) -> None:
    prompts = ["a red square", "a blue circle"]
    routing = ensemble.router.route(ensemble.feature_model.encode_texts(prompts), top_k=1)
    result = ensemble.generate_tokens(
        [None, None], prompts, max_new_tokens=5, text_only="clip-text"
    )
    assert result.experts == routing.experts.tolist()
    assert all(p is None for p in result.posteriors)


def test_posterior_updates_every_token(ensemble: RoutedEnsemble) -> None:
    prompt = "Tell me about shapes."
    result = ensemble.generate_tokens(
        [None], [prompt], max_new_tokens=6, text_only="posterior", top_k=2
    )
    history = result.posteriors[0]
    assert history is not None and result.experts == [[0, 1]]
    generated = result.token_ids[0]
    assert history.shape == (len(generated) + 1, 2)
    prior = torch.tensor(ensemble.manifest.router.cluster_priors).log()
    per_expert = [_log_probs(ensemble, e, None, prompt, generated)[1] for e in (0, 1)]
    prompt_length = len(per_expert[0]) - len(generated)
    for t in range(len(generated) + 1):
        # log p(S_k | z_<=t) = log p(S_k) + sum of the expert's log-probs of every token so far.
        likelihood = torch.stack([lp[: prompt_length + t].sum() for lp in per_expert])
        torch.testing.assert_close(
            history[t], torch.softmax(prior + likelihood, 0), atol=1e-5, rtol=1e-4
        )
    assert not torch.allclose(history[0], history[-1])
    # Each step mixes with the current posterior: replay the first token by hand.
    first = torch.stack([_log_probs(ensemble, e, None, prompt, [])[0] for e in (0, 1)])
    expected = int(torch.logsumexp(history[0].log()[:, None] + first, dim=0).argmax())
    assert generated[:1] == [expected]


def test_posterior_top1_follows_the_leading_expert(ensemble: RoutedEnsemble) -> None:
    result = ensemble.generate_tokens(
        [None], ["Hi"], max_new_tokens=3, text_only="posterior", top_k=1
    )
    history = result.posteriors[0]
    assert history is not None
    leader = int(history[0].argmax())
    first = _log_probs(ensemble, leader, None, "Hi", [])[0]
    assert result.token_ids[0][:1] == [int(first.argmax())]


def test_mixed_batch_and_image_files(ensemble: RoutedEnsemble, tmp_path: Path) -> None:
    path = tmp_path / "blue.png"
    picture("blue-circle", 1).save(path)
    result = ensemble.generate_tokens(
        [path, None, picture("red-square", 1)], [PROMPT, "Hello", PROMPT], max_new_tokens=4
    )
    assert result.experts[0] == [1] and result.experts[2] == [0]
    assert result.posteriors[1] is not None  # the manifest's text_only: posterior
    assert len(result.texts) == 3


def test_bad_inputs(ensemble: RoutedEnsemble, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InvalidArgument, match=r"broken\.png: cannot decode it"):
        ensemble.generate([broken], [PROMPT])
    with pytest.raises(NotFound, match="no such file"):
        ensemble.generate([tmp_path / "absent.png"], [PROMPT])
    with pytest.raises(InvalidArgument, match=r"top_k: expected an integer in 1\.\.2"):
        ensemble.generate([None], ["x"], top_k=3)
    with pytest.raises(InvalidArgument, match="text_only: expected one of"):
        ensemble.generate([None], ["x"], text_only="oracle")
    with pytest.raises(InvalidArgument, match="2 images for 1 prompts"):
        ensemble.generate([None, None], ["x"])


@pytest.mark.parametrize("projector", [False, True], ids=["adapters", "projector-in-full"])
def test_lora_experts_share_one_base(tmp_path: Path, projector: bool) -> None:
    """Also with the projector trained in full beside each adapter (LLaVA's recipe), which
    peft cannot choose per row: each expert's rows then run as calls of their own."""
    from peft import PeftModel

    from .builders import build_ensemble

    root = build_ensemble(
        tmp_path / "lora", lora=True, lora_projector=projector, scratch=tmp_path / "pictures"
    )
    ensemble = RoutedEnsemble.from_pretrained(root, device="cpu")
    # One base model in memory; the adapter is switched per group.
    assert ensemble.experts.model(0) is ensemble.experts.model(1)
    images = [picture("red-square", 1), picture("blue-circle", 1)]
    result = ensemble.generate_tokens(images, [PROMPT] * 2, max_new_tokens=6)
    assert result.experts == [[0], [1]]
    for k, image in enumerate(images):
        base = LlavaForConditionalGeneration.from_pretrained(root / "base").eval()
        own = PeftModel.from_pretrained(base, root / expert_path(k)).eval()
        inputs = ensemble.encode_inputs([image], [PROMPT])
        output = own.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = output[0, inputs["input_ids"].shape[1] :].tolist()
        eos = ensemble.tokenizer.eos_token_id
        assert result.token_ids[k] == (
            expected[: expected.index(eos)] if eos in expected else expected
        )
    assert result.token_ids[0] != result.token_ids[1]
    # A call of one expert's rows runs with its adapter active, not per row.
    one_each = ensemble.generate_tokens(images, [PROMPT] * 2, max_new_tokens=6, batch_size=1)
    assert one_each.token_ids == result.token_ids
    mixed = ensemble.generate_tokens(images, [PROMPT] * 2, max_new_tokens=3, top_k=2)
    assert mixed.experts == [[0, 1], [1, 0]]
