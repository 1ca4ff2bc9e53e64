"""The benchmarks' harness (benchmarks/harness.py): the median timer on a fake device clock, the
run record, the report writer, and the package's rules (no ``sys.path`` edits, no bench importing
another bench's private names, every bench's command line parses)."""

from __future__ import annotations

import ast
import datetime
import importlib
import statistics
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import harness
from helpers import ROOT

BENCH_DIR = ROOT / "benchmarks"
#: The bench modules (everything in the package but the package file and the harness).
BENCHES = sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in ("__init__", "harness"))


class FakeDevice:
    """A device stream on a fake clock: a call queues work of the next given duration and returns
    at once; blocking on a result advances the clock by all the work queued so far."""

    def __init__(self, durations):
        self.durations = list(durations)
        self.now = 100.0
        self.queued = 0.0
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def call(self, *args):
        self.calls += 1
        self.queued += self.durations.pop(0)
        return self

    def block_until_ready(self):  # what jax.block_until_ready calls on a leaf that is no jax.Array
        self.now += self.queued
        self.queued = 0.0
        return self


def test_median_time_blocks_on_every_repeat_and_takes_the_median():
    """Two warm-up calls (a slow compile, then one more) are not timed; each repeat's time is the
    work the device did, which the clock sees only because the timer blocks on the result."""
    device = FakeDevice([30.0, 2.0, 3.0, 1.0, 7.0, 2.5, 4.0])
    timing = harness.median_time(device.call, "x", warmup=2, repeats=5, clock=device.clock)
    assert timing.times_s == (3.0, 1.0, 7.0, 2.5, 4.0) and timing.calls_per_repeat == 1
    assert timing.median_s == 3.0 and timing.median_ms == 3000.0
    assert timing.times_ms == [3000.0, 1000.0, 7000.0, 2500.0, 4000.0]
    assert device.calls == 7 and device.durations == []


def test_median_time_batches_short_calls_up_to_target_s():
    """With ``target_s`` a repeat is a batch of back-to-back calls sized by the fastest warm-up
    call (0.125 s -> 4 calls for 0.5 s), blocked once; the time is per call. (Durations are
    powers of two: the fake clock adds them exactly.)"""
    device = FakeDevice([0.25, 0.125] + [0.125] * 4 + [0.5] * 4 + [0.25] * 4)
    timing = harness.median_time(device.call, warmup=2, repeats=3, target_s=0.5, clock=device.clock)
    assert timing.calls_per_repeat == 4 and device.calls == 14
    assert timing.times_s == (0.125, 0.5, 0.25) and timing.median_s == 0.25


def test_median_time_caps_the_batch_and_warms_up_once_for_target_s():
    """Without warm-up calls, ``target_s`` makes one (it sizes the batch); a batch holds at most
    MAX_CALLS_PER_REPEAT calls."""
    cap = harness.MAX_CALLS_PER_REPEAT
    device = FakeDevice([1e-9] + [1e-3] * cap)
    timing = harness.median_time(device.call, warmup=0, repeats=1, target_s=10.0, clock=device.clock)
    assert timing.calls_per_repeat == cap and device.calls == 1 + cap
    assert timing.times_s == pytest.approx((1e-3,))


def test_median_time_of_a_jitted_function():
    """A real jitted call: one time per repeat, non-negative, and the median of them."""
    double = jax.jit(lambda x: 2 * x)
    timing = harness.median_time(double, jnp.arange(8.0), warmup=1, repeats=3)
    assert len(timing.times_s) == 3 and timing.calls_per_repeat == 1
    assert all(t >= 0 for t in timing.times_s)
    assert timing.median_s == statistics.median(timing.times_s)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup=-1, repeats=1), "warmup must be >= 0, got -1"),
        (dict(warmup=0, repeats=0), "repeats must be >= 1, got 0"),
        (dict(warmup=0, repeats=1, target_s=-0.5), r"target_s must be >= 0, got -0.5"),
    ],
)
def test_median_time_rejects_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        harness.median_time(lambda: None, **kwargs)


