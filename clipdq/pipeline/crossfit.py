"""Cross-fitting: a catalog that is also a model's training data, audited out of fold.

A model agrees with the errors of the rows it was trained on, so the catalog's rows are dealt into
``k`` folds (``splits.fold_of``, stratified on the values' ``labels``, whole ``group_column``
groups together) and each fold is scored by the starting model fine-tuned on the other folds.
The catalog's labels are as wrong as the spec expects, so each fold model's calibration allows
for that (``label_noise``). Every row is judged once, by a model that never saw it.
"""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import polars as pl

from clipdq.core import splits, values
from clipdq.core.spec import Spec
from clipdq.io.sources import ImageAccess
from clipdq.model import scorer, towers
from clipdq.pipeline import audit
from clipdq.pipeline.embedding import Tally, signature_rows
from clipdq.training import labeled, train

log = logging.getLogger(__name__)


def fold_model(
    start: towers.Clip,
    rows: pl.DataFrame,
    spec: Spec,
    *,
    access: ImageAccess,
    fold: int,
    max_minutes: float | None,
    group_column: str | None,
) -> towers.Clip:
    """A copy of ``start`` fine-tuned on ``rows`` (the catalog outside one fold), as quickly as its
    kind of model trains well (``train.quick_mode``)."""
    clip = copy.deepcopy(start)
    config = train.config_for(
        clip,
        mode=train.quick_mode(clip),
        max_minutes=max_minutes,
        seed=fold,
        label_noise=spec.expected_error_rate,
        group_column=group_column,
    )
    return train.finetune(clip, rows, spec, access=access, config=config)


def folds_of(frame: pl.DataFrame, spec: Spec, *, k: int, group_column: str | None) -> np.ndarray:
    """(rows,) the fold of each catalog row, 0 to k - 1."""
    return splits.fold_of(values.labels(frame, spec), k=k, seed=0, groups=labeled.group_keys(frame, group_column))


def score(inputs: audit.AuditInputs, findings_file: str) -> audit.Scored:
    """The catalog's findings, each of ``options.cross_fit`` folds scored by the model fine-tuned
    on the other folds, written to the local Parquet file ``findings_file``; its texts judged fold
    by fold."""
    source, spec, access, options = inputs.source, inputs.spec, inputs.access, inputs.options
    start, k = scorer.load_model(inputs.model_uri), options.cross_fit
    frame = source.read()
    folds = pl.Series(folds_of(frame, spec, k=k, group_column=options.group_column))
    tally = Tally(source.row_count, max_transient=spec.max_transient_image_errors, what="cross-fitting")
    parts, calibrations, judged = [], [], []
    for fold in range(k):
        log.info("cross-fitting: training the model for fold %d of %d", fold + 1, k)
        clip = fold_model(
            start,
            frame.filter(folds != fold),
            spec,
            access=access,
            fold=fold,
            max_minutes=options.fold_minutes,
            group_column=options.group_column,
        )
        fold_scorer = scorer.of_clip(clip, spec)
        findings, texts = audit.findings_of(
            audit.batches(frame.filter(folds == fold), options.batch_size),
            scorer=fold_scorer,
            access=access,
            tally=tally,
        )
        text_findings, fold_judged = audit.judge_texts(texts, fold_scorer.text_calibration, spec)
        parts += [findings, text_findings]
        calibrations.append(fold_scorer.calibration)
        judged.append(fold_judged)
    pl.concat(parts).write_parquet(findings_file)
    usable = tally.usable()
    return audit.Scored(
        findings_file,
        usable.drop("signature"),
        functools.partial(signature_rows, usable),
        dict(tally.counts),
        calibrations,
        scorer.text_calibration_for(start, spec),
        {"folds": judged},
    )
