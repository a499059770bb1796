"""python -m autodiff_opt.stats: reference statistics from folders, image archives and ADM reference batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autodiff_opt import stats
from autodiff_opt.metrics.fid import FIDScorer, FIDStats, MetricError
from autodiff_opt.metrics import reference
from autodiff_opt.metrics.reference import check_reference, reference_statistics
from cli_helpers import cli_env
from randconv_extractor import TEST_EXTRACTOR
from replicas import blob_images, write_image_npz, write_png_folder

RANDCONV = ["--feature-extractor", TEST_EXTRACTOR, "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return blob_images(40, 16, seed=2)


@pytest.fixture(scope="module")
def scorer() -> FIDScorer:
    return FIDScorer(TEST_EXTRACTOR, batch_size=16)


@pytest.fixture
def adm_batch(tmp_path: Path, images: np.ndarray) -> Path:
    """A reference batch as ADM's evaluator reads it: arr_0 images, pool_3 mu/sigma, spatial mu_s/sigma_s."""
    feats = np.random.default_rng(0).normal(size=(64, 2048))
    spatial = np.random.default_rng(1).normal(size=(64, 2023))
    path = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(path, arr_0=images, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    return path


def _stats(*args: str) -> int:
    return stats.main(list(args))


def test_adm_reference_batch_stored_pool3_is_copied_without_building_inception(adm_batch: Path, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "FIDScorer", None)  # no extractor (and no Inception weights) needed
    out = tmp_path / "imagenet64_stats.npz"
    assert _stats("--source", str(adm_batch), "--out", str(out)) == 0
    got = FIDStats.load(out)
    with np.load(adm_batch) as ref:
        assert np.array_equal(got.mu, ref["mu"]) and np.array_equal(got.sigma, ref["sigma"])
    assert got.num_images == 40
    with np.load(out) as data:
        assert str(data["feature_extractor"]) == "inception-v3-compat" and str(data["feature_layer"]) == "2048"
        assert "mu_s" not in data.files


def test_other_extractors_use_the_batch_images(adm_batch: Path, images: np.ndarray, scorer: FIDScorer, tmp_path: Path) -> None:
    out = tmp_path / "randconv.npz"
    assert _stats("--source", str(adm_batch), "--out", str(out), *RANDCONV) == 0
    expected = scorer.statistics(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    got = FIDStats.load(out)
    assert got.num_images == 40 and got.dim == 32
    assert np.allclose(got.mu, expected.mu, rtol=1e-10) and np.allclose(got.sigma, expected.sigma, rtol=1e-8, atol=1e-12)


def test_folder_and_npz_match_the_cli_reference_path(images: np.ndarray, scorer: FIDScorer, tmp_path: Path) -> None:
    folder = write_png_folder(tmp_path / "pngs", images)
    archive = write_image_npz(tmp_path / "images.npz", images)
    for source, out in ((folder, tmp_path / "a.npz"), (archive, tmp_path / "b.npz")):
        assert _stats("--source", str(source), "--out", str(out), *RANDCONV) == 0
    via_cli_path = reference_statistics(str(folder), scorer, tmp_path / "cache")
    for out in (tmp_path / "a.npz", tmp_path / "b.npz"):
        got = reference_statistics(str(out), scorer, tmp_path / "cache")  # the output is a valid dataset.reference
        check_reference(got, scorer, (3, 16, 16), str(out))
        assert np.allclose(got.mu, via_cli_path.mu) and np.allclose(got.sigma, via_cli_path.sigma, atol=1e-12)


def test_max_images_and_resizing_of_mixed_sizes(images: np.ndarray, tmp_path: Path) -> None:
    folder = write_png_folder(tmp_path / "mixed", images[:10])
    write_png_folder(tmp_path / "mixed" / "big", blob_images(5, 24, seed=3))
    out = tmp_path / "mixed.npz"
    assert _stats("--source", str(folder), "--out", str(out), *RANDCONV) == 2  # sizes differ
    assert _stats("--source", str(folder), "--out", str(out), "--image-size", "12", *RANDCONV) == 0
    assert FIDStats.load(out).num_images == 15
    assert _stats("--source", str(folder), "--out", str(out), "--image-size", "12", "--max-images", "7", *RANDCONV) == 0
    with np.load(out) as data:
        assert int(data["num_images"]) == 7 and int(data["image_size"]) == 12 and int(data["max_images"]) == 7


def test_same_settings_reuse_the_output(images: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_image_npz(tmp_path / "images.npz", images)
    out = tmp_path / "s.npz"
    assert _stats("--source", str(archive), "--out", str(out), *RANDCONV) == 0

    def fail(*args: object) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr(reference, "accumulate", fail)
    assert _stats("--source", str(archive), "--out", str(out), *RANDCONV) == 0
    with pytest.raises(AssertionError, match="recomputed"):
        _stats("--source", str(archive), "--out", str(out), "--max-images", "20", *RANDCONV)


def test_streamed_statistics_equal_numpy_cov(scorer: FIDScorer, images: np.ndarray) -> None:
    batches = [torch.from_numpy(images[i : i + 7]).permute(0, 3, 1, 2).contiguous() for i in range(0, 40, 7)]
    got = reference.accumulate(scorer, iter(batches))
    feats = scorer.features(torch.cat(batches))
    assert np.allclose(got.mu, feats.mean(0)) and np.allclose(got.sigma, np.cov(feats, rowvar=False), atol=1e-12)


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file or directory"),
    ("stats-only", "cannot give test-randconv/32 features"),
    ("no-images", "contains no images"),
    ("extractor", "is not registered"),
])
def test_clear_errors(case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, extra = tmp_path / "nothing", RANDCONV
    if case == "stats-only":
        source = tmp_path / "stats.npz"
        np.savez(source, mu=np.zeros(2048), sigma=np.eye(2048))
    elif case == "no-images":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "extractor":
        source = write_image_npz(tmp_path / "i.npz", blob_images(4, 8))
        extra = ["--feature-extractor", "no-such-net"]
    assert _stats("--source", str(source), "--out", str(tmp_path / "o.npz"), *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_module_entry_point(images: np.ndarray, tmp_path: Path) -> None:
    archive = write_image_npz(tmp_path / "images.npz", images)
    cmd = [sys.executable, "-m", "autodiff_opt.stats", "--source", str(archive), "--out", str(tmp_path / "o.npz"),
           "--import", "randconv_extractor", *RANDCONV]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert FIDStats.load(tmp_path / "o.npz").num_images == 40


# --- --from-images, --force, a changed source, builtin: sources, a bad --import -----------------------
def _planted(path: Path, images: np.ndarray) -> Path:
    """Stored test-randconv statistics no computation gives (mu = 7, sigma = 3 I) beside the images they claim."""
    np.savez(path, arr_0=images, mu=np.full(32, 7.0), sigma=3 * np.eye(32), feature_extractor=np.asarray(TEST_EXTRACTOR),
             feature_layer=np.asarray("32"))
    return path


def test_from_images_recomputes_where_stored_statistics_would_be_copied(images: np.ndarray, scorer: FIDScorer,
                                                                         tmp_path: Path) -> None:
    source = _planted(tmp_path / "batch.npz", images)
    copied, computed = tmp_path / "copied.npz", tmp_path / "computed.npz"
    assert _stats("--source", str(source), "--out", str(copied), *RANDCONV) == 0
    assert np.array_equal(FIDStats.load(copied).mu, np.full(32, 7.0))
    assert _stats("--source", str(source), "--out", str(computed), "--from-images", *RANDCONV) == 0
    feats = scorer.features(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    got = FIDStats.load(computed)
    assert got.num_images == 40 and np.allclose(got.mu, feats.mean(0))
    assert np.allclose(got.sigma, np.cov(feats, rowvar=False), atol=1e-12)
    with np.load(computed) as data:
        assert bool(data["from_images"]) is True


def test_force_rebuilds_and_a_changed_source_invalidates(images: np.ndarray, scorer: FIDScorer, tmp_path: Path) -> None:
    archive = write_image_npz(tmp_path / "images.npz", images)
    out = tmp_path / "s.npz"
    assert _stats("--source", str(archive), "--out", str(out), *RANDCONV) == 0
    with np.load(out) as data:
        kept = {k: data[k] for k in data.files}
    np.savez(out, **{**kept, "mu": kept["mu"] + 100.0})  # same settings, other numbers: a reuse returns these
    stamp = out.stat().st_mtime_ns
    assert _stats("--source", str(archive), "--out", str(out), *RANDCONV) == 0
    assert out.stat().st_mtime_ns == stamp and np.allclose(FIDStats.load(out).mu, kept["mu"] + 100.0)
    assert _stats("--source", str(archive), "--out", str(out), "--force", *RANDCONV) == 0
    assert np.allclose(FIDStats.load(out).mu, kept["mu"])  # rebuilt from the images

    darker = images // 2  # the source changes (content and mtime): the output is rebuilt without --force
    write_image_npz(archive, darker)
    os.utime(archive, (archive.stat().st_atime + 5, archive.stat().st_mtime + 5))
    assert _stats("--source", str(archive), "--out", str(out), *RANDCONV) == 0
    feats = scorer.features(torch.from_numpy(darker).permute(0, 3, 1, 2).contiguous())
    assert np.allclose(FIDStats.load(out).mu, feats.mean(0))


def test_builtin_source_and_its_reuse(scorer: FIDScorer, tmp_path: Path) -> None:
    from autodiff_opt.metrics.reference import load_reference_images

    out = tmp_path / "digits.npz"
    assert _stats("--source", "builtin:digits-train", "--out", str(out), "--max-images", "64", *RANDCONV) == 0
    feats = scorer.features(load_reference_images("builtin:digits-train", 64))
    got = FIDStats.load(out)
    assert got.num_images == 64 and np.allclose(got.mu, feats.mean(0))
    assert np.allclose(got.sigma, np.cov(feats, rowvar=False), atol=1e-12)
    stamp = out.stat().st_mtime_ns
    assert _stats("--source", "builtin:digits-train", "--out", str(out), "--max-images", "64", *RANDCONV) == 0
    assert out.stat().st_mtime_ns == stamp  # reused


def test_a_module_that_cannot_be_imported_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = write_image_npz(tmp_path / "i.npz", blob_images(4, 8))
    code = _stats("--source", str(archive), "--out", str(tmp_path / "o.npz"), "--import", "no_such_module_xyz", *RANDCONV)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --import no_such_module_xyz:"), err
    assert "No module named 'no_such_module_xyz'" in err[0] and not (tmp_path / "o.npz").exists()


# --- one pipeline: the CLI and a run's cache write the same file ------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_cli_and_run_path_write_the_same_file(kind: str, images: np.ndarray, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    source = write_png_folder(tmp_path / "pngs", images) if kind == "folder" else write_image_npz(tmp_path / "i.npz", images)
    out = tmp_path / "cli.npz"
    assert _stats("--source", str(source), "--out", str(out), *RANDCONV) == 0
    run_scorer = FIDScorer(TEST_EXTRACTOR, batch_size=16)  # the CLI's --batch-size 16: the same batches
    got = reference_statistics(str(source), run_scorer, tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("ref-*.npz")
    with np.load(out) as cli, np.load(cached) as run:
        assert sorted(cli.files) == sorted(run.files)
        for key in cli.files:
            assert np.array_equal(cli[key], run[key]), key
    assert np.array_equal(got.mu, FIDStats.load(out).mu) and got.num_images == 40

    def fail(*args: object) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr(reference, "accumulate", fail)  # each reuses the other's file
    shutil.copy(cached, tmp_path / "from_run.npz")
    assert _stats("--source", str(source), "--out", str(tmp_path / "from_run.npz"), *RANDCONV) == 0
    shutil.copy(out, cached)
    assert np.array_equal(reference_statistics(str(source), run_scorer, tmp_path / "cache").sigma, got.sigma)


def test_a_cache_of_the_older_format_is_recomputed_with_a_log_line(images: np.ndarray, scorer: FIDScorer, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    archive = write_image_npz(tmp_path / "i.npz", images)
    cache = tmp_path / "cache"
    cache.mkdir()
    FIDStats(np.full(32, 5.0), np.eye(32), 3).save(cache / f"ref-{TEST_EXTRACTOR}-0123456789abcdef.npz")  # mu, sigma, n only
    with caplog.at_level("INFO", logger="autodiff_opt.metrics.reference"):
        got = reference_statistics(str(archive), scorer, cache)
    assert "older version's format (no provenance), not used; recomputing" in caplog.text
    assert got.num_images == 40 and not np.allclose(got.mu, 5.0)
    assert len(list(cache.glob("ref-*.npz"))) == 2


def test_run_path_computes_from_a_batch_s_images_for_another_extractor(adm_batch: Path, images: np.ndarray,
                                                                      scorer: FIDScorer, tmp_path: Path) -> None:
    got = reference_statistics(str(adm_batch), scorer, tmp_path / "cache")  # its stored mu/sigma are pool_3
    expected = scorer.statistics(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert got.dim == 32 and np.allclose(got.mu, expected.mu) and np.allclose(got.sigma, expected.sigma, atol=1e-12)
    other = tmp_path / "other.npz"  # statistics that record another extractor, without images: refused
    np.savez(other, mu=np.zeros(32), sigma=np.eye(32), feature_extractor=np.asarray("digits-cnn"),
             feature_layer=np.asarray("32"))
    with pytest.raises(MetricError, match="holds only stored statistics of digits-cnn"):
        reference_statistics(str(other), scorer, tmp_path / "cache")
