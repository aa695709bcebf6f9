"""Reading and writing: storage (the one place that knows local from ``s3://``), confined image
sources, the catalog, image decoding and the embedding cache (no torch, no prefect)."""
