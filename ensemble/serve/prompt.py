"""A chat request's one prompt: its text and at most one image.

Images come as ``data:`` URLs (base64) or ``file://`` paths under the server's image root;
a remote URL (``http``, ``https``, any other scheme) is refused and never fetched, so a
client cannot make the server reach into its network.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from ensemble.serve.schema import ChatCompletionRequest, ImagePart, ServeError

__all__ = ["Prompt", "image_data_url", "load_image", "read_prompt"]


@dataclass(frozen=True)
class Prompt:
    """What the ensemble answers: the user's text and its image (None: text-only)."""

    text: str
    image: Image.Image | None


def read_prompt(request: ChatCompletionRequest, image_root: Path | None) -> Prompt:
    """The prompt of a request holding one user message (the ensemble answers one turn).

    Raises:
        ServeError: another shape of conversation, more than one image, an image that is
            remote, outside ``image_root``, missing or undecodable (each named).
    """
    roles = [m.role for m in request.messages]
    if roles != ["user"]:
        raise ServeError(
            400,
            f"messages: expected one user message (the ensemble's chat template answers one "
            f"user turn), got roles {roles}",
            param="messages",
        )
    content = request.messages[0].content
    if content is None or isinstance(content, str):
        return Prompt(content or "", None)
    texts = [part.text for part in content if not isinstance(part, ImagePart)]
    images = [part for part in content if isinstance(part, ImagePart)]
    if len(images) > 1:
        raise ServeError(
            400,
            f"messages[0].content: {len(images)} images; each request takes at most one",
            param="messages",
        )
    image = None
    if images:
        image = load_image(images[0].image_url.url, image_root)
    return Prompt("\n".join(texts), image)


def load_image(url: str, image_root: Path | None) -> Image.Image:
    """The RGB image of a ``data:`` URL or a ``file://`` URL under ``image_root``.

    Raises:
        ServeError: a remote or unknown scheme, no image root, a path outside it, no such
            file, or bytes that are not an image.
    """
    where = "messages[0].content image_url.url"
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return _decode(_data_url_bytes(url, where), f"{where} (data URL)")
    if scheme == "file":
        return _decode(_local_file(url, image_root, where).read_bytes(), f"{where} ({url})")
    shown = url if len(url) <= 80 else url[:77] + "..."
    raise ServeError(
        400,
        f"{where}: {shown!r} is not a data: or file: URL; remote images are never fetched "
        "(send the image as data:image/png;base64,... or as a file:// path under the "
        "server's --image-root)",
        param="messages",
        code="unsupported_image_url",
    )


def image_data_url(image: Image.Image) -> str:
    """``image`` as a PNG data URL (lossless: the same pixels arrive)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _data_url_bytes(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    media = header[len("data:") :].split(";")
    if not comma or "base64" not in media[1:] or not media[0].startswith("image/"):
        raise ServeError(
            400,
            f"{where}: expected data:image/<type>;base64,<data>, got {header + comma!r}...",
            param="messages",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ServeError(400, f"{where}: the data URL is not base64 ({error})") from None


def _local_file(url: str, image_root: Path | None, where: str) -> Path:
    if image_root is None:
        raise ServeError(
            400,
            f"{where}: local files are refused (this server was started without --image-root)",
            param="messages",
        )
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ServeError(400, f"{where}: {url!r} names host {parts.netloc!r}; never fetched")
    path = Path(unquote(parts.path)).resolve()
    root = image_root.resolve()
    if not path.is_relative_to(root):
        raise ServeError(
            400,
            f"{where}: {path} is outside the allowed image root {root}",
            param="messages",
            code="image_outside_root",
        )
    if not path.is_file():
        raise ServeError(400, f"{where}: {path}: no such file", param="messages")
    return path


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            return opened.convert("RGB")
    except Exception as error:  # PIL raises many kinds; every one means "not an image"
        raise ServeError(
            400,
            f"{where}: cannot decode the image ({type(error).__name__}: {error})",
            param="messages",
            code="invalid_image",
        ) from None
