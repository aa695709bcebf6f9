"""The options of each job, defined once: the flows take these models (their field descriptions
become the Prefect UI's form help), the CLI makes its flags, choices and defaults from them.
Fine-tuning's defaults and bounds come from ``presets``, so its help cannot drift from them.

Kept free of heavy imports (pydantic only), so the CLI can parse its flags without loading torch.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipdq.core.presets import BOUNDS, PRESETS, Mode, TrainConfig, default_text

# tiny, vit-b-32: CLIPs initialised at random; efficientnet-lite0: the pretrained ImageNet tower with a new text tower
Arch = Literal["tiny", "vit-b-32", "efficientnet-lite0"]
# how the image tower computes; int8: dynamic quantization of its linear layers (CPU)
Backend = Literal["fp32", "int8", "bf16"]

ARCHS, BACKENDS = get_args(Arch), get_args(Backend)

GROUP_HELP = (
    "Rows with the same value in this column (product family, photo session) stay on one side of every "
    "split; without it, near-duplicate images are grouped."
)
IMAGE_ROOTS_HELP = (
    "Folders and s3:// prefixes outside the catalog's own that its images may come from (besides "
    "the spec's image_roots); an image elsewhere is an image_error."
)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuditOptions(Options):
    """How an audit runs. Every field has a default: a run from the UI may leave them all alone."""

    batch_size: int = Field(64, ge=1, description="Images per model call.")
    backend: Backend = Field(
        "fp32",
        description=(
            "How the image tower computes: int8 (CPU) or bf16 are faster, and used only where their predictions on "
            "the catalog's first batch agree with fp32's for at least 99% of the images."
        ),
    )
    embedding_cache: bool = Field(
        True,
        description=(
            "Keep image embeddings beside the reports and reuse them: an unchanged image is not read or embedded again."
        ),
    )
    image_roots: list[str] = Field(default_factory=list, description=IMAGE_ROOTS_HELP)
    rows_per_shard: int = Field(
        20_000,
        ge=1,
        description=(
            "Catalog rows per shard: the unit of work that runs on one worker and is kept when a killed run is "
            "started again."
        ),
    )
    dask_address: str | None = Field(
        None,
        description=(
            "Run the shards on this Dask cluster (tcp://host:8786); empty: here, or on a local cluster of `workers`."
        ),
    )
    workers: int = Field(0, ge=0, description="Run the shards on a local Dask cluster of this many processes.")
    cross_fit: int = Field(
        0,
        ge=0,
        description=(
            "Audit the model's own training catalog honestly: deal its rows into this many folds (at least 2) and "
            "score each with the model fine-tuned on the other folds. 0: off."
        ),
    )
    fold_minutes: float | None = Field(None, gt=0, description="Safety cap on each fold's training time (cross_fit).")
    group_column: str | None = Field(None, description=GROUP_HELP + " (cross_fit)")

    @model_validator(mode="after")
    def _consistent(self) -> AuditOptions:
        if self.cross_fit == 1:
            raise ValueError("cross_fit must be 0 (off) or at least 2 folds, not 1")
        if self.cross_fit and self.backend != "fp32":
            raise ValueError("cross-fitting trains its fold models during the run; audit them with the fp32 backend")
        return self


class FinetuneOptions(Options):
    """How a model is fine-tuned. Left empty, a setting follows the model (``presets.PRESETS``)."""

    base_model: str | None = Field(
        None,
        description=(
            "Start from this CLIP (model folder, s3:// prefix or Hugging Face hub id); empty: a new model of `arch`."
        ),
    )
    arch: Arch = Field(
        "tiny",
        description=(
            "The new model's architecture: efficientnet-lite0 pairs the pretrained ImageNet image tower with a new "
            "text tower; tiny and vit-b-32 are CLIPs initialised at random."
        ),
    )
    mode: Mode | None = Field(
        None,
        description=(
            "full: fine-tune both towers on pixels (a pretrained image tower gently, above its lowest blocks, on "
            f"{PRESETS['pretrained image tower', 'full']['train_size']}-px random crops); locked: "
            "keep the image tower frozen (but unlock_blocks) and train the text tower and projections on its kept "
            "activations, minutes instead of tens of them; prototype: learn value embeddings on frozen images. "
            f"Empty: {default_text('mode')}."
        ),
    )
    epochs: int | None = Field(
        None, **BOUNDS["epochs"], description=(f"The training budget in epochs (empty: {default_text('epochs')}).")
    )
    max_minutes: float | None = Field(
        None, **BOUNDS["max_minutes"], description="Safety cap on training time; the budget is epochs."
    )
    seed: int = Field(TrainConfig.seed, description="Seed of the splits, the sampler and the initialisation.")
    val_fraction: float | None = Field(
        None,
        **BOUNDS["val_fraction"],
        description=(
            "Share of products for validation and calibration; a pretrained image tower trained whole gains most "
            f"from more training photos (empty: {default_text('val_fraction')})."
        ),
    )
    test_fraction: float | None = Field(
        None,
        **BOUNDS["test_fraction"],
        description=(f"Share of products held out for the model card (empty: {default_text('test_fraction')})."),
    )
    label_noise: float = Field(
        TrainConfig.label_noise,
        **BOUNDS["label_noise"],
        description=("Share of wrong labels to allow for in calibration (0 for curated labels)."),
    )
    group_column: str | None = Field(None, description=GROUP_HELP)
    train_only_column: str | None = Field(
        None,
        description=(
            "Rows where this boolean column is true only train, with their near-duplicates: labeled images unlike "
            "those the audits check (studio packshots beside the shelf photos audited), which validation and "
            "calibration must not judge the model on."
        ),
    )
    instance_column: str | None = Field(
        None,
        description=(
            "Full mode: rows sharing this column's value show one product (its catalog image, a train-only row, and "
            "photos of it); training pulls each photo towards the product's catalog image, so that matching by image "
            "alone finds the one from the other."
        ),
    )
    unlock_blocks: int | None = Field(
        None,
        **BOUNDS["unlock_blocks"],
        description=(f"Locked mode: top EfficientNet blocks that train too (empty: {default_text('unlock_blocks')})."),
    )
    views: int | None = Field(
        None,
        **BOUNDS["views"],
        description=(
            "Locked mode: kept views per training image (the image itself, then augmented ones; empty: "
            f"{default_text('views')})."
        ),
    )
    image_roots: list[str] = Field(default_factory=list, description=IMAGE_ROOTS_HELP)

    def config_options(self) -> dict:
        """The options that are settings of the training config: ``config_for``'s keyword arguments."""
        settings = {f.name for f in fields(TrainConfig)}
        return {name: getattr(self, name) for name in type(self).model_fields if name in settings}


