"""Human-readable summaries of the comparisons of :mod:`models.evaluation.compare`, each with a
legend of its fields; :func:`format_legend` is the one legend formatter (the demo's tables use it)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CLIP_REPORT_LEGEND", "REPORT_LEGEND", "format_clip_report", "format_legend", "format_report"]


#: One line per field of :func:`format_report`'s summary, printed under it.
REPORT_LEGEND = (
    ("time/step", "median wall time of one sampling run divided by its steps (each run blocked on the "
     "result, after one warm-up compile)"),
    ("speedup", "median dense time / median DFSAttn time (> 1: DFSAttn is faster)"),
    ("runs", "every timed run's total seconds, dense and DFSAttn alternating, and each pair's speedup "
     "(the spread)"),
    ("total", "median wall time of the whole sampling run"),
    ("sparsity", "skipped key-block fraction, mean over the sparse steps and all self-attention layers "
     "(docs/spec.md §6); planned: what the schedule asked for"),
    ("refreshes at", "steps at which the block layouts are recomputed; the other sparse steps reuse them"),
    ("relative error", "||DFSAttn latents - dense latents|| / ||dense latents||, same noise and weights"),
)

#: One line per field of :func:`format_clip_report`'s summary, printed under it.
CLIP_REPORT_LEGEND = REPORT_LEGEND[:-1] + (
    ("PSNR", "peak signal-to-noise ratio of each DFSAttn video against its dense video, in dB "
     "(higher: closer; identical videos give infinity)"),
    ("SSIM", "structural similarity of the same pairs (1: identical)"),
    ("video", "dense | DFSAttn side by side, one row per sample (GIF, and MP4 when an encoder is installed)"),
)


def format_legend(legend: Sequence[tuple[str, str]]) -> str:
    """``legend`` as indented ``name  meaning`` lines under a ``legend:`` heading."""
    width = max(len(name) for name, _ in legend)
    return "\n".join(["  legend:"] + [f"    {name:<{width}}  {text}" for name, text in legend])


def _timing_lines(report: dict) -> list[str]:
    t = report["time_per_step_s"]
    runs = report.get("time_runs_s")
    n = len(runs["dense"]) if runs else 1
    lines = [
        f"  time/step  dense {t['dense'] * 1e3:9.2f} ms   dfs {t['dfs'] * 1e3:9.2f} ms   "
        f"speedup {report['speedup']:.2f}x (median of {n} run{'s' if n != 1 else ''})",
    ]
    if runs:
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        lines.append(
            f"  runs (s)   dense {fmt(runs['dense'])}   dfs {fmt(runs['dfs'])}   "
            f"speedup per run {', '.join(f'{x:.2f}x' for x in report['speedup_runs'])}"
        )
    lines.append(
        f"  total      dense {report['time_total_s']['dense']:9.2f} s    dfs {report['time_total_s']['dfs']:9.2f} s"
    )
    return lines


def format_report(report: dict, *, legend: bool = True) -> str:
    """A short human-readable summary of :func:`~models.evaluation.compare.run_comparison`'s report, with a legend of its
    fields (:data:`REPORT_LEGEND`) under it unless ``legend`` is false."""
    lines = [
        f"{report['config']} on {report['device']}: {report['tokens']} tokens, {report['steps']} steps",
        *_timing_lines(report),
        f"  sparsity {report['sparsity']:.4f} (planned {report['planned_sparsity']:.4f}), "
        f"refreshes at {report['refresh_steps']}",
        f"  final latents: relative error vs dense {report['relative_error']:.4e}",
        f"  report {report['report_json']}, masks {report['mask_png']}",
    ]
    if legend:
        lines.append(format_legend(REPORT_LEGEND))
    return "\n".join(lines)


def format_clip_report(report: dict, *, legend: bool = True) -> str:
    """A short human-readable summary of :func:`~models.evaluation.compare.run_clip_comparison`'s report: what was scaled
    down and what to expect (when the report says so), the timings, PSNR/SSIM, the files, and a
    legend of its fields (:data:`CLIP_REPORT_LEGEND`) unless ``legend`` is false."""
    per = ", ".join(
        f"{c}: {p:.2f} dB / {s:.4f}" for c, p, s in zip(report["samples"], report["psnr"], report["ssim"])
    )
    lines = [
        f"{report['config']} (trained weights {report['weights']}) on {report['device']}: {report['tokens']} tokens, "
        f"{len(report['samples'])} samples, {report['steps']} steps",
    ]
    note = report.get("scaled_down")
    if note:
        lines += [f"  note: {note['summary']}", f"        {note['expect']}"]
    videos = ", ".join(str(v) for v in (report["gif"], report.get("mp4")) if v)
    lines += [
        *_timing_lines(report),
        f"  sparsity {report['sparsity']:.4f} (planned {report['planned_sparsity']:.4f}), refreshes at {report['refresh_steps']}",
        f"  DFSAttn vs dense video: PSNR {report['psnr_mean']:.2f} dB, SSIM {report['ssim_mean']:.4f} (mean); {per}",
        f"  video {videos}, masks {report['mask_png']}, report {report['report_json']}",
    ]
    if report.get("mp4_note"):
        lines.append(f"  {report['mp4_note']}")
    if legend:
        lines.append(format_legend(CLIP_REPORT_LEGEND))
    return "\n".join(lines)
