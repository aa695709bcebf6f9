"""CLIP model folders: build, save, load (local and s3://), tokenizer and embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from clipdq.core.spec import Spec
from clipdq.io import storage
from clipdq.model import towers


def random_pixels(clip: towers.Clip, n: int = 4, seed: int = 0) -> np.ndarray:
    size = clip.pixels.crop
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def assert_same_model(loaded: towers.Clip, original: towers.Clip, spec: Spec) -> None:
    """Same embeddings for the same pixels and captions, same preprocessing and metadata."""
    pixels = random_pixels(original)
    np.testing.assert_allclose(towers.embed_images(loaded, pixels), towers.embed_images(original, pixels), atol=1e-6)
    loaded_text, original_text = towers.embed_captions(loaded, spec), towers.embed_captions(original, spec)
    for name in spec.names:
        np.testing.assert_allclose(loaded_text[name], original_text[name], atol=1e-6)
    assert loaded.pixels == original.pixels
    assert loaded.meta == original.meta


@pytest.fixture
def clip(spec: Spec) -> towers.Clip:
    return towers.init_model(spec, "tiny", seed=3)


def test_local_round_trip_keeps_weights_tokenizer_and_metadata(clip, spec, tmp_path):
    folder = towers.save_model(clip, str(tmp_path / "model"))
    loaded = towers.load_model(folder, device="cpu")

    assert_same_model(loaded, clip, spec)
    assert loaded.meta.spec_fingerprint == spec.fingerprint()
    assert loaded.fingerprint() == clip.meta.fingerprint


def test_model_folder_holds_hugging_face_files_and_clipdq_metadata(clip, tmp_path):
    folder = Path(towers.save_model(clip, str(tmp_path / "model")))
    names = {p.name for p in folder.iterdir()}

    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer_config.json",
        towers.META_FILE,
    } <= names
    assert "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pickle"))}, "no pickled weights"
    meta = json.loads((folder / towers.META_FILE).read_text())
    assert meta["arch"] == "tiny" and meta["trained"] is False


def test_different_seeds_give_different_models(spec):
    first, second = towers.init_model(spec, seed=0), towers.init_model(spec, seed=1)
    pixels = random_pixels(first)

    assert not np.allclose(towers.embed_images(first, pixels), towers.embed_images(second, pixels))


def test_unknown_arch_is_refused(spec):
    with pytest.raises(ValueError, match="unknown arch"):
        towers.init_model(spec, "vit-huge")


def spec_words(spec: Spec) -> list[str]:
    return sorted({word for a in spec.attributes for v in a.values for word in v.lower().split()})


def test_tokenizer_encodes_every_spec_value_without_unknown_tokens(init_model_dir, spec):
    tokenizer = AutoTokenizer.from_pretrained(init_model_dir)

    for value in (v for a in spec.attributes for v in a.values):
        ids = tokenizer(value, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids).replace(" ", "") == value.replace(" ", "")


def test_tokenizer_spells_every_spec_word_as_one_token(init_model_dir, spec):
    tokenizer = AutoTokenizer.from_pretrained(init_model_dir)

    # CLIP's pre-tokenizer splits 'v-neck' into 'v', '-', 'neck'; each piece should be one token
    # (ending in </w>, CLIP's end-of-word mark), not a spelling from smaller pieces
    split = {word: tokenizer.tokenize(word) for word in spec_words(spec)}
    assert {w: t for w, t in split.items() if not all(piece.endswith("</w>") for piece in t)} == {}


@pytest.mark.parametrize("text", ["xylophone", "Crème brûlée", "snowboard 2024"])
def test_tokenizer_still_spells_unseen_words(init_model_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(init_model_dir)

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # byte pieces, not one token per word
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).replace(" ", "") == text.lower().replace(" ", "")


def test_saved_tokenizer_encodes_like_the_built_one(clip, spec, tmp_path):
    loaded = towers.load_model(towers.save_model(clip, str(tmp_path / "model")), device="cpu")
    texts = [c for a in spec.attributes for v in a.values for c in a.captions(v)] + ["an unseen phrase"]

    assert loaded.tokenizer(texts)["input_ids"] == clip.tokenizer(texts)["input_ids"]


def test_embed_captions_gives_normalized_value_embeddings_per_attribute(clip, spec):
    embeddings = towers.embed_captions(clip, spec)

    assert list(embeddings) == spec.names
    for attribute in spec.attributes:
        emb = embeddings[attribute.name]
        assert emb.shape == (len(attribute.values), clip.model.config.projection_dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        assert len({tuple(row.round(5)) for row in emb}) == len(attribute.values)  # distinct values


def test_embed_images_gives_normalized_rows_in_batches(clip):
    pixels = random_pixels(clip, n=5)

    whole = towers.embed_images(clip, pixels)
    batched = towers.embed_images(clip, pixels, batch_size=2)

    assert whole.shape == (5, clip.model.config.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, whole, atol=1e-5)
    assert towers.embed_images(clip, pixels[:0]).shape == (0, clip.model.config.projection_dim)


def test_a_plain_checkpoint_is_fingerprinted_by_its_files(spec, tmp_path):
    def save_plain(seed: int) -> str:
        folder = towers.save_model(towers.init_model(spec, "tiny", seed=seed), str(tmp_path / "plain"))
        (tmp_path / "plain" / towers.META_FILE).unlink()  # as a checkpoint from elsewhere comes
        config = json.loads((tmp_path / "plain" / "config.json").read_text())
        del config["clipdq_metadata"]
        (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
        return towers.load_model(folder, device="cpu").fingerprint()

    first, rewritten = save_plain(0), save_plain(1)

    assert first.startswith("files-")
    assert first != rewritten  # new weights, new fingerprint: their cached embeddings are not reused


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """A Hugging Face hub cache folder, with the hub itself out of reach (as on an air-gapped host)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_a_hub_id_loads_from_the_hub_cache_with_clipdq_metadata(clip, spec, offline_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--acme--clip-tiny"
    clip.meta.trained, clip.meta.calibration = True, {}
    towers.save_model(clip, str(repo / "snapshots" / commit))  # the hub cache's layout
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    loaded = towers.load_model("acme/clip-tiny", device="cpu")

    assert loaded.source == "acme/clip-tiny"
    assert_same_model(loaded, clip, spec)


def test_a_hub_id_that_is_neither_cached_nor_reachable_is_a_clear_error(offline_hub):
    with pytest.raises(FileNotFoundError, match="no model at 'acme/missing': not a local folder"):
        towers.load_model("acme/missing", device="cpu")


@pytest.mark.parametrize("backend", ["int8", "bf16"])
def test_a_faster_backend_changes_only_the_image_tower_and_stays_close_to_fp32(clip, spec, backend):
    pixels = random_pixels(clip, n=6)
    before = towers.embed_images(clip, pixels)

    fast = towers.on_backend(clip, backend)
    got = towers.embed_images(fast, pixels)

    assert fast.backend == backend and clip.backend == "fp32"
    assert 0 < np.abs(got - before).max() < 0.05  # other arithmetic: close, not equal
    np.testing.assert_array_equal(towers.embed_images(clip, pixels), before)  # the fp32 model is untouched
    fast_text, text = towers.embed_captions(fast, spec), towers.embed_captions(clip, spec)
    for name in spec.names:
        np.testing.assert_array_equal(fast_text[name], text[name])


def test_unknown_backend_is_refused(clip):
    with pytest.raises(ValueError, match="unknown backend 'fp8'"):
        towers.on_backend(clip, "fp8")


def test_s3_round_trip(clip, spec, s3_bucket, isolated_home):
    uri = towers.save_model(clip, f"{s3_bucket}/models/tiny")

    assert {"config.json", "model.safetensors", towers.META_FILE} <= set(storage.list_files(uri))
    assert_same_model(towers.load_model(uri, device="cpu"), clip, spec)


def test_s3_model_saved_again_to_the_same_uri_loads_the_new_weights(spec, s3_bucket, isolated_home):
    uri = f"{s3_bucket}/models/current"
    towers.save_model(towers.init_model(spec, seed=0), uri)
    towers.load_model(uri, device="cpu")
    newer = towers.init_model(spec, seed=1)
    towers.save_model(newer, uri)

    assert_same_model(towers.load_model(uri, device="cpu"), newer, spec)


@pytest.mark.parametrize("damage", ["truncated", "missing", "no calibration"])
def test_a_model_folder_without_a_whole_clipdq_json_fails_to_load(trained_model_dir, tmp_path, damage):
    import shutil

    folder = Path(shutil.copytree(trained_model_dir, tmp_path / "model"))
    meta = folder / towers.META_FILE
    text = meta.read_text()
    if damage == "truncated":
        meta.write_text(text[: len(text) // 2])
    elif damage == "missing":
        meta.unlink()
    else:
        meta.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "calibration"}))

    with pytest.raises(ValueError, match="clipdq.json|calibration"):
        towers.load_model(str(folder), device="cpu")
