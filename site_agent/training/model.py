"""Building the base model and its processor, and choosing which parameters train.

Two ways to get a base, both without touching the network:

* ``base: init-from-config``: a tiny randomly initialised model of the recipe's architecture,
  built from :class:`~protocol.recipe.TinyModelSize` with ``init_seed``, together with
  a byte-level tokenizer and image processor made here. Any machine that builds it gets the same
  weights, which is what tests and the tiny-cpu federation rely on.
* ``base: pretrained``: a Hugging Face directory on local disk, loaded with
  ``local_files_only=True`` (a site passes its own copy with ``--base-model PATH``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from protocol.errors import InvalidArgument, NotFound
from protocol.recipe import (
    Architecture,
    BaseSource,
    FreezeSettings,
    ModelSettings,
    TinyModelSize,
)

__all__ = [
    "build_tiny_processor",
    "check_model_directory",
    "count_parameters",
    "freeze_parameters",
    "is_projector_parameter",
    "language_model_lora_targets",
    "load_model",
    "load_processor",
    "materialize_tiny_base",
]

# Parameter-name prefixes of the three parts of a vision-language model in transformers v5
# (LLaVA and InternVL share them). A causal LM is all language model.
_VISION_TOWER = ("model.vision_tower.",)
_PROJECTOR = ("model.multi_modal_projector.",)
_LANGUAGE_MODEL = ("model.language_model.", "lm_head.")

_LLAVA_SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "image": "<image>"}
_CHATML_SPECIALS = {"eos": "<|im_end|>", "pad": "<|endoftext|>", "start": "<|im_start|>"}
_INTERNVL_IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# Renders a message's content, a string or a list of {"type": "image"|"text"} parts, with the
# image placeholder where the data put it. Tiny templates only; real models bring their own.
_CONTENT_MACRO = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER\n"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
)
# The LLaVA-1.5 ("vicuna v1") conversation layout. No whitespace control (`{%-`) anywhere: the
# literal newlines between turns are part of the format.
_LLAVA_TEMPLATE = _CONTENT_MACRO.replace("IMAGE_PLACEHOLDER", "<image>") + (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ render(message['content']) }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ render(message['content']) }}\n"
    "{% else %}ASSISTANT: {{ render(message['content']) }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
# The ChatML layout of InternVL 2.5 and Qwen2.
_CHATML_TEMPLATE = _CONTENT_MACRO.replace("IMAGE_PLACEHOLDER", "<IMG_CONTEXT>") + (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ render(message['content']) }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_tokenizer(specials: list[str], **named: Any) -> Any:
    """A byte-level tokenizer: 256 byte symbols plus ``specials``, no merges, nothing to train.

    Byte-level coverage means every string encodes, and offsets map back to characters, which
    label masking needs. Names in ``named`` become tokenizer attributes (``bos_token`` ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **named)


def build_tiny_processor(architecture: Architecture, size: TinyModelSize) -> Any:
    """The tokenizer and image processor of a tiny model, built locally.

    Args:
        architecture: Model family; decides the chat template and the image tokens.
        size: Image and patch size the image processor must produce.

    Returns:
        A ``LlavaProcessor``, an ``InternVLProcessor`` or a tokenizer (causal LM).
    """
    from transformers import (
        CLIPImageProcessor,
        GotOcr2ImageProcessor,
        InternVLProcessor,
        LlavaProcessor,
    )
    from transformers.models.internvl import InternVLVideoProcessor

    if architecture is Architecture.LLAVA:
        tokenizer = _byte_level_tokenizer(
            list(_LLAVA_SPECIALS.values()),
            bos_token=_LLAVA_SPECIALS["bos"],
            eos_token=_LLAVA_SPECIALS["eos"],
            pad_token=_LLAVA_SPECIALS["pad"],
            extra_special_tokens={"image_token": _LLAVA_SPECIALS["image"]},
            chat_template=_LLAVA_TEMPLATE,
        )
        side = size.image_size
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=size.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=_LLAVA_TEMPLATE,
        )
    specials = list(_CHATML_SPECIALS.values())
    common = {
        "eos_token": _CHATML_SPECIALS["eos"],
        "pad_token": _CHATML_SPECIALS["pad"],
        "chat_template": _CHATML_TEMPLATE,
    }
    if architecture is Architecture.CAUSAL_LM:
        return _byte_level_tokenizer(specials, **common)
    tokenizer = _byte_level_tokenizer(
        specials + list(_INTERNVL_IMAGE_TOKENS.values()),
        extra_special_tokens=_INTERNVL_IMAGE_TOKENS,
        **common,
    )
    tile = {"height": size.image_size, "width": size.image_size}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=False),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=_internvl_tokens_per_tile(size),
        chat_template=_CHATML_TEMPLATE,
    )


