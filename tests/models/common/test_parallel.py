"""Guidance- and head-parallel sampling over several devices (``models.common.parallel``), on CPU.

The multi-device runs need host-platform devices (``--xla_force_host_platform_device_count=8``
in ``XLA_FLAGS``), which must be set before JAX starts, so they run once per test session in a
subprocess: this file run as a script (``python tests/models/common/test_parallel.py OUT_DIR``). It samples the
tiny Wan config with 4 heads on one device and on every mesh (guidance 2; heads 2 and 4;
2 x 2 and 2 x 4 on 8 devices), dense and DFS, two runs of different schedules per sampler, and
saves the latents, the per-step records, the mask caches, the shardings and the compiled
programs' collectives; it also samples the tiny HunyuanVideo fixture (2 heads, joint text +
video attention, two samples with different valid text lengths, no guidance batch) with DFS on
one device, head-parallel (1 x 2) and 2 x 2 (the samples, and with them their key lengths, split
over the guidance axis). The tests below compare them. Argument checks, error messages and the
command line need no second device and run in this process.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

MESHES = {"2x1": (2, 1), "1x2": (1, 2), "1x4": (1, 4), "2x2": (2, 2), "2x4": (2, 4)}
BACKENDS = ("dense", "dfs")
HOST_DEVICES = 8
LATENT = (16, 3, 16, 16)  # token grid 3 x 8 x 8 = 192 tokens: 12 blocks of 16
TEXT_LEN = 5
NUM_STEPS = (6, 8)  # the two runs of every sampler (one compiled program)
# float32 runs that differ in how XLA partitions the matmuls (batch 1 vs 2, L/h rows): observed
# 3.7e-7 relative after 8 steps; 1e-5 as in tests/sampling/test_sampler.py.
F32_TOL = 1e-5
# The meshes whose compiled programs the worker inspects (one compile more each).
INSPECTED = ("2x1", "2x4")
HUNYUAN_TINY = ROOT / "tests" / "fixtures" / "hunyuan_tiny"
HUNYUAN_MESHES = {"1x2": (1, 2), "2x2": (2, 2)}
HUNYUAN_STEPS = 6


def tiny_config():
    from models.wan.config import get_config

    return get_config("tiny").replace(name="tiny-4h", num_heads=4)  # head_dim 16


def dfs_configs():
    from dfsattn_jax.schedule import DFSConfig

    # Dense steps 0-1, refreshes at 2 and 4 (densities 0.5, 0.3); the second schedule differs.
    first = DFSConfig(density=0.5, density_decrement=0.2, dense_steps=2, refresh_interval=2,
                      tile_size=4, block_size=16, dense_layers=(0,))
    second = DFSConfig(density=0.4, density_decrement=0.1, dense_steps=3, refresh_interval=3,
                       tile_size=4, block_size=16, dense_layers=(0,))
    return first, second


# --------------------------------------------------------------------------- the worker


def _collectives(hlo: str) -> dict:
    """Counts of the collectives of a compiled program: all, the all-to-alls inside shard_map
    (the Ulysses exchanges) and those carrying integers (a mask exchange would)."""
    ops = re.compile(r"= (.*?) (all-to-all|all-gather|all-reduce|collective-permute|reduce-scatter)(?:-start)?\(")
    total = in_shard_map = integer = 0
    for line in hlo.splitlines():
        match = ops.search(line)
        if not match:
            continue
        total += 1
        if match.group(2) == "all-to-all" and "shard_map" in line:
            in_shard_map += 1
        if re.search(r"\b(?:[su](?:8|16|32|64)|pred)\[", match.group(1)):
            integer += 1
    return {"total": total, "shard_map_all_to_all": in_shard_map, "integer": integer}


def _per_sample_lengths() -> dict:
    """``head_parallel`` with a per-sample argument sharded like the batch (HunyuanVideo's valid
    key lengths ``kv_lengths [B]``), against the same attention on one device."""
    import jax
    import jax.numpy as jnp

    from dfsattn_jax.attention import block_sparse_attention
    from dfsattn_jax.layout import full_layout
    from models.common.parallel import Parallelism
    from models.common.processor import AttentionState

    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 64, 4, 8), np.float32)) for _ in range(3))
    lengths = jnp.asarray([64, 50, 17, 33], jnp.int32)

    def attend(q, k, v, state, kv_lengths):
        layout = full_layout(q.shape[0], q.shape[2], 4, 4)
        return block_sparse_attention(q, k, v, layout, block_size=16, kv_lengths=kv_lengths), state

    single, _ = jax.jit(attend)(q, k, v, AttentionState(), lengths)
    sharded, _ = jax.jit(lambda *a: Parallelism(2, 4).head_parallel(attend, *a))(q, k, v, AttentionState(), lengths)
    return {"lengths/single": np.asarray(single), "lengths/sharded": np.asarray(sharded)}


def hunyuan_inputs():
    """The tiny HunyuanVideo fixture's batch of 2 (valid text 38 and 9 of 64: joint length
    300 + 64) as a conditioning, with seeded noise."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from models.hunyuan_video.transformer import HunyuanConditioning

    io = load_file(HUNYUAN_TINY / "io.safetensors")
    cond = HunyuanConditioning(
        jnp.asarray(io["encoder_hidden_states"]), jnp.asarray(io["encoder_attention_mask"]).astype(jnp.int32),
        jnp.asarray(io["pooled_projections"]), jnp.asarray(io["guidance"] / np.float32(1000.0)),
    )  # fmt: skip
    return jax.random.normal(jax.random.key(7), io["hidden_states"].shape, jnp.float32), cond


