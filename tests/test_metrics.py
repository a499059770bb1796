"""FID: equal to torch-fidelity's own calculate_metrics; reference statistics cached and checked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity

from autodiff_opt.metrics.fid import FIDScorer, FIDStats, MetricError, fid_from_stats
from autodiff_opt.metrics.reference import check_reference, load_reference_images, reference_statistics
from randconv_extractor import TEST_EXTRACTOR


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _images(seed: int, n: int = 300, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=gen) * 200 + shift
    return x.clamp(0, 255).to(torch.uint8)


def test_fid_equals_torch_fidelity() -> None:
    a, b = _images(0), _images(1, shift=30)
    scorer = FIDScorer(TEST_EXTRACTOR, batch_size=64)
    ours = scorer.fid(a, scorer.statistics(b))
    theirs = torch_fidelity.calculate_metrics(input1=TensorDataset(a), input2=TensorDataset(b), fid=True,
                                              feature_extractor=TEST_EXTRACTOR, cuda=False, verbose=False,
                                              save_cpu_ram=True, batch_size=64)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)
    assert ours > 0.01 and scorer.fid(a, scorer.statistics(a)) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_with_the_shift_between_sets() -> None:
    scorer = FIDScorer(TEST_EXTRACTOR)
    ref = scorer.statistics(_images(0))
    fids = [scorer.fid(_images(1, shift=s), ref) for s in (0, 20, 60)]
    assert fids[0] < fids[1] < fids[2]


def test_reference_statistics_are_cached(tiny_reference: Path, tmp_path: Path) -> None:
    scorer = FIDScorer(TEST_EXTRACTOR)
    first = reference_statistics(str(tiny_reference), scorer, tmp_path)
    direct = scorer.statistics(load_reference_images(str(tiny_reference)))
    np.testing.assert_allclose(first.mu, direct.mu)
    np.testing.assert_allclose(first.sigma, direct.sigma)
    cached = list(tmp_path.glob("ref-*.npz"))
    assert len(cached) == 1
    # plant statistics no computation would give (provenance kept): only a read of the cache can return them
    with np.load(cached[0]) as data:
        kept = {k: data[k] for k in data.files}
    planted = FIDStats(first.mu + 1000.0, first.sigma * 3.0, 7)
    np.savez(cached[0], **{**kept, "mu": planted.mu, "sigma": planted.sigma, "num_images": 7})
    before = cached[0].stat()
    again = reference_statistics(str(tiny_reference), scorer, tmp_path)
    np.testing.assert_array_equal(again.mu, planted.mu)
    np.testing.assert_array_equal(again.sigma, planted.sigma)
    after = cached[0].stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "the cache was rewritten"
    assert list(tmp_path.glob("ref-*.npz")) == cached


def test_a_changed_reference_is_not_served_from_the_cache(tiny_reference: Path, tmp_path: Path) -> None:
    scorer = FIDScorer(TEST_EXTRACTOR)
    source = tmp_path / "ref.npz"
    source.write_bytes(tiny_reference.read_bytes())
    first = reference_statistics(str(source), scorer, tmp_path / "cache")
    images = load_reference_images(str(source))
    np.savez(source, arr_0=(255 - images.permute(0, 2, 3, 1).numpy()).astype(np.uint8))  # other content, size kept
    os.utime(source, (source.stat().st_atime + 5, source.stat().st_mtime + 5))  # a later edit
    second = reference_statistics(str(source), scorer, tmp_path / "cache")
    direct = scorer.statistics(load_reference_images(str(source)))
    np.testing.assert_allclose(second.mu, direct.mu)
    assert not np.allclose(second.mu, first.mu)
    assert len(list((tmp_path / "cache").glob("ref-*.npz"))) == 2


def test_stored_mu_sigma_npz_and_dimension_check(tmp_path: Path) -> None:
    scorer = FIDScorer(TEST_EXTRACTOR)
    good = tmp_path / "good.npz"
    FIDStats(np.zeros(32), np.eye(32), 10).save(good)
    stats = reference_statistics(str(good), scorer, tmp_path / "cache")
    check_reference(stats, scorer, (1, 8, 8), str(good))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(2048), sigma=np.eye(2048))
    wrong = reference_statistics(str(bad), scorer, tmp_path / "cache")
    with pytest.raises(MetricError, match="dimension 2048.*gives 32"):
        check_reference(wrong, scorer, (1, 8, 8), str(bad))
    with pytest.raises(MetricError, match="dimension"):
        fid_from_stats(scorer.statistics(_images(0)), wrong)


def test_metric_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MetricError, match="not registered"):
        FIDScorer("no-such-extractor")
    with pytest.raises(MetricError, match="weights_path"):
        FIDScorer("inception-v3-compat", weights_path=str(tmp_path / "missing.pth"))
    torch.hub.set_dir(str(tmp_path / "hub"))
    with pytest.raises(MetricError, match="metric.weights_path"):
        FIDScorer("inception-v3-compat")
    with pytest.raises(MetricError, match="no such file"):
        load_reference_images(str(tmp_path / "nothing.npz"))
    with pytest.raises(MetricError, match="uint8"):
        FIDScorer(TEST_EXTRACTOR).features(torch.zeros(2, 3, 8, 8))


class Pickled:
    """Any non-tensor object: a pickle that weights_only loading refuses."""


def test_unsafe_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"x": Pickled()}, path)
    with pytest.raises(MetricError, match="weights_only"):
        FIDScorer("inception-v3-compat", weights_path=str(path))
