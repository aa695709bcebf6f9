"""The checks on embeddings and predictions: comparison with the catalog, duplicate listings,
neighbour search and product matching (faiss only here)."""
