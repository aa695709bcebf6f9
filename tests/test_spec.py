"""The attribute spec: parsing, validation messages and value lookup."""

from __future__ import annotations

import textwrap

import pytest

from clipdq.core.spec import Attribute, SpecError, normalize_value, parse_spec

GOOD_SPEC = """\
id_column: sku
image_column: picture
target_precision: 0.95
expected_error_rate: 0.05
attributes:
  color:
    values: [red, blue, green]
    synonyms: {red: [rood, Crimson], blue: [navy]}
    prompts: ["a photo of a {} product", "{}"]
  has_lid:
    values: ["lid", "no lid"]
    applies_to: {product_type: [cookware]}
"""


def spec_with(attribute_yaml: str, *, header: str = "") -> str:
    """A spec with one attribute ``a`` whose body is ``attribute_yaml``."""
    body = textwrap.indent(textwrap.dedent(attribute_yaml), "    ")
    return f"{header}attributes:\n  a:\n{body}"


def test_good_spec_parses_into_typed_objects():
    spec = parse_spec(GOOD_SPEC)

    assert spec.id_column == "sku"
    assert spec.image_column == "picture"
    assert spec.target_precision == 0.95
    assert spec.expected_error_rate == 0.05
    assert spec.names == ["color", "has_lid"]
    color = spec.attribute("color")
    assert color.values == ("red", "blue", "green")
    assert color.synonyms == {"red": ("rood", "Crimson"), "blue": ("navy",)}
    assert color.captions("red") == ["a photo of a red product", "red"]
    has_lid = spec.attribute("has_lid")
    assert has_lid.applies_to == {"product_type": ("cookware",)}
    assert has_lid.prompts == ("{}",)  # default: label-only caption
    with pytest.raises(KeyError):
        spec.attribute("size")


def test_defaults_when_optional_keys_are_absent():
    spec = parse_spec(spec_with("values: [x, y]\n"))

    assert (spec.id_column, spec.image_column) == ("product_id", "image")
    assert spec.target_precision == 0.9


def test_fingerprint_changes_with_vocabulary_but_not_with_synonyms():
    base = parse_spec(spec_with("values: [x, y]\n"))
    synonyms_added = parse_spec(spec_with("values: [x, y]\nsynonyms: {x: [ex]}\n"))
    value_added = parse_spec(spec_with("values: [x, y, z]\n"))

    assert base.fingerprint() == synonyms_added.fingerprint()
    assert base.fingerprint() != value_added.fingerprint()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("id_column: sku\n", "at least one attribute", id="no-attributes-key"),
        pytest.param("attributes: {}\n", "at least one attribute", id="empty-attributes"),
        pytest.param("- just\n- a list\n", "at least one attribute", id="not-a-mapping"),
        pytest.param(
            spec_with("values: [only]\n"), "attributes.a.values needs at least two distinct values", id="one-value"
        ),
        pytest.param(
            spec_with("values: [Red, ' red ']\n"),
            "attributes.a.values needs at least two distinct values",
            id="duplicate-values",
        ),
        pytest.param(spec_with("prompts: ['{}']\n"), "attribute 'a' needs a 'values' list", id="no-values"),
        pytest.param(
            spec_with("values: [x, 3]\n"), "attributes.a.values must be a list of strings", id="non-string-value"
        ),
        pytest.param(
            spec_with("values: [x, y]\nsynonyms: {z: [zed]}\n"),
            "attributes.a.synonyms names values not in its vocabulary: ['z']",
            id="synonym-of-unknown-value",
        ),
        pytest.param(
            spec_with("values: [x, y]\nprompts: ['a photo']\n"),
            "attributes.a.prompts must each contain '{}'",
            id="prompt-without-slot",
        ),
        pytest.param(
            spec_with("values: [x, y]\nprompts: [3]\n"),
            "attributes.a.prompts must be a list of strings",
            id="prompt-not-string",
        ),
        pytest.param("attributes: [unclosed\n", "not valid YAML", id="bad-yaml"),
        pytest.param(
            spec_with("values: [x, y]\n", header="target_precision: 1.0\n"), "target_precision", id="target-1"
        ),
        pytest.param(
            spec_with("values: [x, y]\n", header="target_precision: 0.3\n"), "target_precision", id="target-low"
        ),
        pytest.param(
            spec_with("values: [x, y]\nprompts: ['{} and {}']\n"),
            "attributes.a.prompts",
            id="prompt-with-two-slots",
        ),
        pytest.param(
            spec_with("values: [x, y]\n", header="target_precision: high\n"),
            "target_precision",
            id="target-not-a-number",
        ),
        pytest.param(
            spec_with("values: [x, y]\nsynonyms: [ex]\n"),
            "attributes.a.synonyms",
            id="synonyms-not-a-mapping",
        ),
    ],
)
def test_malformed_spec_raises_spec_error_naming_the_problem(text, message):
    with pytest.raises(SpecError) as raised:
        parse_spec(text)
    assert message in str(raised.value)


def test_lookup_maps_values_synonyms_case_and_whitespace_to_canonical():
    attribute = Attribute("neckline", ("crew neck", "V-Neck"), synonyms={"crew neck": ("round", "Crew  Collar")})
    lookup = attribute.lookup()

    for spelling, canonical in [
        ("crew neck", "crew neck"),
        ("  CREW   neck ", "crew neck"),
        ("Round", "crew neck"),
        ("crew collar", "crew neck"),
        ("v-neck", "V-Neck"),
        ("\tV-NECK\n", "V-Neck"),
    ]:
        assert lookup[normalize_value(spelling)] == canonical, spelling
    assert normalize_value("turtleneck") not in lookup
    assert set(lookup.values()) == {"crew neck", "V-Neck"}
