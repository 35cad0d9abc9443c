"""Every shipped recipe names only things that exist: manifests, suites, model, build inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT, require_shared  # tests/ is on sys.path under pytest

from medclip.data.manifest import load_manifest
from medclip.evaluation.suites import load_suite
from medclip.models.loading import resolve_config
from medclip.training.config import load_recipe

RECIPES = sorted(p.stem for p in (REPO_ROOT / "pretrain").glob("*.yaml"))


def test_the_four_flagship_recipes_are_shipped():
    assert {"demo", "shared_real", "unimed_vitb16", "medconcept_siglip"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_name_a_shipped_recipe_uses_resolves(name, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes name repository paths relative to the repository root
    recipe = load_recipe(Path("pretrain") / f"{name}.yaml")
    assert resolve_config(recipe.model.name)["embed_dim"] > 0
    for source in recipe.data.sources:
        manifest = load_manifest(source.manifest, root=source.root)  # raises "manifest not found: ..."
        assert manifest.urls and manifest.caption_fields
    for spec in recipe.data.build:
        if spec.input.startswith("../shared/data"):
            require_shared(*Path(spec.input).parts[3:])
        assert Path(spec.input).is_file(), spec.input
        for vocab in spec.vocab:
            assert Path(vocab).exists(), vocab
    for suite in recipe.eval.suites:
        assert load_suite(suite).datasets
