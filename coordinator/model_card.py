"""The model card (``README.md``) of an assembled ensemble: what it is, how it routes, where
each expert came from, and how balanced the partition was."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocol.partition_plan import PartitionPlan

if TYPE_CHECKING:
    from coordinator.ensemble_experts import ExpertChoice

__all__ = ["PAPER", "model_card"]

PAPER = "Maschan, Qu, Liu (2026), Decentralized Autoregressive Generation, arXiv:2601.03184"


def model_card(
    federation: str,
    version: str,
    plan: PartitionPlan,
    router: dict[str, Any],
    fitted: bool,
    experts: list[ExpertChoice],
    missing: list[int],
    revoked: dict[int, ExpertChoice],
) -> str:
    """The ensemble's ``README.md``: what it is, its router, each expert's provenance and the
    plan's balance."""
    lines = [
        f"# Atoll routed ensemble — federation `{federation}`, {version}",
        "",
        f"A routed ensemble of {plan.num_experts} experts, each trained at one site on one "
        "cluster of the data, implementing the method of:",
        "",
        f"> {PAPER}",
        "",
        "Load it with `ensemble.RoutedEnsemble.from_pretrained(DIR)`; check it offline with "
        "`atoll verify DIR --trust ca.pem`.",
        "",
        "## Router",
        "",
        f"`p(S_k | image) = softmax_k(tau * cos(f(image), c_k))`, tau = {router['tau']:g}"
        f"{' (fitted on held-out data)' if fitted else ''}, "
        f"top-k = {router['top_k']}, text-only prompts: `{router['text_only']}`.",
        (
            f"Feature model: `{plan.encoder.get('model')}` ({plan.encoder.get('backend')}); "
            if plan.encoder is not None
            else "No image router: the experts were trained on a text-only data set; "
        )
        + f"plan digest `{plan.digest}`.",
        "",
        "## Provenance",
        "",
        "| expert | site | model root digest | upload | audit log index |",
        "|---|---|---|---|---|",
    ]
    for choice in experts:
        lines.append(
            f"| {choice.index} | {choice.site} | `{choice.model_root_digest[:16]}..` | "
            f"{choice.upload_id} | {choice.log_index} |"
        )
    for index in missing:
        why = f"site {revoked[index].site} revoked" if index in revoked else "no accepted expert"
        lines.append(f"| {index} | MISSING ({why}) | - | - | - |")
    lines += [
        "",
        "## Balance",
        "",
        "| expert | unique images | samples | image samples | text-only |",
        "|---|---|---|---|---|",
    ]
    for row in plan.clusters:
        lines.append(
            f"| {row.expert} | {row.unique_images} | {row.samples} | {row.image_samples} | "
            f"{row.text_only} |"
        )
    lines += ["", "Signed by the coordinator: `model.sig` + `ensemble.sigstore.json`.", ""]
    return "\n".join(lines)
