"""The attribute spec: which catalog columns to audit, their vocabularies, synonyms and category trees."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml


class SpecError(ValueError):
    """The spec file is malformed."""


def normalize_value(value: str) -> str:
    """Canonical form used to compare values: lower case, single spaces, trimmed."""
    return " ".join(value.lower().split())


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]  # the vocabulary, in the order the model scores them
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)  # value -> other spellings
    applies_to: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column -> allowed values
    prompts: tuple[str, ...] = ("{}",)  # caption templates; "{}" alone is a label-only caption

    def lookup(self) -> dict[str, str]:
        """Normalized spelling (value or synonym) -> canonical vocabulary value."""
        table = {normalize_value(v): v for v in self.values}
        for value, others in self.synonyms.items():
            table.update({normalize_value(o): value for o in others})
        return table

    def captions(self, value: str) -> list[str]:
        return [template.format(value) for template in self.prompts]


@dataclass(frozen=True)
class Tree:
    """A category tree: its levels (attributes, top first) and every path from the top to a leaf.

    Each level is also an attribute of the spec, with the values of that level; a value has one
    parent, so a child implies its parents.
    """

    name: str
    levels: tuple[str, ...]  # the levels' attribute names, top level first
    paths: tuple[tuple[str, ...], ...]  # one value per level, top level first
    path_column: str | None = None  # catalog column holding whole paths, instead of a column per level
    separator: str = "/"  # between the levels of a path in ``path_column``

    def values_at(self, depth: int) -> tuple[str, ...]:
        """The values of one level, in order of first appearance in the paths."""
        return tuple(dict.fromkeys(path[depth] for path in self.paths))

    def parent_indices(self, depth: int) -> list[int]:
        """Per value of level ``depth`` (>= 1), the index of its parent among the level above's values."""
        parent = {path[depth]: path[depth - 1] for path in self.paths}
        above = {v: i for i, v in enumerate(self.values_at(depth - 1))}
        return [above[parent[v]] for v in self.values_at(depth)]

    def path_indices(self) -> list[list[int]]:
        """Per path, the index of its value in each level's values."""
        index = [{v: i for i, v in enumerate(self.values_at(d))} for d in range(len(self.levels))]
        return [[index[d][v] for d, v in enumerate(path)] for path in self.paths]


@dataclass(frozen=True)
class Spec:
    attributes: tuple[Attribute, ...]  # a tree's levels among them
    id_column: str = "product_id"
    image_column: str = "image"
    target_precision: float = 0.9  # flags should be right at least this often
    expected_error_rate: float = 0.1  # prior share of wrong catalog values, sets the conflict bar
    image_roots: tuple[str, ...] = ()  # folders and s3:// prefixes outside the catalog's own that images may come from
    allow_image_urls: bool = False  # fetch http(s) image references (global addresses only)
    max_transient_image_errors: float = 0.05  # share of images lost to outages beyond which a run fails
    duplicate_similarity: float | None = 0.99  # images this alike under two ids are duplicate listings; None: off
    trees: tuple[Tree, ...] = ()  # category trees, whose levels are attributes
    text_column: str | None = None  # catalog column of titles or descriptions, checked against the image
    text_category: str | None = None  # catalog column whose groups judge agreement (typical for the category)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def attribute(self, name: str) -> Attribute:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise KeyError(name)

    @property
    def value_columns(self) -> list[str]:
        """The catalog columns that hold attribute values: a column per attribute, except where a
        tree keeps its paths in one column."""
        by_path = {level: tree.path_column for tree in self.trees if tree.path_column for level in tree.levels}
        return list(dict.fromkeys(by_path.get(name, name) for name in self.names))

    def tree_of(self, name: str) -> Tree | None:
        return next((tree for tree in self.trees if name in tree.levels), None)

    def fingerprint(self) -> str:
        """Hash of what a model depends on: attribute names, values and prompts, and the trees' paths."""
        payload: list = [[a.name, list(a.values), list(a.prompts)] for a in self.attributes]
        if self.trees:
            payload.append([[t.name, list(t.levels), [list(p) for p in t.paths]] for t in self.trees])
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise SpecError(f"{where} must be a list of strings, got {raw!r}")
    return tuple(raw)


