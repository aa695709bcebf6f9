"""What every layer shares, in numpy, polars and pydantic only: the spec, options and the training
presets, calibration, evaluation, category trees, text agreement, splits and the value encoder (no
torch, transformers, boto3 or prefect).

Vocabulary: ``spec`` is the attribute ``Spec``; ``labels`` are value indices (-1 where unknown) and
``pred_probs`` (n, values) probabilities, as in ``predict``; a ``code`` tells a missing value from
an invalid one (``values``).
"""
