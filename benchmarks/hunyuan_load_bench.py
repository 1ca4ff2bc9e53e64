"""Load a 13B HunyuanVideo checkpoint of random weights (diffusers layout) onto the GPU: time and memory.

Stages (each in its own process, each with a time limit):

1. ``write`` (CPU only): a random-weight ``HunyuanVideoTransformer3DModel`` checkpoint in the
   diffusers layout under a temporary folder: ``transformer/config.json``, safetensors shards of
   at most ``--shard-gb`` GB each (diffusers' conversion script uses 5 GB) and the index, with
   every tensor name and shape the model expects (1,264 tensors, 12.8 B parameters, 25.6 GB in
   bf16). Values: random mantissas and signs at the scale of PyTorch's default init (norm
   weights in [1, 2)), written with safetensors + NumPy only (no torch). Each shard is flushed
   and dropped from the page cache after it is written, so the load reads from disk.
2. ``load``: ``load_hunyuan_video(folder, dtype=bfloat16)`` on the default device (the GPU),
   timed; host memory sampled every 20 ms from ``/proc/self/status`` (anonymous and file-backed
   resident memory: the shards are memory-mapped, so their pages count as file-backed while
   read); GPU memory from the device's allocator statistics. A few tensors are compared with
   the files. With ``--forward``, one jitted dense forward pass on a small input (64 video
   tokens, 32 text tokens with 7 valid) checks the loaded model runs: compile + run and run times,
   output finite.

Writes one JSON (``--out``) and prints a short table last. The folder is deleted at the end
unless ``--keep``. The driver starts no JAX backend while its stages run (it would hold GPU
memory): the run record asks for the device only after them, when the load stage did not say.

GPU (one H200: 64 GB disk, 128 GB RAM; about 2-4 minutes, at most 240 + 330 s by the stage limits)::

    timeout 590 python -m benchmarks.hunyuan_load_bench --out $OUT/hunyuan_load.json

CPU smoke test (the tiny config, float32)::

    JAX_PLATFORMS=cpu python -m benchmarks.hunyuan_load_bench --config tiny --dtype float32 \\
        --shard-gb 0.0003 --out /tmp/hunyuan_load.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.harness import first_call, memory_stats, module_command, run_record
from models.evaluation.results import write_json
from models.evaluation.tables import markdown_table

_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="hunyuan-video-13b", help="a HunyuanVideo config name")
    p.add_argument("--blocks", default=None, help="DUAL,SINGLE: override the config's block counts (smoke tests)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="stored and loaded dtype")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB (diffusers: 5)")
    p.add_argument("--dir", default=None, help="checkpoint folder (default: a new temporary folder)")
    p.add_argument("--tmp-root", default=None, help="where the temporary folder goes (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="skip the forward-pass check")
    p.add_argument("--write-timeout", type=float, default=240.0, help="seconds allowed for the write stage")
    p.add_argument("--load-timeout", type=float, default=330.0, help="seconds allowed for load + forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="hunyuan_load.json", help="JSON result file")
    p.add_argument("--stage", choices=("all", "write", "load"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Memory readings
# ---------------------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


class MemorySampler:
    """Samples :func:`proc_status` every ``interval`` seconds in a thread; keeps the maxima."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, value in proc_status().items():
            self.peak[key] = max(self.peak.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def gpu_memory() -> dict[str, int] | None:
    """``bytes_in_use`` and ``peak_bytes_in_use`` of the default device (``None`` without stats)."""
    stats = memory_stats()
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


# ---------------------------------------------------------------------------------------------
# Stage 1: write
# ---------------------------------------------------------------------------------------------


def random_tensor(rng, shape: tuple[int, ...], name: str, dtype: str):
    """Random values at PyTorch's default-init scale: ``±[b, 2b)`` with ``b = 2^floor(log2(1 /
    sqrt(fan_in)))`` for matrices, ``[1, 2)`` for norm weights, ``±[1/16, 1/8)`` for biases."""
    import ml_dtypes
    import numpy as np

    n = math.prod(shape)
    if len(shape) >= 2:
        exponent = math.floor(math.log2(1.0 / math.sqrt(math.prod(shape[1:]))))
        signed = True
    elif name.endswith(".weight"):
        exponent, signed = 0, False
    else:
        exponent, signed = -4, True
    if dtype == "bfloat16":
        # bf16: sign (1 bit), exponent (8 bits, bias 127), mantissa (7 bits); random mantissa and sign.
        bits = rng.bit_generator.random_raw(-(-n // 4)).view(np.uint16)[:n]
        np.bitwise_and(bits, np.uint16(0x807F if signed else 0x007F), out=bits)
        np.bitwise_or(bits, np.uint16((exponent + 127) << 7), out=bits)
        return bits.view(ml_dtypes.bfloat16).reshape(shape)
    u = rng.random(n, dtype=np.float32)
    sign = np.where(rng.random(n, dtype=np.float32) < 0.5, -1.0, 1.0).astype(np.float32) if signed else 1.0
    return (sign * (1.0 + u) * np.float32(2.0**exponent)).astype(np.float32).reshape(shape)


def _flush_and_drop(path: pathlib.Path) -> None:
    """fsync ``path`` and drop its pages from the page cache (a later read comes from disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_config(name: str, blocks: str | None):
    """The named config, with ``blocks = "DUAL,SINGLE"`` block counts when given."""
    from models.hunyuan_video.config import get_config

    config = get_config(name)
    if blocks:
        dual, single = (int(v) for v in blocks.split(","))
        config = config.replace(name=f"{name}[{dual}+{single} blocks]", num_dual_layers=dual, num_single_layers=single)
    return config


def write_checkpoint(folder: pathlib.Path, config_name: str, blocks: str | None, dtype: str, shard_gb: float, seed: int) -> dict:
    """Writes the random checkpoint under ``folder/transformer``; returns what was written."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file

    from models.common.checkpoint import INDEX_NAME, expected_tensors
    from models.hunyuan_video.loading import diffusers_config
    from models.hunyuan_video.transformer import HunyuanVideoTransformer3DModel

    start = time.perf_counter()
    config = make_config(config_name, blocks)
    abstract = nnx.eval_shape(
        lambda: HunyuanVideoTransformer3DModel(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    )
    specs = expected_tensors(abstract)
    itemsize = 2 if dtype == "bfloat16" else 4
    limit = max(1, int(shard_gb * 1e9))
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():  # model order, split at the size limit (as diffusers does)
        nbytes = math.prod(spec.shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out = folder / "transformer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(diffusers_config(config), indent=2) + "\n")
    index = {name: i for i, name in enumerate(specs)}
    weight_map, total, names = {}, 0, []
    plan_s = time.perf_counter() - start

    def make(name: str):  # one generator per tensor: the same values whatever the thread order
        return random_tensor(np.random.default_rng([seed, index[name]]), specs[name].shape, name, dtype)

    for i, keys in enumerate(shards):
        file = out / f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            tensors = dict(zip(keys, pool.map(make, keys)))
        save_file(tensors, str(file), metadata={"format": "pt"})
        del tensors
        _flush_and_drop(file)
        weight_map.update({k: file.name for k in keys})
        total += file.stat().st_size
        names.append(file.name)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {
        "config": config.name,
        "dtype": dtype,
        "num_tensors": len(specs),
        "num_parameters": int(sum(math.prod(s.shape) for s in specs.values())),
        "bytes_on_disk": int(total),
        "shards": names,
        "plan_s": plan_s,
        "write_s": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------
# Stage 2: load (+ forward)
# ---------------------------------------------------------------------------------------------


def _check_some_tensors(model, folder: pathlib.Path, count: int = 4) -> list[str]:
    """Compares ``count`` tensors (spread over the shards) with the files; returns their names."""
    import numpy as np
    from flax import nnx
    from safetensors import safe_open

    from models.common.checkpoint import checkpoint_shards, expected_tensors

    specs = expected_tensors(model)
    flat = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    shards = list(checkpoint_shards(folder).items())
    checked = []
    for file, keys in shards[:: max(1, len(shards) // count)][:count]:
        key = keys[len(keys) // 2]
        spec = specs[key]
        with safe_open(str(file), framework="numpy") as f:
            stored = f.get_tensor(key)
        want = stored if spec.axes is None else np.transpose(stored, spec.axes)
        got = np.asarray(flat[spec.path])
        if got.dtype != want.dtype or not np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)):
            raise RuntimeError(f"loaded tensor {key!r} differs from {file.name}")
        checked.append(key)
    return checked


def _forward_check(model) -> dict:
    """One jitted dense forward pass on a small input: compile + run time, run time, finiteness."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from models.hunyuan_video.transformer import HunyuanConditioning

    cfg = model.config
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    latents = jax.random.normal(k1, (1, cfg.in_channels, 1, 16, 16), model.dtype)  # 1 x 8 x 8 = 64 tokens
    text_len, valid = 32, 7
    cond = HunyuanConditioning(
        jax.random.normal(k2, (1, text_len, cfg.text_dim), model.dtype),
        (jnp.arange(text_len) < valid).astype(jnp.int32)[None],
        jax.random.normal(k3, (1, cfg.pooled_dim), model.dtype),
        jnp.full((1,), 6.0, jnp.float32),
    )
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, latents, timestep, cond):
        return nnx.merge(graphdef, params).forward(latents, timestep, cond)[0]

    timestep = jnp.full((1,), 1000.0, jnp.float32)
    _, first = first_call(forward, params, latents, timestep, cond)  # compile + run
    out, second = first_call(forward, params, latents, timestep, cond)
    values = np.asarray(out, np.float32)
    return {
        "input": "latents [1, 16, 1, 16, 16] (64 video tokens), 32 text tokens (7 valid), guidance 6.0",
        "compile_and_run_s": first,
        "run_s": second,
        "output_finite": bool(np.isfinite(values).all()),
        "output_rms": float(np.sqrt(np.mean(values**2))),
    }


def load_stage(folder: pathlib.Path, dtype: str, forward: bool, save) -> dict:
    import jax
    from flax import nnx

    from models.hunyuan_video.loading import load_hunyuan_video

    jax.block_until_ready(jax.numpy.zeros(()))  # start the backend before the baseline reading
    result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    result["host_before"] = proc_status()
    result["gpu_before"] = gpu_memory()
    shards_read = []
    with MemorySampler() as sampler:
        start = time.perf_counter()
        model = load_hunyuan_video(folder, dtype=dtype, progress=shards_read.append)
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        result["load_s"] = time.perf_counter() - start
    result["host_peak_during_load"] = sampler.peak
    result["host_after"] = proc_status()
    result["gpu_after_load"] = gpu_memory()
    result["shards_read"] = len(shards_read)
    params = jax.tree.leaves(nnx.state(model))
    result["param_bytes"] = int(sum(p.size * p.dtype.itemsize for p in params))
    result["param_dtypes"] = sorted({str(p.dtype) for p in params})
    result["checked_tensors"] = _check_some_tensors(model, folder)
    save(result)  # kept if the forward check runs out of time
    if forward:
        result["forward"] = _forward_check(model)
        result["gpu_after_forward"] = gpu_memory()
    return result


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _stage(args, stage: str, folder: pathlib.Path, timeout: float, env: dict) -> dict:
    """Runs ``stage`` in a child process (its own memory high-water mark); returns its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        stage_out = f.name
    cmd = module_command(__file__, [
        "--stage", stage, "--stage-out", stage_out, "--dir", str(folder), "--config", args.config,
        "--dtype", args.dtype, "--shard-gb", str(args.shard_gb), "--seed", str(args.seed),
    ])  # fmt: skip
    if not args.forward:
        cmd.append("--no-forward")
    if args.blocks:
        cmd += ["--blocks", args.blocks]
    start = time.perf_counter()
    error = None
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            error = f"{stage} stage failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
    except subprocess.TimeoutExpired:
        error = f"{stage} stage exceeded {timeout:.0f} s"
    elapsed = time.perf_counter() - start
    saved = pathlib.Path(stage_out)
    result = json.loads(saved.read_text()) if saved.stat().st_size else {}
    saved.unlink()
    if error is not None:
        result["error"] = error
    result["stage_wall_s"] = elapsed
    return result


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def summary(result: dict) -> list[str]:
    """The Markdown table of a result: one (quantity, value) row per measured thing or error."""
    w, l = result.get("write", {}), result.get("load", {})
    rows = []
    if "error" in w:
        rows.append(("write", f"ERROR {w['error']}"))
    if "write_s" in w:
        checkpoint = (f"{w['config']}, {w['num_tensors']} tensors, {w['num_parameters']:,} parameters, "
                      f"{_gb(w['bytes_on_disk'])} GB in {len(w['shards'])} shards ({w['dtype']})")  # fmt: skip
        rows.append(("checkpoint", checkpoint))
        rows.append(("write (numpy + safetensors, page cache dropped)", f"{w['write_s']:.1f} s"))
    if "error" in l:
        rows.append(("load", f"ERROR {l['error']}"))
    if "load_s" in l:
        peak, gpu = l["host_peak_during_load"], l.get("gpu_after_load") or {}
        rate = l["param_bytes"] / 1e9 / l["load_s"]
        rss = [_gb(l["host_before"]["VmRSS"]), _gb(peak.get("VmRSS")), _gb(l["host_after"]["VmRSS"])]
        rows += [
            (f"load_hunyuan_video to {l['device']}",
             f"{l['load_s']:.1f} s ({_gb(l['param_bytes'])} GB of parameters, {rate:.2f} GB/s)"),
            ("host RSS before / peak / after", " / ".join(rss) + " GB"),
            ("host peak anonymous / file-backed (mmap) RSS", f"{_gb(peak.get('RssAnon'))} / {_gb(peak.get('RssFile'))} GB"),
            ("GPU in use after load / peak", f"{_gb(gpu.get('bytes_in_use'))} / {_gb(gpu.get('peak_bytes_in_use'))} GB"),
        ]  # fmt: skip
        if "forward" in l:
            fw = l["forward"]
            rows.append(("forward (64 + 32 tokens): compile+run / run",
                         f"{fw['compile_and_run_s']:.1f} s / {fw['run_s'] * 1e3:.0f} ms, finite={fw['output_finite']}"))
    return markdown_table(["quantity", "value"], rows)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.stage != "all":  # a child process
        folder = pathlib.Path(args.dir)
        save = lambda result: pathlib.Path(args.stage_out).write_text(json.dumps(result))  # noqa: E731
        if args.stage == "write":
            save(write_checkpoint(folder, args.config, args.blocks, args.dtype, args.shard_gb, args.seed))
        else:
            save(load_stage(folder, args.dtype, args.forward, save))
        return None

    created = args.dir is None
    folder = pathlib.Path(tempfile.mkdtemp(prefix="hunyuan_ckpt_", dir=args.tmp_root) if created else args.dir)
    write_env = dict(os.environ, JAX_PLATFORMS="cpu")  # the writer never touches the GPU
    result: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("stage")}}
    try:
        result["write"] = _stage(args, "write", folder, args.write_timeout, write_env)
        if "write_s" in result["write"]:
            result["load"] = _stage(args, "load", folder, args.load_timeout, dict(os.environ))
    finally:
        if created and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    result["meta"] = run_record(__file__, argv, device=result.get("load", {}).get("device"))
    write_json(args.out, result)
    print("\n".join(summary(result)))
    return result


if __name__ == "__main__":
    main()