def hunyuan_dfs():
    from dfsattn_jax.schedule import get_schedule_preset

    # Dense steps 0-1, refreshes at 2 and 4: dense (key lengths) and joint sparse steps.
    return dataclasses.replace(get_schedule_preset("hunyuan-video"), block_size=32, tile_size=8, dense_steps=2, refresh_interval=2)


def _hunyuan_runs() -> dict:
    """DFS sampling of the tiny HunyuanVideo model on one device and on the HunyuanVideo meshes."""
    from models.common.parallel import Parallelism
    from models.common.processor import AttentionBackend
    from models.hunyuan_video.loading import load_hunyuan_video
    from models.sampling import Sampler

    model = load_hunyuan_video(HUNYUAN_TINY, dtype="float32")
    noise, cond = hunyuan_inputs()
    arrays = {}
    for mesh, axes in {"1": None, **HUNYUAN_MESHES}.items():
        parallel = None if axes is None else Parallelism(*axes)
        sampler = Sampler(model, AttentionBackend("dfs", hunyuan_dfs()), shift=7.0, schedule="flow-match-euler",
                          parallel=parallel, progress=False)  # fmt: skip
        result = sampler(noise, cond, num_steps=HUNYUAN_STEPS)
        arrays[f"hunyuan/{mesh}/latents"] = np.asarray(result.latents)
        arrays[f"hunyuan/{mesh}/refreshed"] = result.refreshed
        arrays[f"hunyuan/{mesh}/skipped"] = result.skipped
        arrays[f"hunyuan/{mesh}/kv_indices"] = np.asarray(result.cache.kv_indices)
        arrays[f"hunyuan/{mesh}/kv_counts"] = np.asarray(result.cache.kv_counts)
    return arrays


