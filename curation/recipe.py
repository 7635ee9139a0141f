"""Recipes: one YAML file says what to read, how each stage behaves and what to write.

Validated by pydantic; any mistake is reported as one line naming the bad key, e.g.
``recipes/demo.yaml: sources[1].filters.boilerplate.enabeld: unknown key``.
Relative paths in a recipe resolve against the recipe file's folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from curation.dedup import DedupConfig
from curation.filters import FilterConfig
from curation.ingest import SourceConfig
from curation.normalize import NormalizeConfig
from curation.outputs import OutputConfig
from curation.score import ScoreConfig
from curation.select import SelectConfig
from curation.semantic_dedup import SemanticDedupConfig

Use = Literal["sft", "preference", "prompts"]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line for people."""


class RecipeSource(SourceConfig):
    use_for: list[Use] = Field(["sft", "preference", "prompts"],
                               description="outputs this source may contribute rows to")
    filters: dict[str, Any] = Field(default_factory=dict,
                                    description="overrides merged over the recipe's filters for this source only")
    license: str | None = Field(None, description="license of the source data, for the dataset card")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="short name of the dataset this recipe builds")
    description: str = ""
    sources: list[RecipeSource] = Field(min_length=1)
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    semantic_dedup: SemanticDedupConfig = SemanticDedupConfig()
    score: ScoreConfig | None = Field(None, description="scorer; omit to select without scores")
    select: SelectConfig = SelectConfig()
    outputs: OutputConfig = OutputConfig()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[RecipeSource]) -> list[RecipeSource]:
        seen = set()
        for source in sources:
            if source.name in seen:
                raise ValueError(f"source name '{source.name}' is used twice; names must be unique")
            seen.add(source.name)
        return sources

    @model_validator(mode="after")
    def _score_keep_needs_a_scorer(self) -> "Recipe":
        if self.dedup.keep == "score" and self.score is None:
            raise ValueError("dedup.keep is 'score' but the recipe has no score section; add one or use keep: rule")
        return self

    def filter_config_for(self, source: RecipeSource) -> FilterConfig:
        merged = _deep_merge(self.filters.model_dump(), source.filters)
        return FilterConfig.model_validate(merged)

    def filter_overrides(self) -> dict[str, FilterConfig]:
        return {s.name: self.filter_config_for(s) for s in self.sources if s.filters}

    def sources_for(self, use: str) -> set[str]:
        return {s.name for s in self.sources if use in s.use_for}


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def _one_line(error: ValidationError, where: str, prefix: tuple = ()) -> str:
    first = error.errors()[0]
    loc = _location(prefix + tuple(first["loc"]))
    if first["type"] == "value_error" and not first["loc"] and not prefix:
        return f"{where}: {first['msg'].removeprefix('Value error, ').rstrip('.')}"
    kind = first["type"]
    if kind == "extra_forbidden":
        message = "unknown key; check its spelling against schemas/recipe.schema.json"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = first["msg"].removeprefix("Value error, ").rstrip(".")
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {loc}: {message}{suffix}"


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping with at least 'name' and 'sources'")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_one_line(error, where)) from None
    for index, source in enumerate(recipe.sources):
        if source.filters:
            try:
                recipe.filter_config_for(source)
            except ValidationError as error:
                raise RecipeError(_one_line(error, where, ("sources", index, "filters"))) from None
    return recipe


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Load and validate a recipe; returns it and the folder its relative paths resolve against."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found; pass the path of a YAML recipe, e.g. recipes/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(error, 'problem', error)}") from None
    recipe, base_dir = parse_recipe(data, str(path)), path.resolve().parent
    if recipe.score is not None and recipe.score.model.startswith(("./", "../")):
        # A model folder written beside the recipe (e.g. the embedded reward model) resolves like a source path.
        recipe.score.model = str((base_dir / recipe.score.model).resolve())
    return recipe, base_dir


def recipe_json_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Curation recipe"
    return schema


if __name__ == "__main__":
    print(json.dumps(recipe_json_schema(), indent=2))
