"""models.common.progress: TickBar, ticked by the host or from a jit program, and done_marker."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.common.progress import TickBar, done_marker, host_callbacks_available


def test_done_marker_is_one_element_and_the_samplers_too():
    x = jnp.arange(24.0).reshape(2, 3, 4) + 5.0
    marker = done_marker(x)
    assert marker.shape == () and float(marker) == 5.0
    from models.sampling import progress

    assert progress.done_marker is done_marker  # one piece of code, importable from both


def test_a_hidden_bar_counts_its_ticks_and_open_starts_again(capsys):
    bar = TickBar("work", unit="chunk", show=False)
    bar.open(3)
    bar.tick()
    bar.tick(np.float32(1.0))  # a marker operand is ignored
    assert (bar.count, bar.total) == (2, 3)
    bar.close()
    assert bar.count == 2  # readable after closing
    bar.open(5)
    assert (bar.count, bar.total) == (0, 5)
    assert capsys.readouterr().err == ""  # nothing drawn
    assert repr(bar) == "TickBar('work', 0/5 chunk)"


def test_a_shown_bar_writes_its_label_unit_and_count_to_stderr(capsys):
    bar = TickBar("work", unit="chunk")
    bar.open(2)
    bar.tick()
    bar.tick()
    bar.close()
    bar.close()  # closing twice is harmless
    captured = capsys.readouterr()
    assert "work" in captured.err and "2/2" in captured.err and "chunk" in captured.err
    assert captured.out == ""


def test_a_jit_program_ticks_the_bar_as_each_step_is_computed():
    """A scan of 4 steps reports each step's value through ``jax.debug.callback``; the compiled
    program keeps the bar, so a second run ticks the same bar again."""
    bar = TickBar("loop", show=False)

    @jax.jit
    def run(x):
        def step(c, _):
            c = c * 2.0
            jax.debug.callback(bar.tick, done_marker(c))
            return c, None

        return jax.lax.scan(step, x, None, length=4)[0]

    for _ in range(2):
        bar.open(4)
        y = run(jnp.ones(3))
        jax.effects_barrier()
        assert (bar.count, bar.total) == (4, 4)
    np.testing.assert_array_equal(np.asarray(y), np.full(3, 16.0, np.float32))


def test_complete_fills_the_rest_of_a_run():
    bar = TickBar("t", show=False)
    bar.open(5)
    bar.tick()
    bar.complete()
    assert (bar.count, bar.total) == (5, 5)


def test_host_callbacks_need_a_cpu_device(monkeypatch):
    assert host_callbacks_available()  # the test machine lists cpu

    def no_cpu(backend=None):
        raise RuntimeError(f"Unknown backend {backend}")

    monkeypatch.setattr(jax, "devices", no_cpu)
    assert not host_callbacks_available()
