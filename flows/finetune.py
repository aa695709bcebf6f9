"""Prefect flow: fine-tune a CLIP model on a retailer's labeled products."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from clipdq import catalog, model, sources, storage, train
from clipdq.spec import parse_spec
from flows.retries import IO_RETRIES


@task(**IO_RETRIES)
def read_spec(uri: str) -> str:
    text = storage.read_bytes(uri).decode()
    parse_spec(text)  # fail here, before any training, on a malformed spec
    return text


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def load_base_model(spec_text: str, base_model: str | None, arch: model.Arch) -> model.Clip:
    if base_model:
        return model.load_model(base_model)
    return model.init_model(parse_spec(spec_text), arch)


@task(cache_policy=NO_CACHE)
def fit(clip: model.Clip, catalog_uri: str, spec_text: str, config: train.TrainConfig,
        image_roots: list[str] | None = None) -> model.Clip:
    frame = catalog.read_catalog(catalog_uri)
    spec = parse_spec(spec_text)
    catalog.check_schema(frame.schema, spec)
    access = sources.catalog_access(catalog_uri, spec, image_roots or ())
    return train.finetune(clip, frame, spec, access=access, config=config)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def save(clip: model.Clip, output_uri: str) -> str:
    return model.save_model(clip, output_uri)


@flow(name="clipdq-finetune", log_prints=True)
def finetune_model(
    catalog_uri: str,
    spec_uri: str,
    output_uri: str,
    base_model: str | None = None,
    arch: model.Arch = "tiny",
    max_minutes: float | None = None,
    epochs: int | None = None,
    seed: int = 0,
    mode: train.Mode | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    label_noise: float = 0.0,
    group_column: str | None = None,
    unlock_blocks: int | None = None,
    views: int | None = None,
    image_roots: list[str] | None = None,
) -> str:
    """Train on labeled products; returns the saved model folder (with metrics and calibration).

    ``mode`` "full" fine-tunes both towers; "locked" keeps the image tower frozen (but its top
    ``unlock_blocks`` blocks) and trains the text tower and projections on its kept activations of
    ``views`` views per image; "prototype" learns only each value's embedding on the frozen image
    tower. Left empty, mode and epochs follow the model (``train.PRESETS``); ``max_minutes`` is a
    safety cap, not the budget. ``val_fraction`` and ``test_fraction`` size the validation
    split (checkpoint and calibration) and the test split (model card); ``label_noise`` is the
    share of wrong labels to allow for when calibrating (0 for curated labels). Rows with the same
    ``group_column`` value (product family, photo session) stay on one side of the splits.
    ``image_roots``: folders and ``s3://`` prefixes outside the catalog's own that its images may
    come from, besides the spec's ``image_roots``.
    """
    storage.check_writable(output_uri)  # before the training, not after it
    spec_text = read_spec(spec_uri)
    clip = load_base_model(spec_text, base_model, arch)
    config = train.config_for(clip, epochs=epochs, max_minutes=max_minutes, seed=seed, mode=mode,
                              val_fraction=val_fraction, test_fraction=test_fraction, label_noise=label_noise,
                              group_column=group_column, unlock_blocks=unlock_blocks, views=views)
    clip = fit(clip, catalog_uri, spec_text, config, image_roots)
    save(clip, output_uri)
    rows = [{"attribute": k, **v} for k, v in clip.meta["metrics"].items()]
    create_table_artifact(key="clipdq-finetune-metrics", table=rows, description=f"Validation metrics, {output_uri}")
    get_run_logger().info("model saved to %s", output_uri)
    return output_uri