def _worker(out: pathlib.Path) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.common.parallel import Parallelism
    from models.common.processor import AttentionBackend
    from models.sampling import Sampler
    from models.wan.transformer import WanTransformer3DModel

    assert jax.device_count() == HOST_DEVICES, jax.devices()
    cfg = tiny_config()
    model = WanTransformer3DModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(1)
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    nnx.update(model, jax.tree.unflatten(treedef, [
        jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32)) for x in leaves
    ]))  # fmt: skip
    rng = np.random.default_rng(2)
    noise = jnp.asarray(rng.standard_normal((1, *LATENT), np.float32))
    text, negative = (jnp.asarray(rng.standard_normal((1, TEXT_LEN, cfg.text_dim), np.float32)) for _ in range(2))
    first, second = dfs_configs()
    arrays, meta = {}, {}
    for backend_name in BACKENDS:
        backend = AttentionBackend(backend_name, first if backend_name == "dfs" else None)
        for mesh, axes in {"1": None, **MESHES}.items():
            parallel = None if axes is None else Parallelism(*axes)
            sampler = Sampler(model, backend, parallel=parallel, progress=mesh == "2x4")
            run = sampler._run
            calls = []
            sampler._run = lambda *args, run=run, calls=calls: calls.append(args) or run(*args)
            results = [
                sampler(noise, text, negative, num_steps=NUM_STEPS[0], guidance_scale=5.0),
                sampler(noise, text, negative, num_steps=NUM_STEPS[1], guidance_scale=3.0,
                        dfs=second if backend_name == "dfs" else None),
            ]  # fmt: skip
            key = f"{backend_name}/{mesh}"
            info = {"traces": sampler.trace_count, "step_s": [float(t) for t in results[0].step_s],
                    "compile_s": results[0].compile_s,
                    "latents_replicated": results[0].latents.sharding.is_fully_replicated,
                    "latents_devices": len(results[0].latents.sharding.device_set)}  # fmt: skip
            for i, result in enumerate(results):
                arrays[f"{key}/{i}/latents"] = np.asarray(result.latents)
                arrays[f"{key}/{i}/refreshed"] = result.refreshed
                arrays[f"{key}/{i}/skipped"] = result.skipped
                if result.cache is not None:
                    arrays[f"{key}/{i}/kv_indices"] = np.asarray(result.cache.kv_indices)
                    arrays[f"{key}/{i}/kv_counts"] = np.asarray(result.cache.kv_counts)
            if results[0].cache is not None:
                indices = results[0].cache.kv_indices
                info["cache_shard_shape"] = list(indices.sharding.shard_shape(indices.shape))
                info["cache_shape"] = list(indices.shape)
            if backend_name == "dfs" and mesh in INSPECTED:
                info["collectives"] = _collectives(run.lower(*calls[0]).compile().as_text())
            meta[key] = info
    arrays.update(_per_sample_lengths())
    arrays.update(_hunyuan_runs())
    np.savez(out / "runs.npz", **arrays)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


# --------------------------------------------------------------------------- the fixture


@dataclasses.dataclass(frozen=True)
class Runs:
    arrays: dict
    meta: dict

    def get(self, backend: str, mesh: str, run: int, field: str) -> np.ndarray:
        return self.arrays[f"{backend}/{mesh}/{run}/{field}"]


