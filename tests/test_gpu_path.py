"""The fast path on CPU: compiled layers vs eager, bf16, static shapes (padding), masks without recompiling,
feature extraction in float32, and the precision/compile/batch-size settings refused before any work.

torch.compile runs with backend="aot_eager" here (dynamo's graph capture and guards, AOTAutograd's
tracing, no C++ code generation): whether a mask change recompiles is decided by dynamo's guards, the
same for every backend. The inductor backend is run by experiments/bench_gpu.py (docs/gpu.md).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from autodiff_opt.generate import CPU_AUTO_BATCH, ImageGenerator, SampleSet, pad_batch
from autodiff_opt.models.loading import load_model
from autodiff_opt.core.genome import Genome

BACKEND = "aot_eager"
STEPS = (999, 749, 499, 249)
MASKS = ([0], [2, 5], [8], [1, 3, 4], [6, 7])  # layer ids of the 9-layer tiny UNet, one mask per candidate


def _generator(model_dir: Path, **kwargs: object) -> ImageGenerator:
    model = load_model(str(model_dir), device="cpu")
    return ImageGenerator(model, "ddim", True, **kwargs)  # type: ignore[arg-type]


def _compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _samples(n: int, seed: int = 0) -> SampleSet:
    return SampleSet.draw(n, (1, 8, 8), None, seed)


@pytest.mark.parametrize("scope", ["layers", "unet"])
def test_compiled_gives_the_eager_images(scope: str, tiny_model_dir: Path) -> None:
    eager = _generator(tiny_model_dir, batch_size=6)
    compiled = _generator(tiny_model_dir, batch_size=6, compile="default", compile_backend=BACKEND, compile_scope=scope)
    assert (compiled.runtime.network is not compiled.model.denoiser) == (scope == "unet")
    samples = _samples(10)
    for genome in (Genome(STEPS), Genome(STEPS, tuple(frozenset(m) for m in MASKS[:4]))):
        a, b = eager.generate(genome, samples), compiled.generate(genome, samples)
        assert a.shape == b.shape == (10, 1, 8, 8)
        assert (a.int() - b.int()).abs().max() <= 1, f"compiled differs from eager for {genome.skips}"
    skipped = Genome(STEPS, tuple(frozenset(m) for m in MASKS[:4]))
    assert not torch.equal(compiled.generate(Genome(STEPS), samples), compiled.generate(skipped, samples)), \
        "the masks changed nothing: skipping did not happen under compile"


def test_masks_switch_without_recompiling(tiny_model_dir: Path) -> None:
    torch._dynamo.reset()
    counters.clear()
    generator = _generator(tiny_model_dir, batch_size=4, compile="default", compile_backend=BACKEND)
    samples = _samples(7)  # two batches: 4 and 3 (padded to 4)
    generator.generate(Genome(STEPS), samples)  # every layer runs: each layer shape compiles once
    warm = _compiled_graphs()
    assert warm > 0
    for k in range(len(MASKS)):
        masks = tuple(frozenset(MASKS[(k + i) % len(MASKS)]) for i in range(len(STEPS)))
        generator.generate(Genome(STEPS, masks), samples)
    assert _compiled_graphs() == warm, f"{_compiled_graphs() - warm} recompilations over {len(MASKS)} candidates"


def test_hooks_under_whole_model_compile_do_recompile(tiny_model_dir: Path) -> None:
    """The counter sees recompilations: the hook-based skipping under torch.compile of the whole UNet
    recompiles for new masks (why the gates exist)."""
    from autodiff_opt.arch import LayerSkipper

    torch._dynamo.reset()
    counters.clear()
    unet = load_model(str(tiny_model_dir)).denoiser
    skipper, compiled = LayerSkipper(unet), torch.compile(unet, backend=BACKEND, dynamic=False)
    x, t = torch.randn(1, 1, 8, 8), torch.full((1,), 500)
    with torch.no_grad():
        compiled(x, t)
        warm = _compiled_graphs()
        for mask in MASKS[:2]:
            with skipper.skipping(mask):
                compiled(x, t)
    assert _compiled_graphs() >= warm + 2


def test_bf16_runs_in_bf16_and_is_close_to_fp32(tiny_model_dir: Path) -> None:
    fp32, bf16 = _generator(tiny_model_dir, batch_size=8), _generator(tiny_model_dir, batch_size=8, precision="bf16")
    seen: list[torch.dtype] = []
    bf16.model.denoiser.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    samples = _samples(8)
    a, b = fp32.generate(Genome(STEPS), samples), bf16.generate(Genome(STEPS), samples)
    assert set(seen) == {torch.bfloat16}, f"the UNet ran in {set(seen)} under precision=bf16"
    diff = (a.float() - b.float()).abs()
    far = float((diff > 16).float().mean())  # an untrained UNet: a rare pixel near the clip edge moves more
    assert diff.mean() < 2.0 and far < 0.02, f"bf16 far from fp32: mean {diff.mean():.2f}/255, {far:.1%} beyond 16"


def test_padded_last_batch_gives_the_unpadded_images(tiny_model_dir: Path) -> None:
    padded = _generator(tiny_model_dir, batch_size=4, pad=True)
    plain = _generator(tiny_model_dir, batch_size=4, pad=False)
    calls: list[int] = []
    padded.model.denoiser.register_forward_pre_hook(lambda module, args: calls.append(int(args[0].shape[0])))
    samples = _samples(6)
    a, b = padded.generate(Genome(STEPS), samples), plain.generate(Genome(STEPS), samples)
    assert calls == [4] * (2 * len(STEPS)), f"network calls had batch sizes {calls}, not one static shape"
    assert a.shape == b.shape == (6, 1, 8, 8)
    assert (a.int() - b.int()).abs().max() <= 1


def test_pad_batch_repeats_the_first_row() -> None:
    noise, labels = torch.arange(6.0).reshape(3, 2), torch.tensor([4, 5, 6])
    x, y = pad_batch(noise, labels, 5)
    assert x.tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]] and y.tolist() == [4, 5, 6, 4, 4]
    assert pad_batch(noise, None, 3)[0] is noise


def test_auto_batch_off_cuda_is_the_fixed_default(tiny_model_dir: Path) -> None:
    assert _generator(tiny_model_dir, batch_size="auto").batch_size == CPU_AUTO_BATCH


def test_features_run_in_float32_under_a_generation_autocast() -> None:
    from autodiff_opt.metrics.fid import FIDScorer

    scorer = FIDScorer("test-randconv")
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    plain = scorer.features(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = scorer.features(images)
        assert torch.nn.functional.conv2d(torch.ones(1, 3, 4, 4), torch.ones(2, 3, 3, 3)).dtype == torch.bfloat16
    assert (plain == inside).all()


def test_precision_fp8_is_refused_before_any_work(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    out = subprocess.run([sys.executable, "-m", "autodiff_opt", "precision=fp8", "device=cpu", f"storage.url=sqlite:///{db}",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert errors == ["error: precision='fp8' is not one of fp32, bf16, fp16: use precision=fp32, bf16 or fp16"]
    assert not db.exists(), "the storage was opened before the setting was refused"


@pytest.mark.parametrize("settings, message", [
    ({"precision": "fp16", "device": "cpu"}, "precision=fp16 needs CUDA \\(this run is on cpu"),
    ({"compile": "yes"}, "compile='yes' is not one of off, default, max-autotune"),
    ({"compile": False}, "compile='False' is not one of"),  # a YAML `compile: off` arrives as a boolean
])
def test_check_runtime_refuses(settings: dict[str, object], message: str) -> None:
    from autodiff_opt import preflight
    from autodiff_opt.config import Config
    from autodiff_opt.core.errors import ConfigError

    base = {"precision": "bf16", "device": "cpu", "compile": "default"}
    preflight.check_runtime(Config(**base))
    with pytest.raises(ConfigError, match=message):
        preflight.check_runtime(Config(**{**base, **settings}))  # type: ignore[arg-type]


def test_check_search_batch_size() -> None:
    from autodiff_opt import preflight
    from autodiff_opt.config import SearchConfig
    from autodiff_opt.core.errors import ConfigError

    for good in (1, 512, "auto"):
        preflight.check_search(SearchConfig(batch_size=good))
    for bad in ("many", 0, 2.5, True):
        with pytest.raises(ConfigError, match="search.batch_size=.*use a whole number of at least 1, or auto"):
            preflight.check_search(SearchConfig(batch_size=bad))


def test_cost_model_counts_the_eager_layers_of_a_compiled_model(tiny_model_dir: Path) -> None:
    """FlopCounterMode sees every operation: under a dispatch mode the gates run the eager forward."""
    from autodiff_opt.arch import measure_layer_costs

    reference = measure_layer_costs(load_model(str(tiny_model_dir)).denoiser)
    generator = _generator(tiny_model_dir, batch_size=2, compile="default", compile_backend=BACKEND)
    skipper = generator.runtime.skipper

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the compiled forward ran under FlopCounterMode")

    for gate in skipper.gates.values():
        gate.run = never
    costs = measure_layer_costs(generator.model.denoiser, skipper)
    assert (costs.full_step, costs.savings) == (reference.full_step, reference.savings)
    with pytest.raises(AssertionError, match="compiled forward ran"):  # outside the counter, `run` is what runs
        generator.generate(Genome(STEPS), _samples(2))


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu(tmp_path: Path) -> None:
    """experiments/bench_gpu.py end to end with tiny settings: both modes timed, the cost model's FLOPs
    (measure_layer_costs; about 6.73 MFLOPs per image-step of the digits model, docs/digits.md), a
    candidate's time split."""
    import json

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(root / "experiments" / "bench_gpu.py"), "--device", "cpu",
                           "--models", "digits", "--modes", "eager,compiled", "--compile-backend", BACKEND,
                           "--precision", "fp32", "--batch", "4", "--batches", "1", "--steps", "2",
                           "--candidate-samples", "8", "--matmul-size", "256", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["rows"]] == ["eager", "compiled"]
    from autodiff_opt.arch import measure_layer_costs

    full_step = measure_layer_costs(load_model("builtin:digits-ddpm").denoiser).full_step  # the stage-2 cost model
    for row in result["rows"]:
        assert row["gflop_per_image_step"] * 1e9 == pytest.approx(full_step, rel=1e-9)
        assert row["gflop_per_image_step"] == pytest.approx(6.73e-3, rel=0.02)  # docs/digits.md's 6.73 MFLOPs
        assert row["image_steps_per_s"] > 0
        assert row["fraction"] == pytest.approx(row["image_steps_per_s"] * full_step / result["peak_flops"], rel=1e-6)
    (split,) = result["candidates"]
    assert split["samples"] == 8 and split["feature_dim"] > 0
    assert split["generation_s"] > 0 and split["features_s"] > 0 and split["fid_formula_s"] > 0
    assert split["total_s"] == pytest.approx(split["generation_s"] + split["features_s"] + split["fid_formula_s"])
    assert split["total_s"] < wall  # timed inside the run, not made up


