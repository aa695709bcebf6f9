"""The checks on embeddings and predictions: comparison with the catalog, duplicate listings,
neighbour search and product matching (faiss only here).

Vocabulary: ``findings`` are rows of ``schemas.FINDINGS_SCHEMA`` (one per product and attribute);
``queries`` and ``references`` are embeddings, or ``match.Embedded`` catalogs, of the photos
matched and the products matched against; ``k`` neighbours per query.
"""