def test_first_call_blocks_and_returns_the_result():
    device = FakeDevice([12.5])
    out, seconds = harness.first_call(device.call, 1, 2, clock=device.clock)
    assert out is device and seconds == 12.5


class StatsDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def test_memory_readings():
    assert harness.memory_stats(StatsDevice({"peak_bytes_in_use": 7, "bytes_in_use": 3})) == {
        "peak_bytes_in_use": 7, "bytes_in_use": 3,
    }  # fmt: skip
    assert harness.peak_memory_bytes(StatsDevice({"peak_bytes_in_use": 7})) == 7
    assert harness.peak_memory_bytes(StatsDevice(None)) is None  # a backend without statistics
    assert harness.memory_stats(StatsDevice(RuntimeError("unsupported"))) == {}
    assert harness.peak_memory_bytes(StatsDevice({"peak_bytes_in_use": 0})) is None


def test_run_record_fields():
    bench = BENCH_DIR / "e2e_bench.py"
    record = harness.run_record(str(bench), ["--iters", "3", "--out-dir", "a b"])
    assert set(record) == {"device", "jax", "python", "date", "command"}
    assert record["device"] == "cpu" and record["jax"] == jax.__version__
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["command"] == "python -m benchmarks.e2e_bench --iters 3 --out-dir 'a b'"
    date = datetime.datetime.fromisoformat(record["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - date) < datetime.timedelta(hours=1)


def test_run_record_command_carries_no_machine_paths(tmp_path):
    """Absolute paths in the arguments become repository-relative (inside the repository) or
    their file name (outside it), as every path in a results file."""
    argv = ["--out-dir", str(tmp_path / "out"), f"--out={tmp_path / 'x.json'}", str(ROOT / "benchmarks" / "results"),
            "--densities", "0.2"]  # fmt: skip
    record = harness.run_record(BENCH_DIR / "kernel_bench.py", argv)
    assert record["command"] == ("python -m benchmarks.kernel_bench --out-dir out --out=x.json benchmarks/results "
                                 "--densities 0.2")


def test_run_record_takes_a_given_device_without_asking_jax(monkeypatch):
    def no_backend():
        raise AssertionError("the record asked JAX for the device")

    monkeypatch.setattr(harness, "device_name", no_backend)
    record = harness.run_record("benchmarks/hunyuan_load_bench.py", [], device="NVIDIA H200")
    assert record["device"] == "NVIDIA H200" and record["command"] == "python -m benchmarks.hunyuan_load_bench"


def test_module_command_runs_the_bench_as_a_module():
    assert harness.bench_module(BENCH_DIR / "multi_gpu_diag.py") == "benchmarks.multi_gpu_diag"
    assert harness.module_command(str(BENCH_DIR / "multi_gpu_diag.py"), ["--worker", "default"]) == [
        sys.executable, "-m", "benchmarks.multi_gpu_diag", "--worker", "default",
    ]  # fmt: skip


def test_write_markdown(tmp_path):
    path = harness.write_markdown(tmp_path / "new" / "report.md", ["# Title", "", "| a |", "|---|"])
    assert path.read_text() == "# Title\n\n| a |\n|---|\n"


def _imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names)


@pytest.mark.parametrize("name", BENCHES + ["harness"])
def test_benches_edit_no_sys_path_and_import_no_private_bench_names(name):
    """A bench is a module of the package: it imports other benches as ``benchmarks.<module>``
    (public names only) and never edits ``sys.path``."""
    source = (BENCH_DIR / f"{name}.py").read_text()
    tree = ast.parse(source)
    assert "sys.path" not in source
    for module, names in _imports(tree):
        assert module.split(".")[0] not in BENCHES, f"{name} imports {module} sideways (use benchmarks.{module})"
        if module.startswith("benchmarks."):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{name} imports private names {private} from {module}"


@pytest.mark.parametrize("name", BENCHES)
def test_bench_command_line_parses(name, capsys):
    """``python -m benchmarks.<name> --help`` (in this process: the same parser) prints the usage."""
    bench = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
