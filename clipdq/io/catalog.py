"""Read a catalog from Parquet (local or s3://), whole or in batches of rows, and check it before an audit.

Schema problems and unusable keys stop the run with a clear error; per-row problems (a
missing image, an unknown value) are left for the audit to report row by row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from clipdq.core.spec import Spec
from clipdq.io import storage

log = logging.getLogger(__name__)


TEXT = pl.String | pl.Null | pl.Categorical | pl.Enum  # column types that hold values as text


class CatalogError(ValueError):
    """The catalog cannot be audited as it is."""


class CatalogFile:
    """A Parquet catalog opened for reading: schema and row count at once, rows in batches, so an
    audit holds one batch of rows at a time (plus one row group inside the Parquet reader)."""

    def __init__(self, uri: str, *, version: str | None = None):
        """``version`` (of an earlier open) makes a file that changed since then a CatalogError."""
        self.uri = uri
        try:
            stream, self.version = storage.open_read(uri, expected=version)
            self._parquet = pq.ParquetFile(stream, pre_buffer=False)  # row groups as they are read
        except storage.StorageError as error:
            raise CatalogError(str(error)) from error
        except FileNotFoundError as error:
            raise CatalogError(f"catalog not found: {uri}") from error
        except (pa.ArrowException, OSError) as error:
            raise CatalogError(f"catalog is not readable Parquet: {uri}: {error}") from error
        self.row_count = self._parquet.metadata.num_rows
        # (``Schema.empty_table`` would import pandas: half a second of a small rerun)
        self.schema = pl.DataFrame(pa.Table.from_batches([], schema=self._parquet.schema_arrow)).schema
        meta = self._parquet.metadata
        self.group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    def batches(self, size: int, columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
        return self._rows(self._parquet.iter_batches(batch_size=size, columns=columns))

    def batches_between(self, start: int, stop: int, size: int) -> Iterator[pl.DataFrame]:
        """Rows ``start`` to ``stop`` (exclusive) in batches of at most ``size``, reading only the
        row groups that hold them."""
        first_row, groups = 0, []
        for group, rows in enumerate(self.group_rows):
            if first_row < stop and first_row + rows > start:
                groups.append(group)
            elif not groups:
                first_row += rows
        rows = self._rows(self._parquet.iter_batches(batch_size=size, row_groups=groups))
        for offset, batch in _offsets(rows, first_row):
            lo, hi = max(0, start - offset), min(batch.height, stop - offset)
            if hi > lo:
                yield batch.slice(lo, hi - lo)

    def _rows(self, arrow_batches) -> Iterator[pl.DataFrame]:
        try:
            for batch in arrow_batches:
                yield pl.DataFrame(batch)
        except storage.StorageError as error:  # the object changed under the reader
            raise CatalogError(str(error)) from error
        except (pa.ArrowException, OSError) as error:
            raise CatalogError(f"catalog is not readable Parquet: {self.uri}: {error}") from error

    def rows_where(self, column: str, values: pl.Series, columns: list[str]) -> pl.DataFrame:
        """``column`` (as text) and ``columns`` of the rows whose ``column`` is one of ``values``,
        read batch by batch: memory holds one batch, not the column."""
        key = pl.col(column).cast(pl.String)
        wanted = values.cast(pl.String).implode()
        parts = [
            batch.select(key, *columns).filter(key.is_in(wanted)) for batch in self.batches(1 << 16, [column, *columns])
        ]
        return pl.concat(parts) if parts else pl.DataFrame(schema={column: pl.String})

    def read(self, columns: list[str] | None = None) -> pl.DataFrame:
        """All rows of ``columns`` (default all) at once."""
        parts = list(self.batches(1 << 16, columns))
        if not parts:
            return pl.DataFrame(schema={name: self.schema[name] for name in columns or self.schema.names()})
        return pl.concat(parts)


def _offsets(batches: Iterator[pl.DataFrame], first_row: int) -> Iterator[tuple[int, pl.DataFrame]]:
    """(row number of its first row, batch) for consecutive batches starting at ``first_row``."""
    for batch in batches:
        yield first_row, batch
        first_row += batch.height


def read_catalog(uri: str) -> pl.DataFrame:
    """The whole catalog as a polars frame."""
    return CatalogFile(uri).read()


def check_schema(schema: pl.Schema, spec: Spec) -> list[str]:
    """Raise on columns the audit cannot do without; return warnings for the rest."""
    check_id_and_image(schema, spec)
    applies_to = {column for a in spec.attributes for column in a.applies_to}
    missing = sorted(applies_to - set(schema.names()))
    if missing:
        raise CatalogError(f"catalog lacks required columns {missing}; it has {schema.names()}")
    warnings = [
        f"catalog has no column {name!r}: every value counts as missing"
        for name in spec.value_columns
        if name not in schema
    ]
    text = [name for name in (spec.text_column, spec.text_category) if name]
    warnings += [
        f"catalog has no text column {name!r}: image and text agreement is judged without it"
        for name in text
        if name not in schema
    ]
    for kind, names in (
        ("attribute", [n for n in spec.value_columns if n in schema]),
        ("applies_to", sorted(applies_to)),
        ("text", [n for n in text if n in schema]),
    ):
        for name in names:
            if not isinstance(schema[name], TEXT):
                raise CatalogError(f"{kind} column {name!r} must hold strings, not {schema[name]}")
    return warnings


def check_id_and_image(schema: pl.Schema, spec: Spec) -> None:
    """Raise unless the spec's id and image columns exist and hold what they should."""
    missing = [name for name in (spec.id_column, spec.image_column) if name not in schema]
    if missing:
        raise CatalogError(f"catalog lacks required columns {missing}; it has {schema.names()}")
    id_type, image_type = schema[spec.id_column], schema[spec.image_column]
    if not (isinstance(id_type, TEXT) or id_type.is_integer()):
        raise CatalogError(f"id column {spec.id_column!r} must hold strings or integers, not {id_type}")
    if not isinstance(image_type, TEXT | pl.Binary):
        raise CatalogError(f"image column {spec.image_column!r} must hold paths, URIs or image bytes, not {image_type}")


