"""Product matching wired together: each catalog's images embedded through the audit's own loop
(confined fetches, safe decoding, the embedding cache), and the references' attribute values read
through the one value encoder (synonyms, normalisation and tree paths as an audit reads them).

Vocabulary as in ``clipdq.checks.match``: ``references`` are the catalog's products, ``queries``
the photos matched with them; ``labels`` per attribute are each reference's value index
(``values.labels``), -1 where it has none the vocabulary knows.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from clipdq.checks import duplicates, match
from clipdq.checks.match import Embedded
from clipdq.checks.neighbours import ValueAgreement
from clipdq.core import values
from clipdq.core.options import MatchOptions
from clipdq.core.spec import Spec
from clipdq.io import catalog, storage
from clipdq.io.cache import EmbeddingCache
from clipdq.io.images import SIGNATURE_BYTES
from clipdq.io.sources import ImageAccess
from clipdq.model import scorer as scorers
from clipdq.model.scorer import Scorer
from clipdq.pipeline.embedding import Tally, embedded_batches


def embed_catalog(
    source: catalog.CatalogFile,
    *,
    scorer: Scorer,
    access: ImageAccess,
    cache: EmbeddingCache | None = None,
    batch_size: int = 64,
    role: str = "images",
) -> Embedded:
    """Every row of ``source`` embedded (or taken from ``cache``), one batch of pixels at a time;
    progress is logged as ``role``. An outage does not stop matching: its images are errors."""
    spec, out, filled = scorer.spec, Embedded(), 0
    catalog.check_id_and_image(source.schema, spec)
    tally = Tally(source.row_count, max_transient=1.0, what=role, keep_images=False)
    kept: np.ndarray | None = None
    signatures = np.zeros((0, SIGNATURE_BYTES), np.uint8)
    for batch, embeddings in embedded_batches(
        source.batches(batch_size, [spec.id_column, spec.image_column]), scorer=scorer, access=access, cache=cache
    ):
        if kept is None:  # one array for the catalog, filled in place: no second copy of a million rows
            kept = np.empty((source.row_count, embeddings.shape[1]), np.float32)
            signatures = np.empty((source.row_count, SIGNATURE_BYTES), np.uint8)
        kept[filled : filled + len(embeddings)] = embeddings
        usable = b"".join(sig for sig in batch.signatures if sig is not None)
        signatures[filled : filled + len(embeddings)] = np.frombuffer(usable, np.uint8).reshape(-1, SIGNATURE_BYTES)
        filled += len(embeddings)
        out.ids += batch.rows[spec.id_column].cast(pl.String).to_list()
        image = batch.rows[spec.image_column]
        out.images += image.cast(pl.String).to_list() if image.dtype != pl.Binary else [None] * len(image)
        out.sha256 += batch.sha256
        out.errors += batch.errors
        tally.add(batch, spec)
    if cache is not None:
        cache.flush()
    out.counts = tally.counts
    out.embeddings = kept[:filled] if kept is not None else np.zeros((0, 0), np.float32)
    out.signatures = signatures[:filled]
    return out


def reference_labels(source: catalog.CatalogFile, spec: Spec, usable: np.ndarray) -> dict[str, np.ndarray]:
    """Per attribute, each reference's value index (``values.labels``) where ``usable`` (the rows
    of ``Embedded.ok``: those with an embedding), read only where matching asks for them."""
    rows = source.read([spec.id_column, *(name for name in spec.value_columns if name in source.schema)])
    return {name: labels[usable] for name, labels in values.labels(rows, spec).items()}


def value_agreement(scorer: Scorer, labels: dict[str, np.ndarray], *, weight: float) -> ValueAgreement | None:
    """The agreement of the references' ``labels`` (``reference_labels``) with what the scorer's
    model reads in the queries; None where the model was not fine-tuned on the spec (its value
    predictions would be noise) or ``weight`` is 0."""
    names = scorer.spec.names
    if not scorer.trained or not weight or not names:
        return None
    return ValueAgreement(
        names,
        [scorer.value_emb[n] for n in names],
        [scorer.scale / scorer.calibration[n].temperature for n in names],
        [labels[n] for n in names],
        weight,
        scorer.spec.expected_error_rate,
    )


DEFAULT_ATTRIBUTE_WEIGHT = 1.0  # measured on Grocery shelf photos against studio images (docs/benchmarks.md)


def agreement_for(
    source: catalog.CatalogFile,
    references: Embedded,
    spec: Spec,
    *,
    model_uri: str,
    text_folder: str | None,
    weight: float | None,
) -> tuple[ValueAgreement | None, str]:
    """(the score's second term for the references of ``source`` (``value_agreement``), why it
    holds what it holds). ``weight`` None: DEFAULT_ATTRIBUTE_WEIGHT where the references carry any
    of the spec's attribute columns, else none."""
    carried = [name for name in spec.value_columns if name in source.schema]
    if weight is None:
        weight = DEFAULT_ATTRIBUTE_WEIGHT if carried else 0.0
        why = f"the references carry {', '.join(carried)}" if carried else "the references carry no attribute column"
    else:
        why = "attribute_weight as given"
    if not weight:
        return None, why
    reading = scorers.of_files(model_uri, spec, text_folder=text_folder)
    agreement = value_agreement(reading, reference_labels(source, spec, references.ok), weight=weight)
    return agreement, why if agreement is not None else "the model was not fine-tuned on the spec"


def ranked(
    references: Embedded,
    queries: Embedded,
    spec: Spec,
    *,
    options: MatchOptions,
    agreement: ValueAgreement | None,
    cache: str | None,
) -> tuple[pl.DataFrame, dict]:
    """(matches, what the summary says of them): ``options.k`` references per query
    (``match.match_embedded``, the approximate index kept under ``cache``); where the spec asks for
    duplicate listings, the pairs whose pixels are near-identical are marked, and scored by image
    alone (a query's own photo outranks what the values say)."""
    index_folder = storage.join(cache, "approximate_index") if cache else None
    threshold = spec.duplicate_similarity

    def near_copies(query_rows: np.ndarray, reference_rows: np.ndarray) -> np.ndarray:
        return duplicates.pixel_similarity(queries, references, query_rows, reference_rows) >= threshold

    matches, found = match.match_embedded(
        references,
        queries,
        k=options.k,
        agreement=agreement,
        search=options.search,
        index_folder=index_folder,
        near_copies=near_copies if threshold is not None else None,
    )
    if threshold is not None:
        matches, found["near_identical_pixels"] = duplicates.flag_near_identical(
            matches, references, queries, threshold=threshold
        )
    return matches, found
