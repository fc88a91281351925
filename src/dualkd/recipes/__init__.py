"""Recipes shipped inside the package (so `dualkd demo` works from any install). `configs/` links to them."""

from pathlib import Path

RECIPES = Path(__file__).parent


def recipe(name: str) -> Path:
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {name!r}; available: {sorted(p.stem for p in RECIPES.glob('*.yaml'))}")
    return path