def _run_worker(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={HOST_DEVICES}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    if done.returncode != 0:
        (out / "failed.txt").write_text(done.stdout[-4000:] + done.stderr[-8000:])


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    """The worker's results, computed once per session (under pytest-xdist: once for all workers,
    behind a file lock in the run's shared temporary folder)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / "parallel_runs"
    with open(root / "parallel_runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "meta.json").exists() and not (out / "failed.txt").exists():
            _run_worker(out)
    if (out / "failed.txt").exists():
        pytest.fail("the multi-device worker failed:\n" + (out / "failed.txt").read_text())
    with np.load(out / "runs.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return Runs(arrays, json.loads((out / "meta.json").read_text()))


# --------------------------------------------------------------------------- sharded == single

CASES = [(backend, mesh) for backend in BACKENDS for mesh in MESHES]


def _rel_l2(a, b) -> float:
    from helpers import rel_l2

    return rel_l2(a, b)


def test_single_device_runs_exercise_dfs(runs):
    """The references are not trivial: DFS refreshed and skipped blocks, and differs from dense."""
    for run in (0, 1):
        refreshed = runs.get("dfs", "1", run, "refreshed")
        assert refreshed.sum() > 0 and runs.get("dfs", "1", run, "skipped").max() > 0.2
        assert np.all(runs.get("dense", "1", run, "refreshed") == 0)
        assert _rel_l2(runs.get("dfs", "1", run, "latents"), runs.get("dense", "1", run, "latents")) > 1e-3
    np.testing.assert_array_equal(np.flatnonzero(runs.get("dfs", "1", 0, "refreshed")), [2, 4])


@pytest.mark.parametrize("backend, mesh", CASES)
def test_sharded_sampler_equals_single_device(runs, backend, mesh):
    for run in (0, 1):
        out = runs.get(backend, mesh, run, "latents")
        ref = runs.get(backend, "1", run, "latents")
        assert out.shape == (1, *LATENT) and np.all(np.isfinite(out))
        assert _rel_l2(out, ref) < F32_TOL, (backend, mesh, run)
        np.testing.assert_array_equal(runs.get(backend, mesh, run, "refreshed"), runs.get(backend, "1", run, "refreshed"))
        np.testing.assert_allclose(runs.get(backend, mesh, run, "skipped"), runs.get(backend, "1", run, "skipped"),
                                   rtol=1e-6, atol=0)  # fmt: skip


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_masks_equal_single_device(runs, mesh):
    """Each device scores and selects for its own heads: the gathered cache equals one device's."""
    for run in (0, 1):
        counts = runs.get("dfs", mesh, run, "kv_counts")
        np.testing.assert_array_equal(counts, runs.get("dfs", "1", run, "kv_counts"))
        indices, ref = runs.get("dfs", mesh, run, "kv_indices"), runs.get("dfs", "1", run, "kv_indices")
        visited = np.arange(indices.shape[-1]) < counts[..., None]
        np.testing.assert_array_equal(np.where(visited, indices, -1), np.where(visited, ref, -1))


@pytest.mark.parametrize("backend, mesh", CASES)
def test_compiled_once_per_schedule(runs, backend, mesh):
    """Two runs (6 and 8 steps, other densities and guidance scale) share one program."""
    assert runs.meta[f"{backend}/{mesh}"]["traces"] == 1
    assert runs.meta[f"{backend}/1"]["traces"] == 1


@pytest.mark.parametrize("backend, mesh", CASES)
def test_latents_replicated_and_cache_sharded_like_the_heads(runs, backend, mesh):
    info = runs.meta[f"{backend}/{mesh}"]
    guidance, heads = MESHES[mesh]
    assert info["latents_replicated"] and info["latents_devices"] == guidance * heads
    if backend == "dfs":
        slots, batch, num_heads, nq, kmax = info["cache_shape"]
        assert (batch, num_heads) == (2, tiny_config().num_heads)
        assert info["cache_shard_shape"] == [slots, batch // guidance, num_heads // heads, nq, kmax]


def test_head_parallel_exchanges_activations_not_masks(runs):
    """Ulysses: four all-to-alls per layer (q, k, v in, the output back) and no collective
    carrying integers anywhere (the mask cache never leaves its device); guidance-parallel
    alone needs no all-to-all."""
    layers = tiny_config().num_layers
    both = runs.meta["dfs/2x4"]["collectives"]
    assert both["shard_map_all_to_all"] == 4 * layers
    assert both["integer"] == 0
    guidance = runs.meta["dfs/2x1"]["collectives"]
    assert guidance["shard_map_all_to_all"] == 0 and guidance["integer"] == 0
    assert guidance["total"] >= 1  # the guidance combine reads the other half


def test_head_parallel_shards_per_sample_lengths_like_the_batch(runs):
    single, sharded = runs.arrays["lengths/single"], runs.arrays["lengths/sharded"]
    assert np.all(np.isfinite(single)) and float(np.abs(single).max()) > 0.1
    assert _rel_l2(sharded, single) < F32_TOL


def test_hunyuan_single_device_run_exercises_joint_dfs(runs):
    """The HunyuanVideo reference is not trivial: it refreshed at steps 2 and 4 and skipped blocks."""
    np.testing.assert_array_equal(np.flatnonzero(runs.arrays["hunyuan/1/refreshed"]), [2, 4])
    assert runs.arrays["hunyuan/1/skipped"].max() > 0.2


@pytest.mark.parametrize("mesh", HUNYUAN_MESHES)
def test_hunyuan_sharded_sampler_equals_single_device(runs, mesh):
    """HunyuanVideo (joint attention, per-sample key lengths, no guidance batch) head-parallel
    and 2 x 2: the latents, records and masks of one device."""
    get = lambda field, m=mesh: runs.arrays[f"hunyuan/{m}/{field}"]  # noqa: E731
    out, ref = get("latents"), get("latents", "1")
    assert out.shape == ref.shape and np.all(np.isfinite(out))
    assert _rel_l2(out, ref) < F32_TOL
    np.testing.assert_array_equal(get("refreshed"), get("refreshed", "1"))
    np.testing.assert_allclose(get("skipped"), get("skipped", "1"), rtol=1e-6, atol=0)
    counts = get("kv_counts")
    np.testing.assert_array_equal(counts, get("kv_counts", "1"))
    visited = np.arange(get("kv_indices").shape[-1]) < counts[..., None]
    np.testing.assert_array_equal(np.where(visited, get("kv_indices"), -1), np.where(visited, get("kv_indices", "1"), -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_progress_and_step_times_on_several_devices(runs, backend):
    info = runs.meta[f"{backend}/2x4"]
    assert len(info["step_s"]) == NUM_STEPS[0]
    assert all(np.isfinite(info["step_s"])) and min(info["step_s"]) > 0
    assert np.isfinite(info["compile_s"]) and info["compile_s"] > 0


# --------------------------------------------------------------------------- argument checks


def test_parallelism_rejects_bad_axis_sizes():
    from models.common.parallel import Parallelism

    for kwargs, fragment in (
        ({"guidance": 0}, "guidance must be a positive integer, got 0"),
        ({"heads": -2}, "heads must be a positive integer, got -2"),
        ({"heads": 1.5}, "heads must be a positive integer, got 1.5"),
        ({"guidance": 2, "heads": 2, "devices": ("a", "b")}, "devices must hold guidance x heads = 2 x 2 = 4 devices, got 2"),
    ):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            Parallelism(**kwargs)


@pytest.mark.parametrize(
    "axes, problem, fragment",
    [
        ((1, 3), dict(batch=2, num_heads=4, num_tokens=192),
         "heads (the head-parallel axis) must divide the model's 4 attention heads, got heads=3; use one of [1, 2, 4]"),
        ((4, 1), dict(batch=2, num_heads=4, num_tokens=192, guided=True),
         "guidance (the batch-parallel axis) must divide the model batch 2 (cond + uncond), got guidance=4; "
         "use one of [1, 2]"),
        ((2, 1), dict(batch=1, num_heads=4, num_tokens=192, guided=False),
         "must divide the model batch 1 (no guidance: use the 'heads' mode), got guidance=2"),
        ((1, 4), dict(batch=2, num_heads=4, num_tokens=190),
         "heads (the head-parallel axis) must divide the 190 tokens (the sequence is sharded between attentions), "
         "got heads=4; common divisors of the heads and tokens: [1, 2]"),
    ],
)
def test_check_names_the_axis_and_what_fits(axes, problem, fragment):
    from models.common.parallel import Parallelism

    with pytest.raises(ValueError, match=re.escape(fragment)):
        Parallelism(*axes).check(**problem)


def test_mesh_needs_enough_devices():
    import jax

    from models.common.parallel import Parallelism

    count = jax.device_count()
    with pytest.raises(ValueError, match=rf"needs {count + 1} devices, {count} cpu device\(s\) available .*"
                                          rf"xla_force_host_platform_device_count={count + 1}"):
        Parallelism(heads=count + 1).mesh  # noqa: B018


def test_make_parallel_splits_device_counts_and_reads_meshes():
    import jax
    from jax.sharding import Mesh

    from models.common.parallel import Parallelism, make_parallel

    axes = lambda p: None if p is None else (p.guidance, p.heads)  # noqa: E731
    assert make_parallel(None) is None and make_parallel(1, "both") is None
    assert axes(make_parallel(8)) == (2, 4) and axes(make_parallel(8, guided=False)) == (1, 8)
    assert axes(make_parallel(3)) == (1, 3) and axes(make_parallel(2, "guidance")) == (2, 1)
    assert axes(make_parallel(4, "heads")) == (1, 4) and axes(make_parallel(4, "both")) == (2, 2)
    given = Parallelism(2, 2)
    assert make_parallel(given) is given
    one = np.asarray(jax.devices()[:1], dtype=object)
    from_mesh = make_parallel(Mesh(one.reshape(1, 1), ("heads", "guidance")))
    assert axes(from_mesh) == (1, 1) and from_mesh.devices == (jax.devices()[0],)
    assert axes(make_parallel(Mesh(one, ("heads",)))) == (1, 1)
    for spec, mode, fragment in (
        (0, "auto", "devices must be a positive integer, got 0"),
        (True, "auto", "devices must be a positive integer, a Mesh or a Parallelism, got True"),
        ("2", "auto", "devices must be a positive integer, got '2'"),
        (3, "both", "mode 'both' (2 x N/2 devices) needs an even device count, got 3"),
        (2, "sequence", "mode must be one of ('auto', 'guidance', 'heads', 'both'), got 'sequence'"),
        (Mesh(one.reshape(1, 1), ("data", "heads")), "auto", "mesh axes must be 'guidance' and/or 'heads', got ('data', 'heads')"),
    ):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            make_parallel(spec, mode)


def test_backend_takes_a_parallelism_and_no_hooks_with_it():
    from models.common.parallel import Parallelism
    from models.common.processor import AttentionBackend, AttentionHooks

    class Probing(AttentionHooks):
        pass

    with pytest.raises(ValueError, match="parallel must be a Parallelism or None, got int"):
        AttentionBackend("dense", parallel=2)
    with pytest.raises(ValueError, match="hooks run on one device"):
        AttentionBackend("dfs", hooks=Probing(), parallel=Parallelism(heads=2))
    assert AttentionBackend("dfs", parallel=Parallelism(heads=2)).parallel == Parallelism(heads=2)


@pytest.fixture(scope="module")
def model4():
    import jax.numpy as jnp
    from flax import nnx

    from models.wan.transformer import WanTransformer3DModel

    return WanTransformer3DModel(tiny_config(), rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)


def _inputs(batch: int = 1, latent=LATENT):
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    noise = jnp.asarray(rng.standard_normal((batch, *latent), np.float32))
    text = jnp.asarray(rng.standard_normal((batch, TEXT_LEN, tiny_config().text_dim), np.float32))
    return noise, text, text[::-1] * 0.5


def test_sampler_checks_heads_batch_tokens_and_devices(model4):
    import jax

    from models.common.parallel import Parallelism
    from models.sampling import Sampler

    with pytest.raises(ValueError, match=re.escape("must divide the model's 4 attention heads, got heads=3")):
        Sampler(model4, "dense", parallel=Parallelism(heads=3))
    noise, text, negative = _inputs()
    with pytest.raises(ValueError, match=re.escape("must divide the model batch 1 (no guidance: use the 'heads' mode)")):
        Sampler(model4, "dense", parallel=Parallelism(guidance=2), progress=False)(noise, text, num_steps=2)
    odd = _inputs(latent=(16, 3, 14, 14))  # 3 x 7 x 7 = 147 tokens
    with pytest.raises(ValueError, match=re.escape("must divide the 147 tokens")):
        Sampler(model4, "dfs", parallel=Parallelism(heads=2), progress=False)(*odd, num_steps=2)
    count = jax.device_count()
    if 4 % (count + 1) == 0:  # a head split the model allows, on more devices than exist
        parallel = Parallelism(heads=count + 1)
    else:
        parallel = Parallelism(guidance=2, heads=2)
    assert parallel.size > count
    with pytest.raises(ValueError, match=f"needs {parallel.size} devices, {count} cpu device"):
        Sampler(model4, "dense", parallel=parallel, progress=False)(noise, text, negative, num_steps=2)


def test_sampler_on_a_one_device_mesh_equals_no_mesh(model4):
    """Parallelism(1, 1): the shard_map path on one device gives the same latents bit for bit."""
    from models.common.parallel import Parallelism
    from models.common.processor import AttentionBackend
    from models.sampling import Sampler

    backend = AttentionBackend("dfs", dfs_configs()[0])
    noise, text, negative = _inputs()
    plain = Sampler(model4, backend, progress=False)(noise, text, negative, num_steps=5)
    meshed = Sampler(model4, backend, parallel=Parallelism(), progress=False)(noise, text, negative, num_steps=5)
    assert plain.refreshed.sum() > 0
    np.testing.assert_array_equal(np.asarray(meshed.latents), np.asarray(plain.latents))
    np.testing.assert_array_equal(np.asarray(meshed.cache.kv_indices), np.asarray(plain.cache.kv_indices))


def test_hunyuan_joint_length_must_divide_the_heads_axis():
    """Head-parallel splits the whole joint sequence (video + text): 300 + 63 tokens do not split
    over 2 devices, named before anything runs (the default auto mode would also pick a guidance
    axis that a batch of 1 without CFG cannot fill)."""
    import jax

    from models.common.parallel import Parallelism
    from models.hunyuan_video.loading import load_hunyuan_video
    from models.sampling import Sampler

    model = load_hunyuan_video(HUNYUAN_TINY, dtype="float32")
    noise, cond = hunyuan_inputs()
    short = cond._replace(prompt_embeds=cond.prompt_embeds[:, :63], prompt_attention_mask=cond.prompt_attention_mask[:, :63])
    sampler = Sampler(model, "dense", schedule="flow-match-euler", parallel=Parallelism(heads=2), progress=False)
    with pytest.raises(ValueError, match=re.escape("must divide the 363 tokens") + ".*" + re.escape("got heads=2")):
        sampler(noise, short, num_steps=2)
    with pytest.raises(ValueError, match=re.escape("must divide the model batch 1 (no guidance: use the 'heads' mode)")):
        Sampler(model, "dense", schedule="flow-match-euler", parallel=Parallelism(guidance=2), progress=False)(
            noise[:1], jax.tree.map(lambda x: x[:1], cond), num_steps=2
        )


# --------------------------------------------------------------------------- the command line


def _stub_loader(monkeypatch, module, name: str) -> tuple[list, type]:
    """Replaces ``module.name`` (a weight loader) with one that records its call and raises the
    returned exception type: a check that fires first leaves it uncalled."""
    calls = []

    class WeightsRead(Exception):
        pass

    def load(*args, **kwargs):
        calls.append(args)
        raise WeightsRead

    monkeypatch.setattr(module, name, load)
    return calls, WeightsRead


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """``dfsattn-generate`` on the tiny fixture checkpoint (2 heads, 144 tokens) with a weight
    loader that records its call and stops: a check that fires first leaves it uncalled."""
    from safetensors.numpy import load_file, save_file

    import models.generate as generate

    fixture = ROOT / "tests" / "fixtures" / "wan_tiny"
    text = load_file(fixture / "io.safetensors")["encoder_hidden_states"]
    embeds = tmp_path / "prompt.safetensors"
    save_file({"cond": text[0], "uncond": text[1]}, str(embeds))
    calls, weights_read = _stub_loader(monkeypatch, generate, "load_wan")
    base = ["--checkpoint", str(fixture), "--prompt-embeds", str(embeds), "--out", str(tmp_path / "lat.safetensors"),
            "--frames", "9", "--height", "96", "--width", "128", "--steps", "3", "--dtype", "float32"]  # fmt: skip
    return base, calls, weights_read


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--devices", "0"], "--devices must be a positive integer, got 0"),
        (["--devices", "3", "--parallel", "both"], "--devices 3 --parallel both: mode 'both' (2 x N/2 devices) needs an even"),
        (["--devices", "4", "--parallel", "heads"], "--devices 4 --parallel heads: heads (the head-parallel axis) must "
                                                     "divide the model's 2 attention heads, got heads=4"),
        (["--devices", "4", "--parallel", "guidance"], "must divide the model batch 2 (cond + uncond), got guidance=4"),
        (["--devices", "2", "--parallel", "guidance", "--guidance", "1"], "must divide the model batch 1"),
        (["--devices", "4", "--parallel", "both"], "--devices 4 --parallel both: parallelism 2 (guidance) x 2 (heads) "
                                                    "needs 4 devices"),
        (["--parallel", "rows"], "--parallel"),
    ],
)
def test_cli_checks_devices_before_reading_weights(cli, capsys, extra, fragment):
    from models.generate import PROG, main

    base, calls, _ = cli
    assert main(base + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: ") and fragment in err[0], err
    assert calls == []


@pytest.fixture
def hunyuan_cli(tmp_path, monkeypatch):
    """``dfsattn-generate --model hunyuan-video`` on the tiny fixture (2 heads; 768 video + 64 text
    tokens), with the weight loader replaced as in :func:`cli`."""
    from safetensors.numpy import load_file, save_file

    import models.generate as generate

    io = load_file(HUNYUAN_TINY / "io.safetensors")
    embeds = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeds": io["encoder_hidden_states"][0],
               "prompt_attention_mask": io["encoder_attention_mask"][0].astype(np.int32),
               "pooled_prompt_embeds": io["pooled_projections"][0]}, str(embeds))  # fmt: skip
    calls, weights_read = _stub_loader(monkeypatch, generate, "load_hunyuan_video")
    base = ["--model", "hunyuan-video", "--checkpoint", str(HUNYUAN_TINY), "--prompt-embeds", str(embeds),
            "--out", str(tmp_path / "lat.safetensors"), "--frames", "9", "--height", "256", "--width", "256",
            "--steps", "3", "--dtype", "float32"]  # fmt: skip
    return base, calls, weights_read


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--devices", "2", "--parallel", "guidance"], "--devices 2 --parallel guidance: guidance (the batch-parallel "
                                                       "axis) must divide the model batch 1 (no guidance: use the 'heads' mode)"),
        (["--devices", "4", "--parallel", "heads"], "must divide the model's 2 attention heads, got heads=4"),
        (["--devices", "2"], "--devices 2 --parallel auto: parallelism 1 (guidance) x 2 (heads) needs 2 devices"),
    ],
)
def test_cli_checks_hunyuan_devices_before_reading_weights(hunyuan_cli, capsys, extra, fragment):
    """HunyuanVideo has no guidance batch: auto picks heads over the joint sequence."""
    import jax

    from models.generate import PROG, main

    base, calls, _ = hunyuan_cli
    if jax.device_count() >= 2 and extra == ["--devices", "2"]:
        pytest.skip("needs a single-device process")
    assert main(base + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: ") and fragment in err[0], err
    assert calls == []


def test_cli_one_device_reaches_the_loader(cli):
    from models.generate import main

    base, calls, weights_read = cli
    with pytest.raises(weights_read):
        main(base + ["--devices", "1", "--parallel", "heads"])
    assert len(calls) == 1


if __name__ == "__main__":
    _worker(pathlib.Path(sys.argv[1]))
