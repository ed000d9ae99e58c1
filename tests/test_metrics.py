"""Correctness of hpcgan.metrics on synthetic slices and features whose answers are known."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

import hpcgan.metrics as M
from hpcgan.metrics.msssim import MS_SSIM_WEIGHTS, ms_ssim_scales

from helpers import free_port

SIZE = 32
# The tests write TorchScript files the way users export them; torch 2.x flags that API as deprecated.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


def phantoms(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Brain-like slices: a head ellipse of random shape and intensity with three inner blobs."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)

    a, b, cx, cy = u(0.55, 0.9), u(0.65, 0.95), u(-0.1, 0.1), u(-0.1, 0.1)
    head = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    img = torch.where(head, u(0.0, 0.4), torch.full((n, size, size), -1.0))
    for _ in range(3):
        bx, by, r = cx + u(-0.4, 0.4) * a, cy + u(-0.4, 0.4) * b, u(0.1, 0.3)
        img = torch.where(head & ((xx - bx) ** 2 + (yy - by) ** 2 <= r ** 2), u(-0.8, 0.9), img)
    return (img + 0.05 * torch.randn(n, size, size, generator=g)).clamp(-1, 1)[:, None]


def stripes(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """A clearly different distribution: oriented sinusoidal stripes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    theta = torch.rand(n, 1, 1, generator=g) * torch.pi
    freq = 3 + 6 * torch.rand(n, 1, 1, generator=g)
    img = torch.sin(freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) * torch.pi)
    return (0.8 * img + 0.05 * torch.randn(n, size, size, generator=g)).clamp(-1, 1)[:, None]


class TinyInception(nn.Module):
    """Same call signature as the NVlabs Inception export; random weights."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = self.body(x / 128.0 - 1.0).mean(dim=(2, 3))
        return feats if return_features else self.head(feats)


class PlainNet(nn.Module):
    """A generic export: forward(x) returns features, inputs in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def save_script(cls: type[nn.Module], path: Path) -> Path:
    torch.manual_seed(0)  # the same weights whatever ran before
    torch.jit.save(torch.jit.script(cls().eval()), str(path))
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_script(TinyInception, tmp_path_factory.mktemp("weights") / "tiny_inception.pt")


# ---------------------------------------------------------------- FID / KID


def test_frechet_distance_matches_closed_form_for_commuting_covariances() -> None:
    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenbasis -> S1, S2 commute
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for s1, s2 in ((np.diag(a), np.diag(b)), (q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T)):
        assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-3)
    assert M.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-6)


def test_fid_from_features_converges_to_closed_form() -> None:
    rng = np.random.default_rng(1)
    n, d = 40_000, 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.5])
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 0.5, 0.5])
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(a)
    y = torch.from_numpy(mu2 + rng.normal(size=(n, d)) * np.sqrt(b))  # tensors and arrays both accepted
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.fid_from_features(x, y) == pytest.approx(expected, rel=0.03)
    assert M.fid_from_features(x, mu1 + rng.normal(size=(n, d)) * np.sqrt(a)) < 0.01


def test_kid_of_a_set_against_itself_is_about_zero() -> None:
    """Up to the estimator's O(1/m) self-pair term, which is far below a small real difference."""
    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)).relu()  # pool-feature-like
    self_kid = M.kid_from_features(x, x, subsets=5)
    assert abs(self_kid) < 0.005
    assert abs(self_kid) < 0.1 * M.kid_from_features(x, x + 0.1, subsets=5)


def test_kid_estimator_is_unbiased() -> None:
    """Mean over many small independent draws from one distribution is 0; the biased V-statistic is not."""
    rng = np.random.default_rng(2)
    m, d, trials = 12, 8, 400
    unbiased, biased = [], []
    for t in range(trials):
        x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        unbiased.append(M.kid_from_features(x, y, subsets=1, seed=t))
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(unbiased) / np.sqrt(trials)
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * np.std(biased) / np.sqrt(trials)