def _internvl_tokens_per_tile(size: TinyModelSize) -> int:
    # InternVL's pixel shuffle (downsample ratio 0.5) merges 2x2 patches into one token.
    return (size.image_size // size.patch_size // 2) ** 2


def _tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _build_tiny_model(architecture: Architecture, size: TinyModelSize, processor: Any) -> nn.Module:
    from transformers import (
        CLIPVisionConfig,
        InternVLConfig,
        InternVLForConditionalGeneration,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
    )
    from transformers.models.internvl import InternVLVisionConfig

    tokenizer = _tokenizer_of(processor)
    text = {
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "max_position_embeddings": size.max_position_embeddings,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_hidden_layers": size.vision_num_layers,
        "num_attention_heads": size.vision_num_heads,
        "image_size": size.image_size,
        "patch_size": size.patch_size,
    }
    if architecture is Architecture.LLAVA:
        config: Any = LlavaConfig(
            vision_config=CLIPVisionConfig(projection_dim=size.vision_hidden_size, **vision),
            text_config=LlamaConfig(**text),
            image_token_index=tokenizer.image_token_id,
            image_seq_length=(size.image_size // size.patch_size) ** 2,
        )
        return LlavaForConditionalGeneration(config)
    if architecture is Architecture.INTERNVL:
        config = InternVLConfig(
            vision_config=InternVLVisionConfig(**vision),
            text_config=Qwen2Config(**text),
            image_token_id=tokenizer.context_image_token_id,
            image_seq_length=_internvl_tokens_per_tile(size),
        )
        return InternVLForConditionalGeneration(config)
    return LlamaForCausalLM(LlamaConfig(**text))


def check_model_directory(path: Path) -> None:
    """Raises NotFound unless ``path`` is a Hugging Face model directory (has config.json)."""
    if not (path / "config.json").is_file():
        raise NotFound(
            f"base model {path}: expected a Hugging Face model directory with config.json"
            + ("" if path.exists() else " (the path does not exist)")
        )


def load_processor(settings: ModelSettings, base_model: Path | None) -> Any:
    """The processor (vision-language) or tokenizer (causal LM) of the base model.

    Args:
        settings: The recipe's model section.
        base_model: A local Hugging Face directory, or None to build the tiny one from config.

    Raises:
        InvalidArgument: ``base: pretrained`` without a path, or files that do not load.
        NotFound: the path is not a model directory.
    """
    if base_model is None:
        if settings.base is BaseSource.PRETRAINED:
            raise InvalidArgument(
                "model.base is 'pretrained': pass the local checkpoint with --base-model PATH"
            )
        return build_tiny_processor(settings.architecture, settings.tiny or TinyModelSize())
    from transformers import AutoProcessor, AutoTokenizer

    check_model_directory(base_model)
    loader: Any = (
        AutoTokenizer if settings.architecture is Architecture.CAUSAL_LM else AutoProcessor
    )
    try:
        processor = loader.from_pretrained(base_model, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidArgument(
            f"base model {base_model}: cannot load its processor ({error})"
        ) from None
    tokenizer = _tokenizer_of(processor)
    if tokenizer.pad_token is None:
        # Llama-style tokenizers ship without a pad token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_model(
    settings: ModelSettings,
    base_model: Path | None,
    processor: Any,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Builds (tiny, seeded) or loads (local directory) the base model.

    Args:
        settings: The recipe's model section.
        base_model: A local Hugging Face directory, or None to build the tiny one from config.
            An ``init-from-config`` recipe may also be given a directory: the copy the
            coordinator materialised with :func:`materialize_tiny_base`.
        processor: What :func:`load_processor` returned (the tiny model's vocabulary size and
            image token come from it).
        dtype: Parameter dtype for pretrained weights.

    Raises:
        InvalidArgument: the directory holds another model family or does not load.
        NotFound: the path is not a model directory.
    """
    if base_model is None:
        # Seeded construction on CPU is bit-for-bit reproducible: every site builds the same base.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.init_seed)
            return _build_tiny_model(
                settings.architecture, settings.tiny or TinyModelSize(), processor
            )
    from transformers import (
        AutoModelForCausalLM,
        InternVLForConditionalGeneration,
        LlavaForConditionalGeneration,
    )

    check_model_directory(base_model)
    loader: Any = {
        Architecture.LLAVA: LlavaForConditionalGeneration,
        Architecture.INTERNVL: InternVLForConditionalGeneration,
        Architecture.CAUSAL_LM: AutoModelForCausalLM,
    }[settings.architecture]
    try:
        model: nn.Module = loader.from_pretrained(base_model, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidArgument(
            f"base model {base_model}: cannot load it as model.architecture "
            f"{settings.architecture.value!r} ({error})"
        ) from None
    return model


def materialize_tiny_base(settings: ModelSettings, directory: Path) -> None:
    """Writes the ``init-from-config`` base to ``directory`` with ``save_pretrained``.

    The coordinator calls this once per federation so that sites can verify and load the very
    same files; the result loads with :func:`load_processor` / :func:`load_model` given
    ``base_model=directory``.

    Raises:
        InvalidArgument: the recipe's base is not ``init-from-config``.
    """
    if settings.base is not BaseSource.INIT_FROM_CONFIG:
        raise InvalidArgument("model.base: only an init-from-config base can be materialised")
    processor = load_processor(settings, None)
    model = load_model(settings, None, processor)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # type: ignore[operator]
    processor.save_pretrained(directory)


def freeze_parameters(model: nn.Module, architecture: Architecture, freeze: FreezeSettings) -> None:
    """Sets ``requires_grad`` per part: vision tower, projector, language model.

    Raises:
        InvalidArgument: every parameter ended up frozen (nothing would train).
    """
    frozen: tuple[str, ...] = ()
    if architecture is Architecture.CAUSAL_LM:
        if freeze.vision_tower or freeze.projector:
            raise InvalidArgument(
                "model.freeze: a causal LM has no vision_tower or projector to freeze"
            )
        if freeze.language_model:
            frozen = ("",)
    else:
        frozen = (
            (_VISION_TOWER if freeze.vision_tower else ())
            + (_PROJECTOR if freeze.projector else ())
            + (_LANGUAGE_MODEL if freeze.language_model else ())
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(frozen) if frozen else True)


def is_projector_parameter(name: str) -> bool:
    """Whether a (possibly peft-prefixed) parameter name belongs to the multimodal projector."""
    return "multi_modal_projector." in name


def language_model_lora_targets(architecture: Architecture) -> str:
    """Regex of the linear layers LoRA adapts: the language model's attention and MLP."""
    layers = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    if architecture is Architecture.CAUSAL_LM:
        return rf".*\.{layers}"
    return rf".*language_model\..*\.{layers}"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
