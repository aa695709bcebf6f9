"""Product matching: the nearest reference images of each query image, by cosine similarity.

Vocabulary: ``queries`` (m, d) and ``references`` (n, d) are embeddings, L2-normalised here;
``k`` neighbours per query; ``query_keys`` and ``reference_keys`` identify each image's bytes
(a digest), and a query is never matched with a reference of the same bytes: the same image on
both sides says nothing about the model and inflates every score.

With a model fine-tuned on the spec, the score adds what the model reads of each reference's
attribute values (``ValueAgreement``): the log-probability that the query shows the reference's
catalog values, so a shelf photo meets the products of its category first, and image similarity
ranks within them. Through the approximate index (``clipdq.index``), the agreement rescores each
query's ``RESCORED_CANDIDATES`` nearest references by image.

Exact and blockwise: at most ``query_block`` x ``reference_block`` scores exist at a time, so
memory stays bounded for millions of references. Catalogs' images go through the audit's own
pipeline (confined fetches, safe decoding, the embedding cache).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from clipdq import audit, catalog, progress_log
from clipdq.cache import EmbeddingCache
from clipdq.images import SIGNATURE_BYTES
from clipdq.scorer import Scorer
from clipdq.sources import ImageAccess
from clipdq.spec import Spec

QUERY_BLOCK = 1024
REFERENCE_BLOCK = 16384  # 1024 x 16384 float32 scores: 64 MB at a time
APPROXIMATE_ABOVE = 1_000_000  # references past which search "auto" uses the approximate index (clipdq.index)
RESCORED_CANDIDATES = 64  # approximate search with the agreement: candidates by image, rescored by both
AGREEMENT_FLOOR = 1e-6  # a value the model rules out costs log(1e-6) = -13.8 per attribute, not -inf


@dataclass
class Neighbours:
    indices: np.ndarray  # (m, k) int64: reference rows, best first; -1 where fewer than k are left
    scores: np.ndarray  # (m, k) float32: cosine similarity (plus the agreement), -inf where indices is -1
    excluded: np.ndarray  # (m,) int64: references left out for holding the query's own bytes


def normalised(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1)


@dataclass
class ValueAgreement:
    """The score's second term: for every attribute, ``weight`` x log P(the query and the reference
    show the same value) = log sum_v p_query(v) p_reference(v), with the model's calibrated
    probabilities. A reference's distribution is the model's prediction from its image where the
    catalog holds no valid value, else its catalog value, trusted as far as the spec's
    ``expected_error_rate`` allows: a wrong catalog value costs a match a few nats, not all."""

    attributes: list[str]
    value_emb: list[np.ndarray]  # per attribute, (values, d)
    scales: list[float]  # per attribute: the model's logit scale over its calibrated temperature
    codes: list[np.ndarray]  # per attribute, (references,) int: the catalog value's index, -1 where it has none
    weight: float = 1.0
    error_rate: float = 0.1  # share of wrong catalog values (the spec's expected_error_rate)

    def probabilities(self, embeddings):
        """Per attribute, (rows, values) probabilities of L2-normalised ``embeddings`` (a tensor)."""
        import torch

        return [torch.softmax(scale * embeddings @ torch.from_numpy(values.astype(np.float32)).T, dim=1)
                for values, scale in zip(self.value_emb, self.scales)]

    def reference_probabilities(self, references, rows: np.ndarray | slice) -> list:
        """Per attribute, (references, values): the distributions of normalised reference embeddings
        (a tensor) that are rows ``rows`` (indices or a slice) of the references, their catalog values mixed in."""
        import torch

        out = []
        for reference_probs, codes in zip(self.probabilities(references), self.codes):
            codes = torch.from_numpy(codes[rows])
            known = codes >= 0
            catalog = torch.nn.functional.one_hot(codes[known], reference_probs.shape[1]).float()
            reference_probs[known] = (1 - self.error_rate) * catalog + self.error_rate * reference_probs[known]
            out.append(reference_probs)
        return out

    def term(self, query_probs: list, references, start: int):
        """(queries, references) weighted log-agreement of a block of normalised reference embeddings
        that starts at reference row ``start``."""
        import torch

        rows = slice(start, start + len(references))
        total = torch.zeros(len(query_probs[0]), len(references))
        for probs, reference_probs in zip(query_probs, self.reference_probabilities(references, rows)):
            total += torch.log((probs @ reference_probs.T).clamp_min(AGREEMENT_FLOOR))
        return total.mul_(self.weight)

    def pair_term(self, query_probs: list, candidates, rows: np.ndarray):
        """(queries, c) weighted log-agreement of each query with its own ``c`` candidates: rows
        ``rows`` (queries, c) of the references, ``candidates`` their normalised embeddings (queries, c, d)."""
        import torch

        m, c = rows.shape
        total = torch.zeros(m, c)
        flat = self.reference_probabilities(candidates.reshape(m * c, -1), rows.ravel())
        for probs, reference_probs in zip(query_probs, flat):
            agree = (probs[:, None, :] * reference_probs.reshape(m, c, -1)).sum(-1)
            total += torch.log(agree.clamp_min(AGREEMENT_FLOOR))
        return total.mul_(self.weight)


def value_agreement(scorer: Scorer, codes: dict[str, np.ndarray], *, weight: float) -> ValueAgreement | None:
    """The agreement of ``codes`` (references' catalog values, ``catalog_codes``) with what the
    scorer's model reads in the queries; None where the model was not fine-tuned on the spec (its
    value predictions would be noise) or ``weight`` is 0."""
    names = scorer.spec.names
    if not scorer.trained or not weight or not names:
        return None
    return ValueAgreement(names, [scorer.value_emb[n] for n in names],
                          [scorer.scale / scorer.calibration[n].temperature for n in names],
                          [codes[n] for n in names], weight, scorer.spec.expected_error_rate)


def top_k(queries: np.ndarray, references: np.ndarray, *, k: int, query_keys=None, reference_keys=None,
          agreement: ValueAgreement | None = None, query_block: int = QUERY_BLOCK,
          reference_block: int = REFERENCE_BLOCK) -> Neighbours:
    """The ``k`` best-scoring references of every query, exactly (torch's matrix product and top-k
    on the CPU: ten times faster than numpy's argpartition): cosine similarity, plus ``agreement``."""
    import torch

    if k < 1:
        raise ValueError("k must be at least 1")
    # references stay as given (a million of them is a gigabyte): their norms divide the scores
    r_all = torch.from_numpy(np.asarray(references, dtype=np.float32))
    r_norms = torch.linalg.vector_norm(r_all, dim=1).clamp_min(1e-12) if len(r_all) else torch.ones(0)
    q_all = torch.from_numpy(normalised(queries))
    q_codes, r_codes = (None if codes is None else torch.from_numpy(codes)
                        for codes in shared_codes(query_keys, reference_keys, len(q_all), len(r_all)))
    kept = min(k, len(r_all))
    indices = np.full((len(q_all), k), -1, dtype=np.int64)
    scores = np.full((len(q_all), k), -np.inf, dtype=np.float32)
    excluded = np.zeros(len(q_all), dtype=np.int64)
    for q0 in range(0, len(q_all) if kept else 0, query_block):
        rows = slice(q0, q0 + query_block)
        best_s = torch.full((len(q_all[rows]), kept), -torch.inf)
        best_i = torch.full((len(q_all[rows]), kept), -1, dtype=torch.int64)
        query_probs = agreement.probabilities(q_all[rows]) if agreement is not None else None
        for r0 in range(0, len(r_all), reference_block):
            block = (q_all[rows] @ r_all[r0:r0 + reference_block].T).div_(r_norms[r0:r0 + reference_block])
            if agreement is not None:
                normal = r_all[r0:r0 + reference_block] / r_norms[r0:r0 + reference_block, None]
                block += agreement.term(query_probs, normal, r0)
            if q_codes is not None:
                same = (q_codes[rows, None] == r_codes[None, r0:r0 + reference_block]) & (q_codes[rows, None] >= 0)
                block.masked_fill_(same, -torch.inf)
                excluded[rows] += same.sum(dim=1).numpy()
            block_s, block_i = torch.topk(block, min(kept, block.shape[1]), dim=1)
            best_s, position = torch.topk(torch.cat([best_s, block_s], 1), kept, dim=1)
            best_i = torch.gather(torch.cat([best_i, block_i + r0], 1), 1, position)
        indices[rows, :kept], scores[rows, :kept] = best_i.numpy(), best_s.numpy()
    indices[~np.isfinite(scores)] = -1
    return Neighbours(indices, scores, excluded)


def rescore(found: Neighbours, queries: np.ndarray, references: np.ndarray, agreement: ValueAgreement, *,
            k: int, query_block: int = QUERY_BLOCK) -> Neighbours:
    """The ``k`` best of each query's candidates (``found``, from the approximate index) by the exact
    search's score: their cosine similarity recomputed in float32, plus ``agreement``."""
    import torch

    m = len(found.indices)
    indices, scores = np.full((m, k), -1, np.int64), np.full((m, k), -np.inf, np.float32)
    for q0 in range(0, m, query_block):
        rows = slice(q0, q0 + query_block)
        present = found.indices[rows] >= 0
        candidate_rows = np.where(present, found.indices[rows], 0)
        candidates = torch.from_numpy(normalised(references[candidate_rows.ravel()]))
        candidates = candidates.reshape(*candidate_rows.shape, -1)
        query = torch.from_numpy(normalised(queries[rows]))
        block = torch.einsum("qd,qcd->qc", query, candidates)
        block += agreement.pair_term(agreement.probabilities(query), candidates, candidate_rows)
        block.masked_fill_(~torch.from_numpy(present), -torch.inf)
        best_s, position = torch.topk(block, min(k, block.shape[1]), dim=1)
        scores[rows, :position.shape[1]] = best_s.numpy()
        indices[rows, :position.shape[1]] = np.take_along_axis(candidate_rows, position.numpy(), 1)
    indices[~np.isfinite(scores)] = -1
    return Neighbours(indices, scores, found.excluded)


def shared_codes(query_keys, reference_keys, m: int, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(query codes, reference codes): equal non-negative codes mark the same bytes; (None, None)
    without keys. A missing key (None) matches nothing."""
    if query_keys is None or reference_keys is None:
        return None, None
    code_of = {key: i for i, key in enumerate(dict.fromkeys(key for key in reference_keys if key is not None))}

    def codes(keys, length):
        return np.array([code_of.get(key, -1) if key is not None else -1 for key in keys],
                        dtype=np.int64).reshape(length)

    return codes(query_keys, m), codes(reference_keys, n)


MATCHES_SCHEMA = {"query_id": pl.String, "rank": pl.Int32, "reference_id": pl.String, "score": pl.Float32,
                  "detail": pl.String}


@dataclass
class Embedded:
    """A catalog's images as embeddings: every row's id, digest and image error, and the
    embeddings of the rows whose image is usable, in row order."""

    ids: list[str] = field(default_factory=list)
    sha256: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    signatures: np.ndarray | None = None  # (usable rows, 3 * 32 * 32) uint8: images.signature of each
    counts: Counter = field(default_factory=Counter)  # audit.COUNT_KEYS

    @property
    def ok(self) -> np.ndarray:
        return np.array([error is None for error in self.errors], dtype=bool)


def embed_catalog(source: catalog.CatalogFile, *, scorer: Scorer, access: ImageAccess,
                  cache: EmbeddingCache | None = None, batch_size: int = 64, role: str = "images") -> Embedded:
    """Every row of ``source`` embedded (or taken from ``cache``), one batch of pixels at a time;
    progress is logged as ``role``."""
    spec, out, filled, kept, signatures = scorer.spec, Embedded(), 0, None, None
    catalog.check_id_and_image(source.schema, spec)
    prepare = functools.partial(audit.prepare_batch, spec=spec, access=access, pixels=scorer.pixels, cache=cache)
    for batch in audit.prepared_batches(source.batches(batch_size, [spec.id_column, spec.image_column]), prepare):
        embeddings = audit.embed_batch(batch, scorer, cache)
        if kept is None:  # one array for the catalog, filled in place: no second copy of a million rows
            kept = np.empty((source.rows, embeddings.shape[1]), np.float32)
            signatures = np.empty((source.rows, SIGNATURE_BYTES), np.uint8)
        kept[filled:filled + len(embeddings)] = embeddings
        usable = b"".join(sig for sig in batch.signatures if sig is not None)
        signatures[filled:filled + len(embeddings)] = np.frombuffer(usable, np.uint8).reshape(-1, SIGNATURE_BYTES)
        filled += len(embeddings)
        out.ids += batch.rows[spec.id_column].cast(pl.String).to_list()
        out.sha256 += batch.sha256
        out.errors += batch.errors
        out.counts.update(audit.counts(batch))
        progress_log.info("%s: %d/%d images embedded or found in the cache", role, len(out.ids), source.rows,
                          extra={"progress": (len(out.ids), source.rows)})
    if cache is not None:
        cache.flush()
    out.embeddings = kept[:filled] if kept is not None else np.zeros((0, 0), np.float32)
    out.signatures = signatures[:filled] if kept is not None else np.zeros((0, SIGNATURE_BYTES), np.uint8)
    return out


def catalog_codes(source: catalog.CatalogFile, spec: Spec, usable: np.ndarray) -> dict[str, np.ndarray]:
    """Per attribute, the catalog value's index (``value_codes``) of each row where ``usable`` (the
    rows of ``Embedded.ok``: those with an embedding), read only where matching asks for them."""
    rows = source.read([spec.id_column, *(name for name in spec.names if name in source.schema)])
    return {name: value_codes(rows, spec.attribute(name).values, name)[usable] for name in spec.names}


def value_codes(rows: pl.DataFrame, values: list[str], column: str) -> np.ndarray:
    """Each row's index of its value of ``column`` among ``values``; -1 where the column is absent,
    the value missing or not one of them."""
    if column not in rows.columns:
        return np.full(rows.height, -1, np.int64)
    index = {value: i for i, value in enumerate(values)}
    return np.array([index.get(value, -1) for value in rows[column].cast(pl.String).to_list()], np.int64)


def search_method(search: str, references: int) -> str:
    """"exact" or "approximate": ``search`` as asked, "auto" by the number of references."""
    if search == "auto":
        return "approximate" if references > APPROXIMATE_ABOVE else "exact"
    return search


def match_embedded(references: Embedded, queries: Embedded, *, k: int, agreement: ValueAgreement | None = None,
                   search: str = "exact", index_folder: str | None = None) -> tuple[pl.DataFrame, dict]:
    """(matches, what the summary says of them): k rows per query with a usable image, ranked from
    1, and one row with its error for each query whose image failed, so every query is accounted for.
    ``search``: exact, approximate (faiss's inverted lists) or auto (approximate past a million);
    ``index_folder``: where the approximate index is kept between runs (None: built every run)."""
    ref_ok, query_ok = references.ok, queries.ok
    ref_ids = np.array(references.ids, dtype=object)[ref_ok]
    keys = {"query_keys": [sha for sha, ok in zip(queries.sha256, query_ok) if ok],
            "reference_keys": [sha for sha, ok in zip(references.sha256, ref_ok) if ok]}
    method = search_method(search, int(ref_ok.sum()))
    found, searched = search_references(queries.embeddings, references.embeddings, keys, k=k, agreement=agreement,
                                        method=method, index_folder=index_folder)
    query_ids = np.array(queries.ids, dtype=object)
    kept = found.indices >= 0
    rows = np.nonzero(kept)
    matched = pl.DataFrame({
        "query_id": query_ids[query_ok][rows[0]].tolist(), "rank": (rows[1] + 1).astype(np.int32),
        "reference_id": ref_ids[found.indices[kept]].tolist(), "score": found.scores[kept], "detail": None,
    }, schema=MATCHES_SCHEMA)
    failed = pl.DataFrame({"query_id": query_ids[~query_ok].tolist(), "rank": None, "reference_id": None,
                           "score": None, "detail": [e for e in queries.errors if e is not None]},
                          schema=MATCHES_SCHEMA)
    summary = {
        "queries": len(queries.ids), "references": len(references.ids), "k": k,
        "query_image_errors": int((~query_ok).sum()), "reference_image_errors": int((~ref_ok).sum()),
        "same_image_excluded": {"queries": int((found.excluded > 0).sum()), "pairs": int(found.excluded.sum())},
        "search": method, **searched, "score": score_summary(agreement),
    }
    return pl.concat([matched, failed]), summary


def search_references(queries: np.ndarray, references: np.ndarray, keys: dict, *, k: int,
                      agreement: ValueAgreement | None, method: str, index_folder: str | None) -> tuple[Neighbours, dict]:
    """(neighbours, what the summary says of the approximate index): the exact search, or the
    index's candidates (rescored with ``agreement``), the index kept in ``index_folder``."""
    if method == "exact":
        return top_k(queries, references, k=k, agreement=agreement, **keys), {}
    from clipdq import index

    built, reused = None, False
    if index_folder is not None and len(references):
        built, reused = index.kept(references, keys["reference_keys"], index_folder)
    wanted = k if agreement is None else max(k, RESCORED_CANDIDATES)
    found = index.top_k(queries, references, k=wanted, built=built, **keys)
    if agreement is not None:
        found = rescore(found, queries, references, agreement, k=k)
    return found, {"approximate_index": {"read_from_an_earlier_run": reused,
                                         "candidates_rescored": wanted if agreement is not None else None}}


def score_summary(agreement: ValueAgreement | None) -> dict:
    """What the matches' score is made of, for the summary."""
    if agreement is None:
        return {"formula": "cosine similarity of the image embeddings", "attributes": {}}
    return {"formula": f"cosine similarity + {agreement.weight:g} x sum over attributes of log P(same value)",
            "attributes": {name: {"references_with_a_catalog_value": int((codes >= 0).sum())}
                           for name, codes in zip(agreement.attributes, agreement.codes)}}


def accuracy(matches: pl.DataFrame, expected: dict[str, str | None]) -> dict:
    """Top-1 and top-5 accuracy over the queries that carry a label and have a usable image."""
    labeled = {query: label for query, label in expected.items() if label is not None}
    ranked = (matches.filter(pl.col("rank").is_not_null() & pl.col("query_id").is_in(list(labeled)))
              .group_by("query_id").agg(pl.col("reference_id").sort_by("rank")))
    lists = dict(zip(ranked["query_id"].to_list(), ranked["reference_id"].to_list()))
    hits = {n: sum(labeled[query] in refs[:n] for query, refs in lists.items()) for n in (1, 5)}
    return {"labeled_queries": len(lists), **{f"top_{n}": hits[n] / len(lists) if lists else None for n in hits}}
