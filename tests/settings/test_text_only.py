"""Setting 4, the c-BTM case: causal-LM experts on a text-only data set, routed by the exact
posterior ``p(S_k | z) ∝ p(S_k) prod_t p_k(z_t | z_<t)``, through the real commands. A
text-only data set has no image to cluster: partition needs no encoder and splits it at
random into K equal shards, and the ensemble has no image router."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.ensemble_manifest import load_manifest

from .harness import Federation, generate, tiny_recipe

# A federation per module: its set-up (training included) counts toward the first test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _documents(out: Path) -> Path:
    """Sums and word questions as chat samples, and held-out ones in `atoll eval`'s format."""
    rng = random.Random(4)
    out.mkdir(parents=True, exist_ok=True)

    def sample(i: int) -> dict[str, Any]:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"id": f"sum-{i}", "benchmark": "sums", "conversations": [
            {"from": "human", "value": f"What is {a} plus {b}?"},
            {"from": "gpt", "value": str(a + b)}]}  # fmt: skip

    (out / "train.json").write_text(json.dumps([sample(i) for i in range(40)]))
    (out / "eval.json").write_text(json.dumps([sample(100 + i) for i in range(4)]))
    return out


@pytest.fixture(scope="module")
def text_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, Path, Path]]:
    root = tmp_path_factory.mktemp("causal-lm")
    data = _documents(root / "data")
    federation = Federation(root / "federation", "clm")
    federation.set_up(tiny_recipe(root / "causal-lm.yaml", "causal-lm"))
    try:
        federation.partition("--dataset", str(data / "train.json"), "--image-root", str(data),
                             "--experts", "2")  # fmt: skip
        federation.train(2, None)
        _, ensemble = federation.publish("--text-only", "posterior", "--top-k", "2")
        yield federation, ensemble, data
    finally:
        federation.stop()


def test_causal_lm_experts_routed_by_the_posterior(
    text_only: tuple[Federation, Path, Path],
) -> None:
    federation, ensemble, data = text_only
    plan = json.loads((federation.state / "partition" / "plan.json").read_text())
    assert plan["encoder"] is None and plan["dataset"]["text_only"] == 40
    assert [c["text_only"] for c in plan["clusters"]] == [20, 20]
    manifest = load_manifest(ensemble)
    assert manifest.architecture == "causal-lm"
    assert manifest.router.encoder is None and manifest.router.centroids is None
    answer = generate(federation, ensemble, "--prompt", "What is 2 plus 3?")
    assert sorted(answer["experts"]) == [0, 1]
    assert sum(answer["final_posterior"]) == pytest.approx(1)
    assert answer["final_posterior"] != answer["weights"]  # updated token by token
    out = federation.run("atoll", "eval", "--ensemble", str(ensemble), "--data",
                         str(data / "eval.json"), "--image-root", str(data), "--metric",
                         "exact", "--max-new-tokens", "3", "--device", "cpu", "--json")  # fmt: skip
    report = json.loads(out)
    assert [g["n"] for g in report["groups"] if g["task"] == "all"] == [4]
