"""Prefect flow: fine-tune a CLIP model on a retailer's labeled products."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from clipdq.core.options import Arch, FinetuneOptions
from clipdq.core.presets import TrainConfig
from clipdq.core.spec import parse_spec
from clipdq.io import catalog, sources, storage
from clipdq.model import towers
from clipdq.training import train
from flows.inputs import read_spec
from flows.retries import IO_RETRIES


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def load_base_model(spec_text: str, base_model: str | None, arch: Arch) -> towers.Clip:
    if base_model:
        return towers.load_model(base_model)
    return towers.init_model(parse_spec(spec_text), arch)


@task(cache_policy=NO_CACHE)
def fit(
    clip: towers.Clip, catalog_uri: str, spec_text: str, config: TrainConfig, image_roots: list[str]
) -> towers.Clip:
    frame = catalog.read_catalog(catalog_uri)
    spec = parse_spec(spec_text)
    catalog.check_schema(frame.schema, spec)
    access = sources.catalog_access(catalog_uri, spec, image_roots)
    return train.finetune(clip, frame, spec, access=access, config=config)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def save(clip: towers.Clip, output_uri: str) -> str:
    return towers.save_model(clip, output_uri)


@flow(name="clipdq-finetune", log_prints=True)
def finetune_model(
    catalog_uri: str, spec_uri: str, output_uri: str, options: FinetuneOptions = FinetuneOptions()
) -> str:
    """Fine-tune a model on labeled products; returns the saved model folder, whose model card and
    ``clipdq.json`` hold its metrics, calibration and how it was trained.

    Args:
        catalog_uri: The labeled products: a Parquet file, local or s3://, with the spec's columns.
        spec_uri: The spec YAML (id and image columns, attributes and their values), local or s3://.
        output_uri: The model folder or s3:// prefix to write.
        options: How the model is trained; every field has a default.
    """
    storage.check_writable(output_uri)  # before the training, not after it
    spec_text = read_spec(spec_uri)
    clip = load_base_model(spec_text, options.base_model, options.arch)
    config = train.config_for(clip, **options.config_options())
    clip = fit(clip, catalog_uri, spec_text, config, options.image_roots)
    save(clip, output_uri)
    assert clip.meta.metrics is not None  # training records them
    rows = [{"attribute": k, **v} for k, v in clip.meta.metrics.items()]
    create_table_artifact(key="clipdq-finetune-metrics", table=rows, description=f"Validation metrics, {output_uri}")
    get_run_logger().info("model saved to %s", output_uri)
    return output_uri
