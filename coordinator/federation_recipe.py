"""`coordinator recipe`: fixes the federation's training recipe and base checkpoint.

Both are recorded with their digests and served to sites as artifacts (``recipe/...``, and
``base/...`` for small bases); every assignment then names them, and a site checks the base's
digest before it trains. A large base is recorded by digest only: each site brings its own copy
(`site-agent join --base-model PATH`), which must hash to the same digest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

from coordinator import audit
from coordinator.artifacts import register_artifact
from coordinator.state import StateDir
from coordinator.store import Store
from protocol.errors import FailedPrecondition, InvalidArgument, NotFound
from protocol.recipe import BaseSource, load_recipe
from protocol.recipe_description import (
    BaseModelDescription,
    RecipeDescription,
    parse_recipe_description,
)
from protocol.signing import hash_model_files, root_digest

# Bases up to this size are served by the coordinator; larger ones stay at the sites.
SERVE_BASE_LIMIT = 1 << 30
RECIPE_META = "recipe"


def directory_digest(directory: Path) -> tuple[str, dict[str, str]]:
    """The model-signing root digest of a checkpoint directory, and its per-file digests."""
    files = hash_model_files(directory)
    if not files:
        raise InvalidArgument(f"base model {directory}: the directory holds no files")
    return root_digest(files), files


def current_recipe(store: Store) -> RecipeDescription | None:
    """The recorded recipe description, or None before `coordinator recipe`.

    Raises:
        InvalidArgument: the store holds a description that is not one (named field).
    """
    text = store.get_meta(RECIPE_META)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise InvalidArgument(f"the store's recipe description: not valid JSON ({error})") from None
    return parse_recipe_description(data, "the store's recipe description")


def _materialize(recipe_path: Path, output: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "site_agent.training.materialize",
            "--recipe",
            str(recipe_path),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise FailedPrecondition(
            f"materialising the base of {recipe_path} failed: {done.stderr.strip()[-2000:]}"
        )


def set_recipe(
    state: StateDir, store: Store, recipe_path: Path, base_model: Path | None = None
) -> RecipeDescription:
    """Validates and records the recipe (and its base); returns the recorded description."""
    recipe, recipe_sha256 = load_recipe(recipe_path)
    existing = current_recipe(store)
    if store.list_assignments():
        if existing is not None and existing.sha256 == recipe_sha256:
            return existing
        raise FailedPrecondition(
            "experts are already assigned under the current recipe; it cannot change now"
        )
    init_from_config = recipe.model.base is BaseSource.INIT_FROM_CONFIG
    if init_from_config and base_model is not None:
        raise InvalidArgument(
            f"--base-model: recipe {recipe_path} says model.base: init-from-config, "
            "so the coordinator builds the base itself"
        )
    if not init_from_config and base_model is None:
        raise InvalidArgument(
            f"--base-model PATH is required: recipe {recipe_path} says model.base: pretrained"
        )
    if base_model is not None and not base_model.is_dir():
        raise NotFound(f"--base-model {base_model}: not a directory")

    staging = Path(tempfile.mkdtemp(prefix=".recipe-", dir=state.root))
    try:
        (staging / "recipe").mkdir()
        shutil.copyfile(recipe_path, staging / "recipe" / "recipe.yaml")
        extra = []
        if recipe.training.deepspeed:
            relative = PurePosixPath(recipe.training.deepspeed)
            if relative.is_absolute() or ".." in relative.parts:
                raise InvalidArgument(
                    f"recipe {recipe_path}: training.deepspeed {relative} must be a path "
                    "inside the recipe's directory"
                )
            source = recipe_path.parent / relative
            if not source.is_file():
                raise NotFound(f"recipe {recipe_path}: training.deepspeed file {source} not found")
            (staging / "recipe" / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, staging / "recipe" / relative)
            extra.append(relative.as_posix())
        if init_from_config:
            _materialize(recipe_path, staging / "base")
            base_dir = staging / "base"
        else:
            assert base_model is not None
            base_dir = base_model
        digest, files = directory_digest(base_dir)
        size = sum((base_dir / name).stat().st_size for name in files)
        served = init_from_config or size <= SERVE_BASE_LIMIT
        if served and not init_from_config:
            shutil.copytree(base_dir, staging / "base")
        for name in ("recipe", "base"):
            target = state.root / name
            if target.exists():
                shutil.rmtree(target)
            if (staging / name).exists():
                (staging / name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    store.remove_artifacts("recipe/")
    store.remove_artifacts("base/")
    register_artifact(state, store, "recipe/recipe.yaml", state.root / "recipe" / "recipe.yaml")
    for relative_name in extra:
        register_artifact(
            state, store, f"recipe/{relative_name}", state.root / "recipe" / relative_name
        )
    if served:
        for name in sorted(files):
            register_artifact(state, store, f"base/{name}", state.root / "base" / name)
    description = RecipeDescription(
        name=recipe.name,
        sha256=recipe_sha256,
        artifact="recipe/recipe.yaml",
        base_model=BaseModelDescription(digest=digest, served=served, files=len(files), bytes=size),
    )
    store.set_meta(RECIPE_META, description.canonical(), audit=audit.recipe_set_event)
    return description
