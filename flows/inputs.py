"""The flows' shared input tasks: a spec and a model's files, read with the I/O retry policy."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from clipdq.core.spec import parse_spec
from clipdq.io import storage
from clipdq.model.files import ModelFiles, read_model_files
from flows.retries import IO_RETRIES


@task(**IO_RETRIES)
def read_spec(uri: str) -> str:
    text = storage.read_bytes(uri).decode()
    parse_spec(text)  # a malformed spec fails here, once, before any work
    return text


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def read_model(uri: str) -> ModelFiles:
    return read_model_files(uri)  # its weights load only where something needs them
