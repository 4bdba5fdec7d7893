"""Issue 6, acceptance 1, end to end over loopback: experts genuinely trained by two sites,
assembled, downloaded by a reader, verified, loaded and asked questions.

The federation is real from the partition on: ``coordinator partition`` clusters red squares
and blue circles with the tiny open_clip encoder, ``coordinator recipe`` fixes a short
``tiny-cpu`` recipe and serves its materialised base, two sites enrol over mutual TLS and run
the whole ``site-agent join`` loop (artifacts, supervised ``python -m site_agent.training``,
signing, upload, acceptance), then ``coordinator assemble``, a reader token from ``coordinator
invite --role reader``, ``atoll download`` and ``atoll verify``, and
``RoutedEnsemble.from_pretrained(verify=True)`` against the CA the reader pinned.

Every answer is checked against the sites' own checkpoints loaded with plain ``transformers``,
with the router recomputed here from the plan's encoder and the downloaded centroids: top-1 is
the chosen expert's own ``generate`` token for token, top-2 and the text-only strategies are
the greedy decoding of the mixture they claim (full forward passes, no KV cache).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from assembly_helpers import Site, join
from ensemble_runtime.builders import CLIP_CONFIG, picture
from PIL import Image
from safetensors.numpy import load_file
from training.synthetic import write_recipe
from transformers import AutoProcessor, LlavaForConditionalGeneration

from coordinator.cli import main as coordinator_main
from ensemble.cli import main as atoll_main
from ensemble.download import ReaderWorkdir
from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import expert_path, load_manifest
from protocol.feature_model import load_encoder
from site_agent.agent import Agent
from site_agent.supervisor import SupervisorConfig

pytestmark = pytest.mark.slow

QUESTION = "What colour is the shape?"
ANSWERS = {"red-square": "It is red.", "blue-circle": "It is blue."}
TRAINING_VARIANTS = range(8)  # pictures per kind the sites train on
HELD_OUT = 10  # the variant asked about: a picture no expert saw
TEXT_PROMPT = "What is 2 plus 3?"
TAU = 4.0  # low enough that top-2 mixes two real weights
NEW_TOKENS = 12  # byte-level tokens: "It is blue." and its end-of-sequence


def _write_dataset(root: Path) -> Path:
    """A LLaVA data set: each kind of picture with its own answer, plus text-only sums."""
    images = root / "images"
    images.mkdir(parents=True)
    samples: list[dict[str, Any]] = []
    for kind, answer in ANSWERS.items():
        for variant in TRAINING_VARIANTS:
            name = f"{kind}-{variant}.png"
            picture(kind, variant).save(images / name)
            samples.append(
                {
                    "id": f"{kind}-{variant}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{QUESTION}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    for a in range(4):
        samples.append(
            {
                "id": f"sum-{a}",
                "conversations": [
                    {"from": "human", "value": f"What is {a} plus {a + 1}?"},
                    {"from": "gpt", "value": f"{2 * a + 1}."},
                ],
            }
        )
    (root / "train.json").write_text(json.dumps(samples, indent=1))
    return root / "train.json"


def _coordinator(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Runs a `coordinator` command in this process; returns its standard output."""
    capsys.readouterr()
    assert coordinator_main(list(argv)) == 0, capsys.readouterr()
    return capsys.readouterr().out


def _train_sign_upload(site: Site, image_root: Path) -> dict[str, Any]:
    """The `site-agent join` loop of one site to the end; returns its saved state."""
    agent = Agent(
        site.workdir,
        site.client,
        image_root=image_root,
        supervisor_config=SupervisorConfig(tick_seconds=0.5, backoff_seconds=0.1),
    )
    assert agent.run() == 0
    assert agent.phase == "done", agent.message
    return site.workdir.agent_state()


