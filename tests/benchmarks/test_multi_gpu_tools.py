"""The multi-device benchmark tools on CPU: ``python -m benchmarks.multi_gpu_diag`` end to end on
two host devices (a subprocess: the device count is fixed before JAX starts), its driver's failure
paths, and the validity rules of ``benchmarks.multi_gpu_bench`` and ``benchmarks.multi_gpu_check``
(pure functions on small record dicts, no model)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks import multi_gpu_bench as bench
from benchmarks import multi_gpu_check as check
from benchmarks import multi_gpu_diag as diag
from helpers import ROOT

TINY = ["--config", "tiny", "--layers", "2", "--frames", "9", "--height", "128", "--width", "128",
        "--block-size", "16", "--tile-size", "4"]  # fmt: skip
# 3 x 8 x 8 = 192 tokens: 12 key blocks of 16, density 0.2 keeps 2; layer 0 dense, layer 1 sparse.
NUM_BLOCKS, SPARSE_LAYERS = 2, [1]
# float32 sharded vs one device: observed bit-identical on CPU; 1e-5 as tests/models/common/test_parallel.py
# (XLA may partition the matmuls differently: rounding only).
F32_TOL = 1e-5


# --------------------------------------------------------------------------- multi_gpu_diag


@pytest.fixture(scope="module")
def diag_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "diag.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    variants = "default,sparse=xla+scoring=jnp+env=no-command-buffer"
    cmd = [sys.executable, "-m", "benchmarks.multi_gpu_diag", *TINY, "--variants", variants, "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, out


def test_diag_smoke_on_two_host_devices(diag_run):
    """Every variant ran every stage on one device, 2x1 and 1x2; all finite, refreshes kept the
    asked blocks, and sharded equals one device (output and masks) within float32 rounding."""
    done, out = diag_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| variant | parallel | stage |"))
    assert len(lines) - header == 2 + 2 * 12 and all(line.startswith("| ") for line in lines[header + 2:])  # last
    data = json.loads(out.read_text())
    assert [v["variant"] for v in data["variants"]] == ["default", "sparse=xla+scoring=jnp+env=no-command-buffer"]
    for var in data["variants"]:
        assert var["error"] is None
        records = var["records"]
        assert [(r["parallel"], r["stage"]) for r in records] == [
            (p, s) for p in ("none", "2x1 (guidance)", "1x2 (heads)")
            for s in ("forward-dense", "forward-refresh", "forward-sparse", "sampler")
        ]  # fmt: skip
        for r in records:
            assert r["finite_fraction"] == 1.0, r
            assert r["abs_max"] > 0, r
            if r["stage"] != "forward-dense":
                assert r["kept_mean_per_slot"] == [NUM_BLOCKS] and r["slot_layers"] == SPARSE_LAYERS, r
                assert r["first_short_layer"] is None
            if r["stage"] == "sampler":  # the sparse layer skips 10 of 12 blocks; the dense one counts 0
                assert r["skipped"] == [pytest.approx((1 - NUM_BLOCKS / 12) / 2, abs=1e-4)] * 3
            if r["stage"] == "forward-sparse":  # the cached layouts reproduce the refresh
                assert r["rel_l2_vs_refresh"] <= F32_TOL
            if r["parallel"] != "none":
                assert r["rel_l2_vs_1"] <= F32_TOL, r
                if r["stage"] != "forward-dense":
                    assert r["mask_rows_agree_vs_1"] == 1.0, r
    assert (out.parent / data["variants"][0]["log"]).exists()  # the worker's log, beside the JSON
    log = (out.parent / data["variants"][1]["log"]).read_text()
    assert "XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_gpu_enable_command_buffer='" in log


def test_diag_reports_a_killed_worker(tmp_path, capsys):
    """A worker past its time limit is killed, reported (JSON, table, ``!!!`` line), status 4."""
    out = tmp_path / "diag.json"
    status = diag.main([*TINY, "--modes", "", "--variants", "default", "--stage-timeout", "0.5", "--out", str(out)])
    assert status == 4
    variant = json.loads(out.read_text())["variants"][0]
    assert variant["error"].startswith("worker killed after 0.5 s") and variant["records"] == []
    text = capsys.readouterr().out
    assert "| default |  |  | worker killed" in text and "!!! FAILED: default" in text


def test_diag_skips_xla_attention_at_full_size(tmp_path):
    """At 75,600 tokens an XLA attention's L x L logits cannot fit: skipped before any worker starts."""
    out = tmp_path / "diag.json"
    assert diag.main(["--modes", "", "--variants", "sparse=xla,dense=xla", "--out", str(out)]) == 0
    variants = json.loads(out.read_text())["variants"]
    assert [v["skipped_reason"].split(":")[0] for v in variants] == ["skipped"] * 2
    assert "logits per device" in variants[0]["skipped_reason"]
    assert not list(tmp_path.glob("*.log"))