def test_candidate_timing_gives_each_part_its_own_time(tiny_model_dir: Path) -> None:
    """experiments/bench_eval.time_candidate on the real generator and scorer, each part slowed by a known
    sleep: a part's time holds its own sleep and not the others' (no part timed over another's span)."""
    import importlib.util

    from autodiff_opt.metrics.fid import FIDScorer, fid_from_stats

    spec = importlib.util.spec_from_file_location("bench_eval", Path(__file__).resolve().parents[1] / "experiments"
                                                  / "bench_eval.py")
    bench_eval = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench_eval)  # type: ignore[union-attr]
    generator, scorer = _generator(tiny_model_dir), FIDScorer("test-randconv")
    samples = _samples(4)
    reference = scorer.statistics(generator.generate(Genome(STEPS), _samples(8, seed=1)))

    def slowed(fn, seconds: float):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return run

    generator.generate = slowed(generator.generate, 0.6)  # type: ignore[method-assign]
    scorer.statistics = slowed(scorer.statistics, 0.3)  # type: ignore[method-assign]
    t = bench_eval.time_candidate(generator, scorer, Genome(STEPS), samples, reference, slowed(fid_from_stats, 0.05))
    assert set(t) == {"generate", "features", "fid"}
    assert 0.6 <= t["generate"] and 0.3 <= t["features"] < 0.6 and 0.05 <= t["fid"] < 0.3, t