@dataclass
class OwnExpert:
    """A site's own trained checkpoint, loaded with plain ``transformers``."""

    processor: Any
    model: Any

    @classmethod
    def load(cls, directory: Path) -> OwnExpert:
        model = LlavaForConditionalGeneration.from_pretrained(directory, local_files_only=True)
        return cls(AutoProcessor.from_pretrained(directory, local_files_only=True), model.eval())

    @property
    def eos(self) -> int:
        return int(self.processor.tokenizer.eos_token_id)

    def inputs(self, image: Image.Image | None, prompt: str) -> Any:
        content: list[dict[str, str]] = [{"type": "text", "text": prompt}]
        if image is not None:
            content.insert(0, {"type": "image"})
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        if image is None:
            return self.processor.tokenizer([text], return_tensors="pt")
        return self.processor(images=[image], text=[text], return_tensors="pt")

    def generate(self, image: Image.Image | None, prompt: str) -> list[int]:
        """The expert's own greedy ``generate``, up to end-of-sequence."""
        inputs = self.inputs(image, prompt)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens: list[int] = output[0, inputs["input_ids"].shape[1] :].tolist()
        return tokens[: tokens.index(self.eos)] if self.eos in tokens else tokens

    def log_probs(
        self, image: Image.Image | None, prompt: str, generated: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs of the next token after prompt + generated, the log-likelihood of the
        prompt's tokens after its first), from one full forward pass."""
        inputs = self.inputs(image, prompt)
        prompt_ids = inputs["input_ids"]
        ids = torch.cat([prompt_ids, torch.tensor([generated], dtype=torch.long)], dim=1)
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if image is not None:
            feed["pixel_values"] = inputs["pixel_values"]
        with torch.inference_mode():
            logits = self.model(**feed).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        length = prompt_ids.shape[1]
        prompt_likelihood = log_probs[: length - 1].gather(-1, ids[0, 1:length, None]).sum()
        return log_probs[-1], prompt_likelihood


def _mixture_greedy(
    experts: list[OwnExpert],
    weights: list[float],
    image: Image.Image | None,
    prompt: str,
    posterior: bool = False,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of ``sum_k w_k p_k`` by hand. With ``posterior``, ``weights`` are the
    priors and ``w_k`` follows ``p(S_k | z) ∝ p(S_k) prod_t p_k(z_t | z_<t)`` over the prompt
    and every generated token. Returns the tokens (without end-of-sequence) and the weights
    before the first step and after each (end-of-sequence included)."""
    log_w = torch.tensor(weights, dtype=torch.float32).log()
    if posterior:
        likelihood = torch.stack([e.log_probs(image, prompt, [])[1] for e in experts])
        log_w = torch.log_softmax(log_w + likelihood, dim=0)
    tokens: list[int] = []
    history = [log_w.exp()]
    for _ in range(NEW_TOKENS):
        per_expert = torch.stack([e.log_probs(image, prompt, tokens)[0] for e in experts])
        token = int(torch.logsumexp(log_w[:, None] + per_expert, dim=0).argmax())
        if posterior:  # end-of-sequence is a generated token too
            log_w = torch.log_softmax(log_w + per_expert[:, token], dim=0)
            history.append(log_w.exp())
        if token == experts[0].eos:
            break
        tokens.append(token)
    return tokens, history


def _text_features(prompt: str) -> torch.Tensor:
    """The plan's tiny open_clip text embedding, built here as the partitioner builds its
    random-weight model (seed 0, forked RNG)."""
    import open_clip

    open_clip.add_model_config(CLIP_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip, _, _ = open_clip.create_model_and_transforms(CLIP_CONFIG.stem)
    clip.eval()
    with torch.inference_mode():
        return clip.encode_text(open_clip.get_tokenizer(CLIP_CONFIG.stem)([prompt]))[0]


def _router_weights(
    features: torch.Tensor, centroids: tuple[np.ndarray, np.ndarray | None]
) -> torch.Tensor:
    """``softmax_k(tau * cos(f - m, c_k))``: ``m`` the plan's mean feature (``--center``, the
    default), subtracted from the unit feature as the partitioner did."""
    matrix, center = centroids
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    if center is not None:
        unit = torch.nn.functional.normalize(unit - torch.from_numpy(center), dim=-1)
    cosine = unit @ torch.from_numpy(matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).T.to(
        torch.float32
    )
    return torch.softmax(TAU * cosine, dim=-1)


def _centroids(directory: Path) -> tuple[np.ndarray, np.ndarray | None]:
    spec = load_manifest(directory).router.centroids
    tensors = load_file(directory / spec.path)
    assert spec.center_tensor == "center"  # the plan was centred (partition's default)
    return tensors[spec.tensor], tensors[spec.center_tensor]


def _partition_and_recipe(
    running: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, int], str, Path]:
    """`coordinator partition` and `coordinator recipe`; returns the expert of each kind of
    picture, the recipe digest and the image root."""
    state = str(running.state.root)
    dataset = _write_dataset(tmp_path / "data")
    image_root = dataset.parent / "images"
    _coordinator(
        "partition", "--state", state, "--dataset", str(dataset), "--image-root",
        str(image_root), "--experts", "2", "--encoder", "open_clip:atoll-tiny-clip",
        "--device", "cpu", "--workers", "0", "--json", capsys=capsys,
    )  # fmt: skip
    expert_of: dict[str, int] = {}
    for k in (0, 1):
        shard = json.loads((running.state.partition_dir / f"expert-{k}.json").read_text())
        kinds = {s["image"].rsplit("-", 1)[0] for s in shard["samples"] if "image" in s}
        # Each expert gets one whole cluster of pictures (the precondition of the routing).
        assert len(kinds) == 1, f"expert {k} got pictures of {kinds}"
        expert_of[kinds.pop()] = k
    assert sorted(expert_of) == sorted(ANSWERS)
    # 20 epochs: enough for each expert to answer its own pictures word for word.
    training = {"epochs": 20, "global_batch_size": 4, "per_device_batch_size": 4}
    recipe = write_recipe(
        tmp_path / "recipe.yaml", {"name": "loopback", "training": {**training, "save_steps": 1000}}
    )
    described = _coordinator(
        "recipe", "--state", state, "--recipe", str(recipe), "--json", capsys=capsys
    )
    return expert_of, str(json.loads(described)["sha256"]), image_root


def _sites_train(running: Any, tmp_path: Path, image_root: Path) -> dict[int, tuple[str, Path]]:
    """Two sites enrol and run their whole join loop side by side; returns each expert's
    site name and trained checkpoint."""
    sites = join(running, tmp_path, ["alpha", "beta"])
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            states = list(pool.map(lambda s: _train_sign_upload(s, image_root), sites))
    finally:
        for site in sites:
            site.client.close()
    trained = {}
    for site, state in zip(sites, states, strict=True):
        done = state["training_done"]
        # 10 samples per expert, batch 2 (the dense batch of 4 over K=2), 20 epochs.
        assert done["step"] == done["total_steps"] == 100
        trained[site.assignment.expert_index] = (site.name, Path(done["model_dir"]))
    assert sorted(trained) == [0, 1]
    return trained


def _assemble_and_download(
    running: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, Path]:
    """`coordinator assemble`, a reader token, `atoll download`; returns the downloaded
    directory and the CA the reader pinned."""
    state = str(running.state.root)
    _coordinator(
        "assemble", "--state", state, "--tau", str(TAU), "--top-k", "1", "--json", capsys=capsys
    )
    token = _coordinator("invite", "--state", state, "--role", "reader", "carol", capsys=capsys)
    out = tmp_path / "consumer" / "ensemble"
    reader = ReaderWorkdir(tmp_path / "consumer" / "reader")
    code = atoll_main(
        ["download", "--coordinator", running.address, "--enrol-address",
         running.enrol_address, "--token", token.strip(), "--out", str(out), "--workdir",
         str(reader.root)]
    )  # fmt: skip
    assert code == 0
    return out, reader.credentials.ca


@pytest.fixture
def one_trainer_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each trainer child on one thread: two of them share this machine's cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


@pytest.mark.usefixtures("one_trainer_thread")
def test_trained_experts_assembled_downloaded_and_routed(
    running: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expert_of, recipe_sha256, image_root = _partition_and_recipe(running, tmp_path, capsys)
    trained = _sites_train(running, tmp_path, image_root)
    out, trust = _assemble_and_download(running, tmp_path, capsys)

    # `atoll verify`: the coordinator's signature, each site's signature and provenance.
    capsys.readouterr()
    assert atoll_main(["verify", str(out), "--trust", str(trust), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "ensemble" and report["experts"] == [0, 1]
    for row in report["expert_provenance"]:
        name, model_dir = trained[row["index"]]
        assert row["site"] == f"spiffe://testfed/site/{name}"
        assert row["provenance"]["recipe_digest"] == recipe_sha256
        # The bytes the site trained and signed are the bytes the reader got.
        for file in ("model.safetensors", "config.json", "model.sig"):
            got = out / expert_path(row["index"]) / file
            assert got.read_bytes() == (model_dir / file).read_bytes()

    ensemble = RoutedEnsemble.from_pretrained(
        out, verify=True, trust=trust.read_bytes(), device="cpu"
    )
    router = ensemble.manifest.router
    assert (router.tau, router.top_k, router.cluster_priors) == (TAU, 1, [0.5, 0.5])
    own = [OwnExpert.load(trained[k][1]) for k in (0, 1)]
    centroids = _centroids(out)
    pictures = {kind: picture(kind, HELD_OUT) for kind in ANSWERS}
    for kind, image in pictures.items():
        image.save(tmp_path / f"{kind}.png")
    # The plan's own encoder (the partitioner's), not the runtime's.
    encoder = load_encoder("open_clip:atoll-tiny-clip", device="cpu")
    features, failures = encoder.encode([tmp_path / f"{kind}.png" for kind in ANSWERS])
    assert not failures
    routes = dict(zip(ANSWERS, _router_weights(torch.from_numpy(features), centroids), strict=True))

    # Top-1: the expert of the picture's cluster answers, exactly as its own `generate` does.
    kinds = list(ANSWERS)
    top1 = ensemble.generate_tokens(
        [pictures[kind] for kind in kinds], [QUESTION] * 2, max_new_tokens=NEW_TOKENS
    )
    for row, kind in enumerate(kinds):
        chosen = expert_of[kind]
        assert int(routes[kind].argmax()) == chosen
        assert top1.experts[row] == [chosen] and top1.weights[row] == [1.0]
        answer = own[chosen].generate(pictures[kind], QUESTION)
        assert top1.token_ids[row] == answer
        # Each expert learned its own cluster, so the routing decides the answer.
        assert top1.texts[row] == ANSWERS[kind]
        assert own[1 - chosen].generate(pictures[kind], QUESTION) != answer

    # Top-2: both experts with the router's weights, greedy on their mixture.
    red = pictures["red-square"]
    top2 = ensemble.generate_tokens([red], [QUESTION], max_new_tokens=NEW_TOKENS, top_k=2)
    weights = _by_expert(top2.experts[0], top2.weights[0])
    assert sum(weights) == pytest.approx(1.0)
    assert weights == pytest.approx(routes["red-square"].tolist(), abs=1e-4)
    assert min(weights) > 0.01, "tau should leave both experts a real weight"
    tokens, _ = _mixture_greedy(own, weights, red, QUESTION)
    assert top2.token_ids[0] == tokens and tokens

    # Text-only, uniform: every expert, equal weights.
    uniform = ensemble.generate_tokens(
        [None], [TEXT_PROMPT], max_new_tokens=NEW_TOKENS, text_only="uniform"
    )
    assert uniform.experts == [[0, 1]] and uniform.weights == [[0.5, 0.5]]
    assert uniform.token_ids[0] == _mixture_greedy(own, [0.5, 0.5], None, TEXT_PROMPT)[0]

    # Text-only, clip-text: the prompt's CLIP text embedding against the image centroids.
    text_route = _router_weights(_text_features(TEXT_PROMPT)[None], centroids)[0]
    by_text = int(text_route.argmax())
    clip_text = ensemble.generate_tokens(
        [None], [TEXT_PROMPT], max_new_tokens=NEW_TOKENS, text_only="clip-text"
    )
    assert clip_text.experts == [[by_text]] and clip_text.weights == [[1.0]]
    assert clip_text.token_ids[0] == own[by_text].generate(None, TEXT_PROMPT)
    clip_text = ensemble.generate_tokens(
        [None], [TEXT_PROMPT], max_new_tokens=NEW_TOKENS, text_only="clip-text", top_k=2
    )
    weights = _by_expert(clip_text.experts[0], clip_text.weights[0])
    # Not 0.5/0.5: the text embedding's own weights.
    assert weights == pytest.approx(text_route.tolist(), abs=1e-4)
    assert clip_text.token_ids[0] == _mixture_greedy(own, weights, None, TEXT_PROMPT)[0]

    # Text-only, posterior: the exact router, updated after every token.
    posterior = ensemble.generate_tokens(
        [None], [TEXT_PROMPT], max_new_tokens=NEW_TOKENS, text_only="posterior", top_k=2
    )
    tokens, history = _mixture_greedy(own, router.cluster_priors, None, TEXT_PROMPT, posterior=True)
    assert posterior.experts == [[0, 1]] and posterior.token_ids[0] == tokens
    trace = posterior.posteriors[0]
    assert trace is not None and len(trace) == len(history) >= len(tokens) + 1
    torch.testing.assert_close(trace, torch.stack(history), atol=1e-4, rtol=1e-3)


def _by_expert(experts: list[int], weights: list[float]) -> list[float]:
    """The weights of experts 0 and 1 (a routing lists its experts heaviest first)."""
    assert sorted(experts) == [0, 1]
    by_index = dict(zip(experts, weights, strict=True))
    return [by_index[0], by_index[1]]