def test_diag_status_flags_non_finite_runs_first(capsys):
    finite = {"variant": "default", "parallel": "none", "stage": "sampler", "finite_fraction": 1.0}
    nan = dict(finite, parallel="1x2 (heads)", finite_fraction=0.25, first_short_layer=2)
    failed = {"variant": "scoring=jnp", "error": "worker exited with status 1", "log": "x.log", "records": []}
    assert diag.status([{"variant": "default", "records": [finite]}]) == 0
    assert diag.status([{"variant": "default", "records": [finite]}, failed]) == 4
    assert diag.status([{"variant": "default", "records": [finite, nan]}, failed]) == 3
    assert "!!! NON-FINITE: default 1x2 (heads) sampler (finite 0.2500, first short layer 2)" in capsys.readouterr().out


def test_diag_table_reads_nan_for_non_finite_distances():
    base = {"variant": "default", "parallel": "1x2 (heads)", "stage": "forward-sparse", "finite_fraction": 0.5,
            "time_s": 1.25, "kept_mean_per_slot": [118.0, 90.5], "first_short_layer": 2, "skipped": 0.8}
    rows = diag.table([{"variant": "default", "records": [dict(base, rel_l2_vs_1=None, rel_l2_vs_refresh=3e-3), base]},
                       {"variant": "sparse=xla", "skipped_reason": "skipped: too big", "records": []}])
    assert rows[2] == ("| default | 1x2 (heads) | forward-sparse | 0.5000 | 118.0, 90.5 | 2 | 0.8 | NaN |  | 3.00e-03 "
                       "| 1.2 |")
    assert rows[3].split(" | ")[7:9] == ["", ""]  # not measured: empty
    assert rows[4] == "| sparse=xla |  |  | skipped: too big |" + "  |" * 7
    assert all(row.count("|") == rows[0].count("|") for row in rows)


def test_diag_variants_parse_and_reject_unknown_names():
    assert diag.parse_variant("default") == ({}, {})
    fields, env = diag.parse_variant("sparse=triton+scoring=jnp+dense=xla+env=no-command-buffer+env=sync-collectives")
    assert fields == {"sparse_implementation": "triton", "scoring_implementation": "jnp", "dense_implementation": "xla"}
    assert env == {"XLA_FLAGS": "--xla_gpu_enable_command_buffer= --xla_gpu_disable_async_collectives=ALLCOLLECTIVES"}
    assert diag.worker_env(diag.Variant({}, env), {"XLA_FLAGS": "--a=1", "PATH": "/bin"}) == {
        "XLA_FLAGS": f"--a=1 {env['XLA_FLAGS']}", "PATH": "/bin",
    }  # fmt: skip
    blocking = diag.parse_variant("env=launch-blocking")
    assert diag.worker_env(blocking, {}) == {"CUDA_LAUNCH_BLOCKING": "1"}
    assert diag.variant_slug("sparse=xla+scoring=jnp") == "sparse-xla_scoring-jnp"
    with pytest.raises(ValueError, match=r"key must be one of \('sparse', 'scoring', 'dense', 'env'\).*got 'kernel'"):
        diag.parse_variant("kernel=xla")
    scorers = diag.VARIANT_KEYS["scoring"][1]
    assert sorted(scorers) == ["jnp", "triton"]
    with pytest.raises(ValueError, match=rf"scoring must be one of {re.escape(str(scorers))}, got 'cuda'"):
        diag.parse_variant("scoring=cuda")
    with pytest.raises(ValueError, match=r"env must be one of \('no-command-buffer', .*got 'fast'"):
        diag.parse_variant("env=fast")
    with pytest.raises(SystemExit):
        diag.parse_args(["--stages", "backward"])


