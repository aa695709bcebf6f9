"""Shared fixtures: a tiny generated sample, a tiny trained model, a moto S3 server and a
Prefect test harness. Everything expensive is built once per session."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from clipdq import sample_data
from clipdq.core.presets import TrainConfig
from clipdq.core.spec import Spec, parse_spec
from clipdq.io import storage
from clipdq.io.catalog import read_catalog
from clipdq.io.sources import access_for
from clipdq.model import towers
from clipdq.training import train
from clipdq.training.labeled import LabeledSet, load_labeled

N_LABELED = 60
N_CATALOG = 100
N_FLAGGING_LABELED = 400  # enough validation rows for the colour conflict bar (134 clean rows)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: a torch thread each, children too
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config.addinivalue_line(
        "markers",
        "subprocess: runs the clipdq console script in a child process (up to ~30 s each when it "
        "starts Prefect); part of the default run, deselect with -m 'not subprocess'",
    )


# --------------------------------------------------------------------------- sample data and models


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated sample (spec, labeled and catalog Parquet, images, ground truth), small."""
    return sample_data.generate(tmp_path_factory.mktemp("sample"), n_labeled=N_LABELED, n_catalog=N_CATALOG)


@pytest.fixture(scope="session")
def spec(sample_dir: Path) -> Spec:
    return parse_spec((sample_dir / "spec.yaml").read_text())


@pytest.fixture(scope="session")
def labeled(sample_dir: Path, spec: Spec) -> LabeledSet:
    """The sample's labeled products, loaded at the tiny model's resolution."""
    pixels = towers.init_model(spec).pixels
    return load_labeled(
        read_catalog(str(sample_dir / "labeled.parquet")), spec, access=access_for(str(sample_dir)), pixel_spec=pixels
    )


@pytest.fixture(scope="session")
def init_model_dir(tmp_path_factory: pytest.TempPathFactory, spec: Spec) -> Path:
    """A saved, untrained tiny CLIP for the sample spec."""
    folder = tmp_path_factory.mktemp("init-model")
    towers.save_model(towers.init_model(spec, "tiny", seed=0), str(folder))
    return folder


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path, spec: Spec) -> Path:
    """A tiny CLIP fine-tuned for two epochs on the sample's labeled products, saved.

    Its 11 to 13 validation rows cannot show any threshold (the Wilson bound needs 15 clean rows
    for the gap bar), so it never flags a conflict or suggests a gap: tests of flags, thresholds or
    suggested fixes use ``flagging_model_dir``.
    """
    clip = towers.init_model(spec, "tiny", seed=0)
    labeled = read_catalog(str(sample_dir / "labeled.parquet"))
    train.finetune(clip, labeled, spec, access=access_for(str(sample_dir)), config=TrainConfig(epochs=2))
    folder = tmp_path_factory.mktemp("trained-model")
    towers.save_model(clip, str(folder))
    return folder


@pytest.fixture(scope="session")
def flagging_labeled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other labeled products of the sample kind (seed 1), enough to calibrate flags on."""
    return sample_data.generate(
        tmp_path_factory.mktemp("flagging-sample"), seed=1, n_labeled=N_FLAGGING_LABELED, n_catalog=10
    )


@pytest.fixture(scope="session")
def flagging_model_dir(tmp_path_factory: pytest.TempPathFactory, flagging_labeled_dir: Path, spec: Spec) -> Path:
    """The pretrained EfficientNet-Lite0 tower with a text tower trained in locked mode: a model
    that sees the sample's attributes and whose calibration lets it flag (about 20 s to train).

    Half of its labeled products validate, so colour (on every product) has the rows its conflict
    bar needs; the type-specific attributes get gap suggestions but no conflict threshold.
    """

    def build(folder: Path) -> None:
        clip = towers.init_model(spec, "efficientnet-lite0")
        config = train.config_for(clip, mode="locked", val_fraction=0.5, test_fraction=0.0, views=1)
        labeled = read_catalog(str(flagging_labeled_dir / "labeled.parquet"))
        train.finetune(clip, labeled, spec, access=access_for(str(flagging_labeled_dir)), config=config)
        towers.save_model(clip, str(folder))

    folder = built_once(tmp_path_factory, "flagging-model", build)
    color = json.loads((folder / "clipdq.json").read_text())["calibration"]["color"]
    assert color["gap_threshold"] is not None and color["conflict_threshold"] is not None, (
        f"the flagging model cannot flag colour (calibration {color}): tests of flags would prove nothing"
    )
    return folder


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``build`` once for the whole run: with parallel workers
    (pytest-xdist) the first to ask builds it while the others wait, then all share it."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not folder.exists():
            partial = root / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            build(partial)
            partial.rename(folder)  # whole or not at all: a worker that failed leaves no folder
    return folder


# --------------------------------------------------------------------------- S3 (moto in server mode)


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server, as ``s3://<bucket>``, with boto3 pointed at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    storage.s3_client.cache_clear()
    bucket = f"clipdq-test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    storage.s3_client.cache_clear()


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME in a temporary folder, so the s3 model download cache (~/.cache/clipdq) starts empty."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# --------------------------------------------------------------------------- Prefect


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary Prefect server and database for the session's flow runs.

    Task results go to a temporary folder, not the shared cache under ~/.prefect; the setting is
    applied both to the environment and to Prefect's already-loaded settings before the harness.
    """
    from prefect.settings import (
        PREFECT_MEMO_STORE_PATH,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect")
    settings = {
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "results",
        PREFECT_MEMO_STORE_PATH: home / "memo_store.toml",
        PREFECT_SERVER_ANALYTICS_ENABLED: False,  # no telemetry calls from a machine without network
    }
    with pytest.MonkeyPatch.context() as patch:
        for setting, value in settings.items():
            patch.setenv(setting.name, str(value).lower() if isinstance(value, bool) else str(value))
        with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
            yield home / "results"


# --------------------------------------------------------------------------- the CLI in a child process


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The inherited environment with a private Prefect home and result storage, and no API URL."""
    prefect_home = tmp_path_factory.mktemp("cli-prefect")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(prefect_home / "results"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env