def test_kid_whole_kernel_and_per_subset_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(150, 32, generator=g).relu(), 1.1 * torch.randn(120, 32, generator=g).relu()
    whole = M.kid_subsets(x, y, subsets=10, subset_size=100)
    monkeypatch.setattr("hpcgan.metrics.frechet._GRAM_ELEMENTS", 0)
    np.testing.assert_allclose(M.kid_subsets(x, y, subsets=10, subset_size=100), whole, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- SWD


def test_swd_separates_distributions_and_is_zero_for_identical_sets() -> None:
    real, same, other = phantoms(64, seed=1), phantoms(64, seed=2), stripes(64, seed=3)
    identical = M.swd(real, real.clone())
    assert set(identical) == {"swd_32", "swd_16", "swd"}
    assert all(v == 0.0 for v in identical.values())
    within, between = M.swd(real, same), M.swd(real, other)
    for key in ("swd_32", "swd_16", "swd"):
        assert within[key] < 0.3 * between[key], key
    assert M.swd(real, same) == within  # deterministic given the seed
    assert M.swd(real, same, seed=1) != within


def test_swd_normalisation_modes() -> None:
    """ProGAN's per-set normalisation ignores a global contrast change; joint normalisation sees it."""
    real = phantoms(32, seed=4)
    dimmed = 0.5 * real + 0.3
    separate = M.swd(real, dimmed)["swd"]
    joint = M.swd(real, dimmed, normalize="joint")["swd"]
    assert separate < 1e-3 * joint
    assert joint > 10


# ---------------------------------------------------------------- precision / recall


def test_precision_is_one_for_a_subset_of_the_real_set() -> None:
    real = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    subset = M.precision_recall(real, real[:100])
    assert subset["precision"] == 1.0
    far = M.precision_recall(real, real[:100] + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    blocked = M.precision_recall(real, real[:100], block_bytes=8 * 300 * 7)  # 7-row blocks
    assert blocked == subset


def test_precision_recall_without_a_network_uses_pixel_projection() -> None:
    real = phantoms(200, seed=5)
    out = M.evaluate(["pr"], real, real[:80])
    assert out["precision"] == 1.0
    assert out["pr_feature_space"] == "pixel-projection-256-s0"
    assert M.evaluate(["pr"], real, stripes(80, seed=6))["precision"] < 0.1


def test_precision_recall_and_coverage_compare_equal_sized_sets() -> None:
    """k-NN radii shrink as a set grows: 600 generated slices against 60 real ones are scored as the first 60,
    or recall would fall towards 0 for a generator that draws from the real distribution itself."""
    real, fake = phantoms(60, seed=1), phantoms(600, seed=2)
    for metric in ("pr", "dc"):
        assert M.evaluate([metric], real, fake) == M.evaluate([metric], real, fake[:60])
    assert M.evaluate(["pr"], real, fake)["recall"] > 0.5


def test_density_and_coverage_closed_forms() -> None:
    """A set against itself: every ball holds its centre and its k neighbours, so density = (k + 1) / k."""
    real = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    same = M.density_coverage(real, real)
    assert same["coverage"] == 1.0
    assert same["density"] == pytest.approx(6 / 5, abs=0.005)
    assert M.density_coverage(real, real + 100.0) == {"density": 0.0, "coverage": 0.0}
    collapsed = M.density_coverage(real, real[:1].expand(100, -1))  # mode collapse: coverage sees it
    assert collapsed["coverage"] < 0.05
    assert M.density_coverage(real, real, block_bytes=8 * 300 * 7) == same  # 7-row blocks


def test_density_coverage_metric_without_a_network_uses_pixel_projection() -> None:
    real = phantoms(200, seed=5)
    out = M.evaluate(["dc"], real, phantoms(200, seed=9))
    assert out["dc_feature_space"] == "pixel-projection-256-s0" and "features" not in out
    assert out["coverage"] > 0.5
    assert M.evaluate(["dc"], real, stripes(200, seed=6))["coverage"] < 0.1


# ---------------------------------------------------------------- MS-SSIM


def test_ssim_and_ms_ssim_closed_forms() -> None:
    x, y = torch.full((1, 1, 64, 64), 0.2), torch.full((1, 1, 64, 64), -0.4)
    a, b, c1 = 0.6, 0.3, 0.01 ** 2  # the intensities in [0, 1]
    lum = (2 * a * b + c1) / (a * a + b * b + c1)  # constant images: the structure term is 1
    assert float(M.ssim(x, y)) == pytest.approx(lum, rel=1e-4)
    assert (ms_ssim_scales(256), ms_ssim_scales(176), ms_ssim_scales(64), ms_ssim_scales(32)) == (5, 5, 3, 2)
    # Only the last scale carries luminance, with its renormalised weight.
    w = MS_SSIM_WEIGHTS
    assert float(M.ms_ssim(x, y)) == pytest.approx(lum ** (w[2] / sum(w[:3])), rel=1e-4)
    imgs = phantoms(4, seed=7, size=64)
    assert torch.allclose(M.ms_ssim(imgs, imgs), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_ms_ssim_diversity_raises_under_mode_collapse() -> None:
    diverse = phantoms(100, seed=8, size=64)
    g = torch.Generator().manual_seed(0)
    collapsed = (diverse[:1].expand(100, -1, -1, -1) + 0.02 * torch.randn(100, 1, 64, 64, generator=g)).clamp(-1, 1)
    out = M.evaluate(["msssim"], diverse, collapsed)
    assert out["msssim"] > 0.9
    assert out["msssim_real"] < out["msssim"] - 0.3
    assert M.ms_ssim_diversity(diverse, pairs=200) == M.ms_ssim_diversity(diverse, pairs=200)


# ---------------------------------------------------------------- memorization


def test_memorization_audit_flags_planted_copies_only(tmp_path: Path) -> None:
    train, heldout = phantoms(200, seed=10), phantoms(60, seed=11)
    planted = torch.tensor([3, 50, 51, 120, 199, 7, 88, 160])
    g = torch.Generator().manual_seed(1)
    copies = train[planted] + 0.02 * torch.randn(len(planted), 1, SIZE, SIZE, generator=g)
    fake = torch.cat([copies, stripes(40, seed=12)])
    audit = M.memorization_audit(train, fake, heldout=heldout, out_path=tmp_path / "pairs.png")
    assert audit.flagged[:len(planted)].all()
    assert not audit.flagged[len(planted):].any()
    assert torch.equal(audit.l2_index[:len(planted)], planted)
    assert torch.equal(audit.ssim_index[:len(planted)], planted)
    summary = audit.summary()
    assert summary["memorization"] == pytest.approx(len(planted) / len(fake))
    assert summary["memorization_calibration"] == "heldout"
    assert summary["memorization_l2_min"] < 0.03 < summary["memorization_l2_threshold"]
    assert Image.open(tmp_path / "pairs.png").size[0] > 4 * 2 * SIZE
    blocked = M.memorization_audit(train, fake, heldout=heldout, block_bytes=4 * 256 * 16)  # 16-slice blocks
    assert torch.equal(blocked.l2_index, audit.l2_index) and torch.equal(blocked.flagged, audit.flagged)


def test_memorization_metric_without_heldout_uses_leave_one_out(tmp_path: Path) -> None:
    out = M.evaluate(["memorization"], phantoms(100, seed=13), stripes(30, seed=14), out_dir=tmp_path)
    assert out["memorization_calibration"] == "leave-one-out"
    assert out["memorization"] == 0.0
    assert Path(str(out["memorization_pairs_png"])).is_file()


# ---------------------------------------------------------------- feature networks


@pytest.mark.slow
def test_c2st_is_chance_on_one_distribution_and_near_one_on_degraded_slices() -> None:
    """Two draws of one phantom distribution: ~0.5. Noise, blur or an intensity shift on the generated side: >= 0.9."""
    from hpcgan.metrics.validation import degrade

    real, fake = phantoms(300, seed=1, size=64), phantoms(300, seed=2, size=64)
    same = M.evaluate(["c2st"], real, fake, seed=0)
    assert abs(same["c2st"] - 0.5) <= 0.1, same
    assert same["c2st_seconds"] > 0
    assert M.evaluate(["c2st"], real, fake, seed=0)["c2st"] == same["c2st"]  # deterministic given the seed
    for kind, strength in (("noise", 0.2), ("blur", 1.5), ("shift", 0.3)):
        accuracy = M.two_sample_test(real, degrade(fake, kind, strength, seed=3), seed=0).accuracy
        assert accuracy >= 0.9, (kind, strength, accuracy)


def test_c2st_with_a_heldout_set_trains_on_real_and_tests_on_heldout() -> None:
    real, heldout, fake = phantoms(200, seed=1, size=64), phantoms(100, seed=4, size=64), stripes(200, seed=2, size=64)
    result = M.two_sample_test(real, fake, heldout, seed=0)
    assert (result.train_size, result.test_size) == (100, 200) and result.accuracy >= 0.9
    with pytest.raises(ValueError, match="at least 2 training slices"):
        M.two_sample_test(real[:1], fake[:1])


def test_fid_kid_pr_through_a_torchscript_file(inception_file: Path) -> None:
    ext = M.TorchScriptFeatures(inception_file)
    assert ext.dim == 32 and ext.name.startswith("tiny_inception-")
    real, same, other = phantoms(150, seed=20), phantoms(150, seed=21), stripes(150, seed=22)
    near = M.evaluate(["fid", "kid", "pr"], real, same, extractor=ext)
    far = M.evaluate(["fid", "kid", "pr"], real, other, extractor=ext)
    assert 0 <= near["fid"] < 0.2 * far["fid"]
    assert near["kid"] < 0.2 * far["kid"]
    assert near["pr_feature_space"] == ext.name and near["features"] == ext.name
    assert near["precision"] > far["precision"]
    assert M.fid_from_features(M.extract(ext, real), ext(same)) == pytest.approx(near["fid"], rel=1e-6)


def test_generic_export_with_sidecar_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_script(PlainNet, tmp_path / "radimagenet_like.pt")
    Path(f"{path}.json").write_text(json.dumps({"input_size": 64, "input_range": "-1-1",
                                                "return_features": False, "in_channels": 1}))
    monkeypatch.setenv(M.WEIGHTS_ENV, str(path))
    ext = M.load_extractor("")
    assert ext is not None and ext.dim == 8
    direct = M.TorchScriptFeatures(path, input_size=64, input_range="-1-1", return_features=False, in_channels=1)
    imgs = phantoms(10, seed=23)
    assert torch.equal(ext(imgs), direct(imgs))


def test_missing_weights_are_reported_as_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(M.WEIGHTS_ENV, raising=False)
    assert M.load_extractor("") is None
    out = M.evaluate(["fid", "kid"], phantoms(20, seed=24), phantoms(20, seed=25))
    assert set(out) == {"fid_skipped", "kid_skipped"}
    assert "metrics.inception_weights" in str(out["fid_skipped"]) and "\n" not in str(out["fid_skipped"])


def test_bad_weights_give_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "inception.pt"
    with pytest.raises(M.FeatureWeightsError, match="inception.pt") as err:
        M.load_extractor(str(missing))
    assert "\n" not in str(err.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torchscript archive")
    with pytest.raises(M.FeatureWeightsError, match="garbage.pt") as err:
        M.TorchScriptFeatures(garbage)
    assert "\n" not in str(err.value)
    plain = save_script(PlainNet, tmp_path / "plain.pt")  # has no return_features argument
    with pytest.raises(M.FeatureWeightsError, match="plain.pt") as err:
        M.TorchScriptFeatures(plain)
    assert "\n" not in str(err.value)


def test_unknown_metric_fails_before_any_work() -> None:
    with pytest.raises(KeyError, match="available: c2st, dc, fid, kid, memorization, msssim, pr, swd"):
        M.evaluate(["swd", "fdi"], phantoms(4, seed=0), phantoms(4, seed=1))


def test_real_stats_cache_round_trip(tmp_path: Path, inception_file: Path) -> None:
    ext = M.TorchScriptFeatures(inception_file)
    real, fake = phantoms(100, seed=30), phantoms(100, seed=31)
    cache = M.RealStatsCache(tmp_path / "cache")
    stats = M.compute_real_stats(real, ext, cache=cache, key="manifest-abc123-n100")
    assert cache.path("manifest-abc123-n100", ext).is_file()
    loaded = cache.load("manifest-abc123-n100", ext)
    assert loaded is not None
    assert torch.equal(loaded.features, stats.features) and torch.equal(loaded.sigma, stats.sigma)
    assert cache.load("manifest-other", ext) is None
    cached = M.evaluate(["fid", "kid"], real, fake, extractor=ext, real_stats=loaded)
    assert cached == M.evaluate(["fid", "kid"], real, fake, extractor=ext)


def test_metrics_modules_import_without_a_cycle() -> None:
    """Layering: stats and features at the bottom, then registry, cache, metrics, distributed, the package."""
    package = Path(M.__file__).parent
    deps = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps[path.stem] = {node.module.split(".")[2] for node in ast.walk(tree)
                           if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpcgan.metrics.")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for dep in deps.get(module, ()):
                visit(dep, (*path, module))
            done.add(module)

    for module in deps:
        visit(module, ())


# ---------------------------------------------------------------- distributed

NAMES = ["swd", "msssim", "fid", "kid", "pr", "dc", "memorization"]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    fake = torch.cat([phantoms(60, seed=41), stripes(41, seed=42)])  # far enough for sizeable FID/KID
    return phantoms(121, seed=40), fake  # odd sizes: unequal shares


def _worker(rank: int, world: int, port: int, weights: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        real, fake = _inputs()
        real_local, fake_local = real[M.shard(len(real))], fake[M.shard(len(fake))]
        ext = M.TorchScriptFeatures(weights)
        stats = M.compute_real_stats(real_local, ext, cache=M.RealStatsCache(out_dir), key="ds")
        out = M.evaluate_distributed(NAMES, real_local, fake_local, extractor=ext, real_stats=stats, seed=3)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        bad_heldout = torch.zeros(3, 1, 8, 8) if rank == 0 else None  # fails on rank 0 only
        try:
            M.evaluate_distributed(["memorization"], real_local, fake_local, heldout=bad_heldout)
        except RuntimeError as err:
            (Path(out_dir) / f"error{rank}.txt").write_text(str(err))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path, inception_file: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(inception_file), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert results[0] == results[1]
    assert (tmp_path / "error0.txt").is_file()  # rank 0's own error
    assert (tmp_path / "error1.txt").read_text().startswith("metrics failed on rank 0: RuntimeError")
    real, fake = _inputs()
    single = M.evaluate(NAMES, real, fake, extractor=M.TorchScriptFeatures(inception_file), seed=3)
    assert results[0].keys() == single.keys()
    for key, value in single.items():
        if isinstance(value, str):
            assert results[0][key] == value, key
        else:
            assert results[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def _in_loop(data: str, weights: str, stats_dir: Path, is_main: bool) -> tuple[dict, dict]:
    """The trainer's in-loop metrics of a fixed random G: (values, floors)."""
    from hpcgan.config import build_config
    from hpcgan.models import build_generator
    from hpcgan.train.evaluation import InLoopMetrics

    cfg = build_config(overrides=[f"data.path={data}", "metrics.names=[swd, fid]", "metrics.n=31",
                                  f"metrics.inception_weights={weights}", "model.ngf=8", "model.nz=16"])
    torch.manual_seed(0)
    metrics = InLoopMetrics(cfg, torch.device("cpu"), cache_dir=stats_dir, is_main=is_main)
    return metrics(build_generator(cfg.model).eval()), metrics.floors


def _in_loop_worker(rank: int, world: int, port: int, data: str, weights: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HPCGAN_CACHE=f"{out_dir}/cache-{rank}")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        values, floors = _in_loop(data, weights, Path(out_dir) / "stats", is_main=rank == 0)
        gathered = M.gather_to_main(torch.full((rank + 1,), float(rank)))
        torch.save({"values": values, "floors": floors, "gathered": gathered}, Path(out_dir) / f"loop{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_in_loop_metrics_of_two_processes_match_one_and_rank_0_alone_computes_floors(
        tmp_path: Path, inception_file: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mp.spawn(_in_loop_worker, args=(2, free_port(), str(image_folder), str(inception_file), str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"loop{r}.pt", weights_only=True) for r in range(2)]
    monkeypatch.setenv("HPCGAN_CACHE", str(tmp_path / "cache-single"))
    values, floors = _in_loop(str(image_folder), str(inception_file), tmp_path / "stats-single", is_main=True)
    assert ranks[0]["values"] == ranks[1]["values"] and {"swd", "fid"} <= set(values)
    for key, value in values.items():
        assert ranks[0]["values"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert ranks[0]["floors"] == pytest.approx(floors, rel=1e-5) and floors["floor/swd"] > 0  # threads differ
    assert ranks[1]["floors"] == {} and not (tmp_path / "cache-1").exists()  # rank 1 neither computed nor read
    assert len(list((tmp_path / "cache-0" / "floors").glob("*.json"))) == 1
    assert ranks[0]["gathered"].tolist() == [0.0, 1.0, 1.0] and ranks[1]["gathered"] is None
