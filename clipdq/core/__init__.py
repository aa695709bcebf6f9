"""What every layer shares, in numpy and polars only: the spec, options, calibration, evaluation,
category trees, text agreement, splits and the value encoder (no torch, transformers, boto3 or prefect)."""
