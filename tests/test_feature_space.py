"""The offline feature space: cached, deterministic training; the metrics use it and say so; and it passes
the checks feature spaces are validated with (monotone disturbance curves, copies detected) on a small
synthetic brain data set prepared by the real `hpcgan prepare`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hpcgan.metrics as M
from data_factories import brain, run_prepare, write_nifti
from hpcgan.data import DataError, load_split
from hpcgan.data.pixels import to_unit
from test_metrics import TinyInception, save_script

STEPS, BATCH = 300, 64  # ~15 s on one core at 32 px
# Coarser than the default grid: with ~120 slices per half at 32 px, the finest default steps sit inside
# the real-vs-real floor of this small set (the quickstart table in docs/metrics.md uses the default grid).
STRENGTHS = {"noise": (0.0, 0.2, 0.4), "blur": (0.0, 1.0, 2.0, 3.0), "shift": (0.0, 0.1, 0.2, 0.4),
             "drop": (0.0, 0.5, 1.0)}
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 ellipsoid 'brains' with per-subject texture, sliced along three axes: ~240 train, ~240 val slices."""
    root = tmp_path_factory.mktemp("ssl-data")
    for i in range(8):
        write_nifti(root / "src" / f"sub{i:02d}.nii.gz", brain((28, 32, 24), seed=i))
    assert run_prepare(root / "src", "--out", root / "shards", "--size", 32, "--val-frac", 0.5, "--workers", 1) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def encoder_file(shard_dir: Path, cache_dir: Path) -> Path:
    return M.train_features(shard_dir, steps=STEPS, batch_size=BATCH, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def extractor(encoder_file: Path) -> M.SSLFeatures:
    return M.SSLFeatures(encoder_file)


@pytest.fixture(scope="module")
def slices(shard_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return to_unit(load_split(shard_dir, "train")), to_unit(load_split(shard_dir, "val"))


def test_training_is_cached_deterministic_and_leaves_the_global_rng_alone(
        shard_dir: Path, cache_dir: Path, encoder_file: Path, tmp_path: Path) -> None:
    fingerprint = M.data_fingerprint(shard_dir)
    assert encoder_file.parent == cache_dir and encoder_file.name.startswith(f"ssl-{fingerprint}-r32-")
    assert [p.name for p in cache_dir.iterdir()] == [encoder_file.name]  # no temp file left behind
    stamp = encoder_file.stat().st_mtime_ns
    assert M.train_features(shard_dir, steps=STEPS, batch_size=BATCH, cache_dir=cache_dir) == encoder_file
    assert encoder_file.stat().st_mtime_ns == stamp  # found, not retrained
    data = torch.load(encoder_file, weights_only=True)
    assert data["meta"]["fingerprint"] == fingerprint and data["meta"]["settings"]["steps"] == STEPS

    rng = torch.random.get_rng_state()
    a = M.train_features(shard_dir, steps=5, batch_size=16, out=tmp_path / "a.pt")
    b = M.train_features(shard_dir, steps=5, batch_size=16, out=tmp_path / "b.pt")
    c = M.train_features(shard_dir, steps=5, batch_size=16, seed=1, out=tmp_path / "c.pt")
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert M.SSLFeatures(a).name == M.SSLFeatures(b).name != M.SSLFeatures(c).name
    weights_a, weights_b = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_load_extractor_picks_inception_then_the_cached_encoder(
        shard_dir: Path, cache_dir: Path, extractor: M.SSLFeatures, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(M.WEIGHTS_ENV, raising=False)
    found = M.load_extractor("", data=shard_dir, cache_dir=cache_dir)
    assert isinstance(found, M.SSLFeatures) and found.name == extractor.name
    assert found.name.startswith("ssl-enc-") and found.dim == 128
    assert M.load_extractor("") is None
    assert M.load_extractor("", data=shard_dir, cache_dir=tmp_path / "empty") is None
    inception = save_script(TinyInception, tmp_path / "inception.pt")
    assert isinstance(M.load_extractor(str(inception), data=shard_dir, cache_dir=cache_dir), M.TorchScriptFeatures)


def test_metrics_in_the_encoder_space_are_named_as_such(
        shard_dir: Path, extractor: M.SSLFeatures, slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, val = slices
    desc = extractor.description
    assert desc.startswith(f"{extractor.name} (dim 128, trained on {M.data_fingerprint(shard_dir)}")
    assert f"{STEPS} steps" in desc and "32 px" in desc
    out = M.evaluate(["fid", "kid", "pr", "dc"], val, train, extractor=extractor)
    assert {"fd_ssl", "kid_ssl", "kid_ssl_std", "precision", "recall", "density", "coverage"} <= out.keys()
    assert "fid" not in out and "kid" not in out
    assert out["features"] == desc and out["pr_feature_space"] == out["dc_feature_space"] == extractor.name
    same = M.evaluate(["fid"], val[::2], val[1::2], extractor=extractor)
    assert same["fd_ssl"] < out["fd_ssl"]
    upsampled = torch.nn.functional.interpolate(val[:8], scale_factor=2, mode="nearest")
    assert extractor(upsampled).shape == (8, 128)  # other sizes are resized to the training resolution


def test_fd_and_kid_grow_monotonically_with_every_degradation(
        extractor: M.SSLFeatures, slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    rows = M.disturbance_curves(extractor, slices[1], strengths=STRENGTHS)
    assert M.monotone(rows, "fd") == dict.fromkeys(STRENGTHS, True), M.markdown_table(rows)
    assert M.monotone(rows, "kid") == dict.fromkeys(STRENGTHS, True), M.markdown_table(rows)
    floor = rows[0].fd
    assert all(r.fd > 1.5 * floor for r in rows if r.strength == max(STRENGTHS[r.degradation])), M.markdown_table(rows)


def test_copies_of_training_slices_are_flagged(extractor: M.SSLFeatures,
                                               slices: tuple[torch.Tensor, torch.Tensor]) -> None:
    audit = M.copy_audit(extractor, *slices)
    assert audit["pixel_copies"] == audit["feature_copies"] == 1.0
    assert audit["pixel_novel"] <= 0.1 and audit["feature_novel"] <= 0.1


def test_bad_inputs_give_one_line_errors_naming_the_file(shard_dir: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path in (tmp_path / "missing.pt", garbage, foreign):
        with pytest.raises(M.FeatureWeightsError, match=path.name) as err:
            M.SSLFeatures(path)
        assert "\n" not in str(err.value) and "hpcgan features" in str(err.value)
    for call in (M.train_features, M.data_fingerprint):
        with pytest.raises(DataError, match=f"{tmp_path}.*hpcgan prepare"):
            call(tmp_path)
    with pytest.raises(DataError, match=r"sizes \[32\], not 48"):
        M.train_features(shard_dir, resolution=48)
    with pytest.raises(ValueError, match="steps >= 1"):
        M.EncoderSettings(steps=0)
