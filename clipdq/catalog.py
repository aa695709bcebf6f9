"""Read a catalog from Parquet (local or s3://) and check it before an audit.

Schema problems and unusable keys stop the run with a clear error; per-row problems (a
missing image, an unknown value) are left for the audit to report row by row.
"""

from __future__ import annotations

import io
import logging

import polars as pl

from clipdq import storage
from clipdq.spec import Spec

log = logging.getLogger(__name__)


class CatalogError(ValueError):
    """The catalog cannot be audited as it is."""


def read_catalog(uri: str) -> pl.DataFrame:
    """The whole catalog as a polars frame."""
    try:
        source = io.BytesIO(storage.read_bytes(uri)) if storage.is_s3(uri) else uri
        return pl.read_parquet(source)
    except FileNotFoundError as error:
        raise CatalogError(f"catalog not found: {uri}") from error
    except (pl.exceptions.PolarsError, OSError) as error:
        raise CatalogError(f"catalog is not readable Parquet: {uri}: {error}") from error


def check_schema(catalog: pl.DataFrame, spec: Spec) -> list[str]:
    """Raise on columns the audit cannot do without; return warnings for the rest."""
    needed = {spec.id_column, spec.image_column} | {c for a in spec.attributes for c in a.applies_to}
    missing = sorted(needed - set(catalog.columns))
    if missing:
        raise CatalogError(f"catalog lacks required columns {missing}; it has {catalog.columns}")
    warnings = [f"catalog has no column {name!r}: every value counts as missing"
                for name in spec.names if name not in catalog.columns]
    for name in spec.names:
        if name in catalog.columns and not isinstance(catalog.schema[name], pl.String | pl.Null | pl.Categorical | pl.Enum):
            raise CatalogError(f"attribute column {name!r} must hold strings, not {catalog.schema[name]}")
    return warnings


def _expectations(spec: Spec):
    import great_expectations as gx  # slow to import: only when checking

    suite = gx.ExpectationSuite(name="catalog")
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column=spec.id_column))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeUnique(column=spec.id_column))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column=spec.image_column))
    return suite


def run_expectations(catalog: pl.DataFrame, spec: Spec) -> list[dict]:
    """Great Expectations checks on keys and images; one plain dict per expectation."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    asset = context.data_sources.add_pandas("catalog").add_dataframe_asset("catalog")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": catalog.select(spec.id_column, spec.image_column).to_pandas()}
    )
    results = []
    for result in batch.validate(_expectations(spec)).results:
        info = result.exception_info or {}
        results.append({
            "expectation": result.expectation_config.type,
            "column": result.expectation_config.kwargs.get("column"),
            "success": bool(result.success),
            "unexpected_count": result.result.get("unexpected_count"),
            "examples": [str(v) for v in (result.result.get("partial_unexpected_list") or [])[:5]],
            "error": info.get("exception_message") if info.get("raised_exception") else None,
        })
    return results


def validate(catalog: pl.DataFrame, spec: Spec) -> dict:
    """Schema and key checks. Raises CatalogError when rows cannot be told apart."""
    warnings = check_schema(catalog, spec)
    checks = run_expectations(catalog, spec)
    for check in checks:
        if check["error"]:
            raise CatalogError(f"catalog check {check['expectation']} failed to run: {check['error']}")
        if check["column"] == spec.id_column and not check["success"]:
            raise CatalogError(
                f"{check['expectation']} failed for {spec.id_column!r}: "
                f"{check['unexpected_count']} rows, e.g. {check['examples']}"
            )
    for warning in warnings:
        log.warning(warning)
    return {"rows": catalog.height, "warnings": warnings, "expectations": checks}