def _expectations(spec: Spec):
    import great_expectations as gx  # slow to import: only when checking

    suite = gx.ExpectationSuite(name="catalog")
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column=spec.id_column))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeUnique(column=spec.id_column))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column=spec.image_column))
    return suite


def run_expectations(keys: pl.DataFrame, spec: Spec) -> tuple[list[dict], dict]:
    """Great Expectations checks on keys and images: one plain dict per expectation, and the
    library's own validation result as JSON.

    ``keys`` holds the id and image columns, or their ``_stand_ins``.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("catalog").add_dataframe_asset("catalog")
    frame = keys.select(spec.id_column, spec.image_column).to_pandas(use_pyarrow_extension_array=True)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    validation = batch.validate(_expectations(spec))
    results = []
    for result in validation.results:
        info = result.exception_info or {}
        results.append(
            {
                "expectation": result.expectation_config.type,
                "column": result.expectation_config.kwargs.get("column"),
                "success": bool(result.success),
                "unexpected_count": result.result.get("unexpected_count"),
                "examples": [str(v) for v in (result.result.get("partial_unexpected_list") or [])[:5]],
                "error": info.get("exception_message") if info.get("raised_exception") else None,
            }
        )
    return results, validation.to_json_dict()


KEY_BATCH = 1 << 16  # rows per batch while the keys are checked


def validate(catalog: pl.DataFrame, spec: Spec) -> dict:
    """Schema and key checks. Raises CatalogError when rows cannot be told apart."""
    warnings = check_schema(catalog.schema, spec)
    key_batches = lambda: catalog.select(spec.id_column, spec.image_column).iter_slices(KEY_BATCH)  # noqa: E731
    return _validated(_stand_ins(key_batches(), spec), key_batches, spec, warnings)


def validate_file(source: CatalogFile, spec: Spec, *, cache: str | None = None) -> dict:
    """The validation of a catalog file, which reads its id and image columns batch by batch and
    keeps 9 bytes a row of them (``_stand_ins``).

    With ``cache`` (a folder or prefix), keys that passed before are not checked by
    great_expectations again: the earlier result is reused (``"reused": true``), which saves the
    library's import and run on an unchanged nightly catalog.
    """
    warnings = check_schema(source.schema, spec)
    key_batches = lambda: source.batches(KEY_BATCH, [spec.id_column, spec.image_column])  # noqa: E731
    stand_ins = _stand_ins(key_batches(), spec)
    kept = storage.join(cache, f"{_validation_key(stand_ins, spec)}.json") if cache else None
    if kept and storage.exists(kept):
        validation = json.loads(storage.read_bytes(kept)) | {"reused": True}
        for warning in validation["warnings"]:
            log.warning(warning)
        return validation
    validation = _validated(stand_ins, key_batches, spec, warnings)
    if kept:
        storage.write_bytes(kept, json.dumps(validation).encode())
    return validation


CHECKS_VERSION = 3  # raise when the checks change, so results of the old ones are not reused


def _validation_key(stand_ins: pl.DataFrame, spec: Spec) -> str:
    """Changes with anything the checks look at: the ids, which images are missing, the column names."""
    content = hashlib.sha256(stand_ins.hash_rows(seed=0).to_numpy().tobytes()).hexdigest()
    payload = [CHECKS_VERSION, pl.__version__, spec.id_column, spec.image_column, stand_ins.height, content]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _stand_ins(key_batches: Iterator[pl.DataFrame], spec: Spec) -> pl.DataFrame:
    """What the key checks look at, in 9 bytes a row: a 64-bit hash of each id and whether each
    image is given, null where the id or the image is."""
    ids, images = pl.col(spec.id_column), pl.col(spec.image_column)
    parts = [
        batch.select(
            pl.when(ids.is_not_null()).then(ids.hash(seed=0)).alias(spec.id_column),
            pl.when(images.is_not_null()).then(True).alias(spec.image_column),
        )
        for batch in key_batches
    ]
    schema = {spec.id_column: pl.UInt64, spec.image_column: pl.Boolean}
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def _duplicate_ids(key_batches: Iterator[pl.DataFrame], stand_ins: pl.DataFrame, spec: Spec) -> pl.Series:
    """The ids of the rows whose id hash is shared: ids that truly repeat, unless hashes collided."""
    id_hash = stand_ins[spec.id_column]
    shared = id_hash.filter(id_hash.is_duplicated() & id_hash.is_not_null()).unique().implode()
    ids = pl.col(spec.id_column)
    suspects = pl.concat([batch.select(ids).filter(ids.hash(seed=0).is_in(shared)) for batch in key_batches])
    return suspects[spec.id_column].filter(suspects[spec.id_column].is_duplicated())


def _validated(
    stand_ins: pl.DataFrame, key_batches: Callable[[], Iterator[pl.DataFrame]], spec: Spec, warnings: list[str]
) -> dict:
    """Checks on the keys' ``stand_ins``; ``key_batches()`` reads the keys again to name ids that repeat."""
    checks, raw = run_expectations(stand_ins, spec)
    for check in checks:
        if check["error"]:
            raise CatalogError(f"catalog check {check['expectation']} failed to run: {check['error']}")
        if check["expectation"] == "expect_column_values_to_be_unique" and not check["success"]:
            repeated = _duplicate_ids(key_batches(), stand_ins, spec)  # the ids themselves, not their hashes
            check |= {
                "success": repeated.is_empty(),
                "unexpected_count": repeated.len(),
                "examples": [str(v) for v in repeated.head(5)],
            }
        if check["column"] == spec.id_column and not check["success"]:
            raise CatalogError(
                f"{check['expectation']} failed for {spec.id_column!r}: "
                f"{check['unexpected_count']} rows, e.g. {check['examples']}"
            )
    for warning in warnings:
        log.warning(warning)
    # great_expectations saw the stand-ins: its own result counts rows as ours does, but shows hashes, not ids
    return {"rows": stand_ins.height, "warnings": warnings, "expectations": checks, "great_expectations": raw}
