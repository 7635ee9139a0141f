"""Recipes: the shipped ones validate, mistakes give one line naming the bad key."""

from pathlib import Path

import pytest
import yaml

from curation.recipe import RecipeError, load_recipe, parse_recipe, recipe_json_schema

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["demo.yaml", "shared.yaml"])
def test_shipped_recipes_validate_and_point_at_real_files(name):
    recipe, base_dir = load_recipe(ROOT / "recipes" / name)
    for source in recipe.sources:
        assert (base_dir / source.path).exists(), f"{name}: source {source.name} path {source.path} is missing"


def _minimal(**extra):
    return {"name": "t", "sources": [{"name": "a", "path": "a.jsonl"}], **extra}


@pytest.mark.parametrize("data, expected", [
    (_minimal(dedupe={}), "recipe: dedupe: unknown key"),
    ({"sources": [{"name": "a", "path": "a.jsonl"}]}, "recipe: name: required key is missing"),
    (_minimal(sources=[{"name": "a", "path": "a", "formt": "alpaca"}]), "recipe: sources[0].formt: unknown key"),
    (_minimal(dedup={"near": {"threshold": "high"}}), "recipe: dedup.near.threshold:"),
    (_minimal(sources=[{"name": "a", "path": "a", "filters": {"boilerplate": {"enabeld": False}}}]),
     "recipe: sources[0].filters.boilerplate.enabeld: unknown key"),
    (_minimal(sources=[{"name": "a", "path": "a"}, {"name": "a", "path": "b"}]), "used twice"),
])
def test_errors_are_one_line_and_name_the_key(data, expected):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsources:\n  - name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line \d+"):
        load_recipe(path)


def test_missing_recipe_file_says_what_to_do(tmp_path):
    with pytest.raises(RecipeError, match="pass the path of a YAML recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_source_filter_override_merges_over_recipe_filters():
    recipe = parse_recipe(_minimal(sources=[{"name": "hh", "path": "x", "filters": {"boilerplate": {"enabled": False}}},
                                            {"name": "b", "path": "y"}]))
    overrides = recipe.filter_overrides()
    assert set(overrides) == {"hh"}
    assert overrides["hh"].boilerplate.enabled is False
    assert overrides["hh"].language == recipe.filters.language


def test_json_schema_export_matches_shipped_file():
    shipped = yaml.safe_load((ROOT / "schemas" / "recipe.schema.json").read_text())
    assert shipped == recipe_json_schema(), "schemas/recipe.schema.json is stale: run `make schemas`"


def test_score_keep_policy_needs_a_scorer():
    with pytest.raises(RecipeError, match="dedup.keep is 'score' but the recipe has no score section"):
        parse_recipe(_minimal(dedup={"keep": "score"}))


def test_readme_recipe_example_is_valid():
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml")[1:]]
    example = next(yaml.safe_load(b) for b in blocks if "name: my-dataset" in b)
    assert parse_recipe(example, "README.md").name == "my-dataset"
