"""The `recipe` config group, read from the `recipes/` directory at the repository root.

Hydra looks `+recipe=NAME` up as `recipe/NAME.yaml` on its search path and, when no `recipe` group exists,
silently adds a plain string. Storing every file of `recipes/` in Hydra's ConfigStore under the group
`recipe` makes the directory the real source of the group: `+recipe=typo` then fails with Hydra's
"Could not find 'recipe/typo'" error, which lists the available recipes.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "tiny.yaml").write_text("# @package _global_\\ntask: ptq\\n")
    >>> register_recipes(folder)
    ('tiny',)
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

RECIPE_GROUP = "recipe"
PACKAGE_HEADER = "# @package "


def recipe_files(recipes_dir: str | Path) -> dict[str, Path]:
    """Recipe name -> file, for every *.yaml in `recipes_dir` (sorted by name)."""
    folder = Path(recipes_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"recipes directory not found: {folder}")
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def recipe_package(path: Path) -> str:
    """The package of a recipe file, from its `# @package X` header; recipes must be `_global_`."""
    first_line = path.read_text().splitlines()[0] if path.stat().st_size else ""
    package = first_line.removeprefix(PACKAGE_HEADER).strip() if first_line.startswith(PACKAGE_HEADER) else None
    if package != "_global_":
        raise ValueError(f"recipe {path} must start with the line '# @package _global_' (got {first_line!r})")
    return package


def register_recipes(recipes_dir: str | Path) -> tuple[str, ...]:
    """Store every recipe file of `recipes_dir` as an option of the `recipe` group; returns their names."""
    store = ConfigStore.instance()
    files = recipe_files(recipes_dir)
    for name, path in files.items():
        store.store(group=RECIPE_GROUP, name=name, node=OmegaConf.load(path), package=recipe_package(path))
    return tuple(files)