def _mapping(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping, got {raw!r}")
    return {str(k): _strings(v, f"{where}.{k}") for k, v in raw.items()}


def _number(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise SpecError(f"{where} must be a number, got {raw!r}")
    return float(raw)


def _flag(raw: Any, where: str) -> bool:
    if not isinstance(raw, bool):
        raise SpecError(f"{where} must be true or false, got {raw!r}")
    return raw


def _share(raw: Any, where: str) -> float:
    share = _number(raw, where)
    if not 0.0 <= share <= 1.0:
        raise SpecError(f"{where} must be a share between 0 and 1, got {share}")
    return share


def _optional_name(raw: Any, where: str) -> str | None:
    if raw is not None and (not isinstance(raw, str) or not raw.strip()):
        raise SpecError(f"{where} must name a catalog column, got {raw!r}")
    return raw


def _optional_share(raw: Any, where: str) -> float | None:
    return None if raw is None else _share(raw, where)


def _attribute(name: str, raw: Any, values: tuple[str, ...] | None = None) -> Attribute:
    """An attribute from its spec entry; ``values`` where a tree gives them (one of its levels)."""
    if values is None:
        if not isinstance(raw, dict) or "values" not in raw:
            raise SpecError(f"attribute {name!r} needs a 'values' list (or 'levels' and 'paths': a tree)")
        values = _strings(raw["values"], f"attributes.{name}.values")
    if len(values) < 2 or len({normalize_value(v) for v in values}) != len(values):
        raise SpecError(f"attributes.{name}.values needs at least two distinct values")
    synonyms = {
        value: others
        for value, others in _mapping(raw.get("synonyms"), f"attributes.{name}.synonyms").items()
        if value in values or "levels" not in raw
    }  # a tree's synonyms serve whichever level has the value
    unknown = set(synonyms) - set(values)
    if unknown:
        raise SpecError(f"attributes.{name}.synonyms names values not in its vocabulary: {sorted(unknown)}")
    applies_to = _mapping(raw.get("applies_to"), f"attributes.{name}.applies_to")
    prompts = _strings(raw.get("prompts", ["{}"]), f"attributes.{name}.prompts")
    if not all(p.count("{}") == 1 and p.count("{") == 1 for p in prompts):
        raise SpecError(f"attributes.{name}.prompts must each contain '{{}}' exactly once and no other braces")
    return Attribute(name, values, synonyms, applies_to, prompts)


def _tree(name: str, raw: dict) -> Tree:
    """A tree from an attribute entry with ``levels`` and ``paths`` (and optionally ``path_column``)."""
    where = f"attributes.{name}"
    levels = _strings(raw["levels"], f"{where}.levels")
    if len(levels) < 2 or len(set(levels)) != len(levels):
        raise SpecError(f"{where}.levels needs at least two distinct level names, top level first")
    separator = str(raw.get("separator", "/"))
    paths = tuple(
        tuple(part.strip() for part in path.split(separator))
        for path in _strings(raw.get("paths", []), f"{where}.paths")
    )
    for path in paths:
        if len(path) != len(levels) or not all(path):
            raise SpecError(
                f"{where}.paths: {separator.join(path)!r} does not name one value for each of {list(levels)}"
            )
    if len(set(paths)) != len(paths):
        raise SpecError(f"{where}.paths lists a path twice")
    tree = Tree(name, levels, paths, raw.get("path_column"), separator)
    for depth in range(1, len(levels)):
        for value in tree.values_at(depth):
            under = {path[depth - 1] for path in paths if path[depth] == value}
            if len(under) > 1:
                raise SpecError(
                    f"{where}: {levels[depth]} value {value!r} sits under several {levels[depth - 1]} "
                    f"values {sorted(under)}; a value needs one parent (name them apart)"
                )
    return tree


def _attributes(raw: dict) -> tuple[tuple[Attribute, ...], tuple[Tree, ...]]:
    """The spec's attributes, each tree expanded into its levels, and the trees."""
    attributes, trees = [], []
    for name, entry in raw.items():
        if isinstance(entry, dict) and "levels" in entry:
            tree = _tree(str(name), entry)
            trees.append(tree)
            attributes += [_attribute(level, entry, tree.values_at(d)) for d, level in enumerate(tree.levels)]
        else:
            attributes.append(_attribute(str(name), entry))
    names = [a.name for a in attributes]
    if len(set(names)) != len(names):
        raise SpecError(f"attribute names must be distinct, a tree's levels included: {names}")
    return tuple(attributes), tuple(trees)


def parse_spec(text: str) -> Spec:
    """Parse spec YAML text; raises SpecError with the offending key on bad input."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"spec is not valid YAML: {error}") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("attributes"), dict) or not raw["attributes"]:
        raise SpecError("spec needs an 'attributes' mapping with at least one attribute")
    target = _number(raw.get("target_precision", 0.9), "target_precision")
    if not 0.5 <= target < 1.0:
        raise SpecError(f"target_precision must be in [0.5, 1), got {target}")
    attributes, trees = _attributes(raw["attributes"])
    if raw.get("text_category") is not None and raw.get("text_column") is None:
        raise SpecError("text_category needs text_column: the column of titles whose agreement it groups")
    return Spec(
        attributes=attributes,
        trees=trees,
        id_column=str(raw.get("id_column", "product_id")),
        image_column=str(raw.get("image_column", "image")),
        target_precision=target,
        expected_error_rate=_number(raw.get("expected_error_rate", 0.1), "expected_error_rate"),
        image_roots=_strings(raw.get("image_roots", []), "image_roots"),
        allow_image_urls=_flag(raw.get("allow_image_urls", False), "allow_image_urls"),
        max_transient_image_errors=_share(raw.get("max_transient_image_errors", 0.05), "max_transient_image_errors"),
        duplicate_similarity=_optional_share(raw.get("duplicate_similarity", 0.99), "duplicate_similarity"),
        text_column=_optional_name(raw.get("text_column"), "text_column"),
        text_category=_optional_name(raw.get("text_category"), "text_category"),
    )
