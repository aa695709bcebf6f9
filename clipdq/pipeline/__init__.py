"""The audit wired together: batches fetched and embedded once, shards, cross-fitting (no prefect)."""