@pytest.mark.parametrize("name", [n for n, env in diag.ENV_SETS.items() if "XLA_FLAGS" in env])
def test_diag_xla_flag_sets_are_known_to_this_jaxlib(name):
    """XLA aborts on an unknown or malformed flag; this jaxlib (the GPU image's version on the
    Python 3.12 env) parses the GPU flags too, so a renamed flag shows here and not on the GPU."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=diag.ENV_SETS[name]["XLA_FLAGS"])
    done = subprocess.run([sys.executable, "-c", "import jax; print(float(jax.numpy.ones(2).sum()))"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "2.0", done.stderr[-2000:]


# --------------------------------------------------------------------------- multi_gpu_bench


def bench_record(devices: int, mode: str, finite: list[bool], dense_ms: float) -> dict:
    runs = [{"program": "dfs", "kinds": [kind], "latents_finite": f} for kind, f in zip(("dense", "refresh"), finite)]
    return {"config": "wan2.1-14b", "video": "81x720x1280", "tokens": 75600, "dtype": "bfloat16", "density": 0.2, "devices": devices,
            "mode": mode, "runs": runs, "per_step_ms": {"dense": dense_ms, "refresh": dense_ms / 4},
            "schedule": {"dfs_s": dense_ms / 100}, "all_to_all_bytes_per_step": 0,
            "memory": [{"peak_gib": 80.0}], "meta": {"device": "H200"}}  # fmt: skip


def test_bench_record_with_non_finite_latents_is_invalid():
    good = bench_record(1, "none", [True, True], 20000.0)
    bad = bench_record(2, "heads", [True, False], 11000.0)
    assert bench.check_validity(good) and good["valid"] and "invalid_reason" not in good
    assert not bench.check_validity(bad) and bad["valid"] is False
    assert bad["invalid_reason"] == "non-finite latents after the dfs run ['refresh']"
    assert bench.check_validity({"runs": []}) and bench.check_validity({})  # older files: nothing known
    assert bench.exit_status([good]) == 0 and bench.exit_status([good, bad]) == 3 and bench.exit_status([]) == 1


def test_bench_scaling_skips_invalid_records():
    one, two = bench_record(1, "none", [True, True], 20000.0), bench_record(2, "guidance", [True, True], 10000.0)
    heads = bench_record(2, "heads", [True, False], 5000.0)
    heads["scaling_vs_1"] = {"dense": 4.0}  # a stale value from before the run went non-finite
    bench.add_scaling([one, two, heads])
    assert two["scaling_vs_1"] == {"dense": 2.0, "refresh": 2.0, "schedule_dfs": 2.0}
    assert "scaling_vs_1" not in heads
    broken_one, three = bench_record(1, "none", [False, True], 20000.0), bench_record(2, "guidance", [True, True], 1e4)
    bench.add_scaling([broken_one, three])  # an invalid one-device record is no baseline
    assert "scaling_vs_1" not in three and "scaling_vs_1" not in broken_one


def test_bench_table_marks_invalid_rows(capsys):
    records = [bench_record(1, "none", [True, True], 20000.0), bench_record(2, "heads", [False, True], 11000.0)]
    bench.add_scaling(records)
    lines = bench.table(records)
    header, rows = lines[2], lines[4:]
    assert rows[1].startswith("| 2 | heads | INVALID (non-finite latents) |") and "11,000" not in rows[1]
    assert rows[1].count("|") == header.count("|") and rows[0].count("|") == header.count("|")
    assert "20,000" in rows[0]
    bench.report_invalid(records)
    assert capsys.readouterr().out.startswith("!!! INVALID: 2 device(s), heads: non-finite latents after")


# --------------------------------------------------------------------------- multi_gpu_check


def check_entry(dtype: str, backend: str, parallel: str, rel_l2: list[float], agree=None, finite=True) -> dict:
    return {"dtype": dtype, "backend": backend, "parallel": parallel, "rel_l2": rel_l2, "mask_counts_agree": agree,
            "latents_finite": [finite, True, True, True]}  # fmt: skip


def test_check_passes_dfs_within_three_times_dense():
    checks = [
        check_entry("bfloat16", "dense", "1x2 (heads)", [7.7e-3, 7.5e-3]),
        check_entry("bfloat16", "dfs", "1x2 (heads)", [2.0e-2, 2.2e-2], agree=0.995),
        check_entry("float32", "dense", "1x2 (heads)", [0.0, 0.0]),  # bit-identical: the floor applies
        check_entry("float32", "dfs", "1x2 (heads)", [2.0e-5, 1.0e-6], agree=1.0),
    ]
    assert check.evaluate(checks)
    assert all(c["passed"] and c["failures"] == [] for c in checks)
    assert check.verdict_line(checks[1]).startswith("PASS bfloat16  dfs   1x2 (heads)")


def test_check_fails_non_finite_far_or_disagreeing_runs():
    checks = [
        check_entry("bfloat16", "dense", "2x1 (guidance)", [7.7e-3, 7.7e-3]),
        check_entry("bfloat16", "dfs", "2x1 (guidance)", [0.19, 2.0e-2], agree=0.928),
        check_entry("bfloat16", "dense", "1x2 (heads)", [math.nan, 7.7e-3], finite=False),
        check_entry("float32", "dfs", "1x2 (heads)", [1e-4, 1e-4], agree=1.0),  # no dense check to bound it
    ]
    assert not check.evaluate(checks)
    far, nonfinite, unbounded = checks[1], checks[2], checks[3]
    assert far["failures"] == ["rel L2 1.90e-01 > 2.31e-02 (3x dense)", "mask rows agree 0.9280 < 0.99"]
    assert nonfinite["failures"] == ["non-finite latents", "non-finite rel L2"]
    assert unbounded["passed"] and unbounded["notes"] == ["no dense check of this dtype and mode: rel L2 not bounded"]
    assert check.verdict_line(far).startswith("FAIL bfloat16  dfs   2x1 (guidance)")
    assert "mask rows agree 0.9280 < 0.99" in check.verdict_line(far)


# --------------------------------------------------------------------------- all_to_all_bench


def test_all_to_all_bench_moves_the_right_data_on_two_host_devices(tmp_path):
    """The head-parallel all-to-alls, timed at a small shape on 2 host devices: the moved data is
    checked exactly against NumPy before any timing (the script refuses to time a wrong collective),
    the compiled programs hold 3 + 1 all-to-alls, the split-axis-major yardstick needs no layout
    change, and the per-step estimate is the layers times the per-layer sum."""
    out = tmp_path / "a2a.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    cmd = [sys.executable, "-m", "benchmarks.all_to_all_bench", "--tokens", "384", "--heads", "4", "--head-dim", "16",
           "--iters", "2", "--layers", "3", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["data_checks"] == {"to_heads": True, "to_tokens": True, "major": True}
    ops = {r["op"]: r for r in data["ops"]}
    a2a = {name: r["hlo"]["all-to-all"] + r["hlo"]["all-to-all-start"] for name, r in ops.items()}
    assert a2a == {"q,k,v to heads": 3, "out to tokens": 1, "major (1 tensor)": 1, "transpose (1 tensor, local)": 0}
    assert ops["major (1 tensor)"]["hlo"]["transpose"] == 0
    assert data["shape"] == [2, 384, 4, 16] and data["sent_gb_per_tensor"] == pytest.approx(2 * 384 * 4 * 16 * 2 / 4 / 1e9)
    assert data["step_ms"] == pytest.approx(3 * (ops["q,k,v to heads"]["ms"] + ops["out to tokens"]["ms"]))
    assert done.stdout.splitlines()[-1].startswith("per layer")


def test_all_to_all_bench_rejects_a_count_below_one(capsys):
    from benchmarks import all_to_all_bench

    with pytest.raises(SystemExit):
        all_to_all_bench.parse_args(["--head-dim", "0"])
    assert "--head-dim must be >= 1, got 0" in capsys.readouterr().err