class MatchOptions(Options):
    """How product matching runs. Every field has a default."""

    k: int = Field(5, ge=1, le=100, description="Nearest references kept per query, best first.")
    attribute_weight: float | None = Field(
        None,
        ge=0,
        description=(
            "With a model fine-tuned on the spec: the score adds this times the log-probability that the query shows "
            "each reference's attribute values (its catalog values, else the model's reading of its image). A "
            "reference whose pixels are near-identical to the query's (its own photo, at the spec's "
            "duplicate_similarity) is scored by image alone. Default: 1 where the references carry any of the spec's "
            "attribute columns (measured on shelf photos against studio images), else 0 (image similarity alone)."
        ),
    )
    search: Literal["auto", "exact", "approximate"] = Field(
        "auto",
        description=(
            "exact: every reference scored, a block at a time; approximate: faiss's inverted lists (8-bit vectors, "
            "the nearest cells only; with the attribute agreement, each query's 64 nearest by image are "
            "rescored); auto: approximate past a million references."
        ),
    )
    label_column: str | None = Field(
        None,
        description=(
            "A query column holding the reference id each query should match: top-1 and top-5 accuracy are reported."
        ),
    )
    batch_size: int = Field(64, ge=1, description="Images per model call.")
    embedding_cache: bool = Field(
        True,
        description=(
            "Keep image embeddings beside the runs and reuse them: an unchanged image is not read or embedded again."
        ),
    )
    image_roots: list[str] = Field(default_factory=list, description=IMAGE_ROOTS_HELP)
