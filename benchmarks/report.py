"""Bench outputs: JSON history (appendable), a markdown report, a PNG plot, and ``--compare``.

JSON file layout (``SCHEMA`` = ``dvis-trt-bench/1``)::

    {"schema": "dvis-trt-bench/1", "runs": [record, record, ...]}   # oldest first

Each record is what :func:`dvis_trt.benchmarks.harness.run_bench` returns (documented in
``docs/benchmarks.md``). :func:`append_run` adds one record and rewrites the file atomically;
a file holding a single bare record is accepted as a one-run history.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from dvis_trt.errors import InputError

from .harness import SCHEMA, STAGE_GROUPS

__all__ = ["REQUIRED_KEYS", "validate_record", "load_runs", "append_run", "markdown",
           "plot", "compare", "write_outputs"]

#: top-level keys every record has
REQUIRED_KEYS = ("schema", "id", "started", "machine", "threads", "settings", "e2e", "ratios",
                 "stages", "gemm", "flops")


def validate_record(rec: Any, where: str = "record") -> None:
    """Raise InputError (one line) if ``rec`` is not a bench record of this schema."""
    if not isinstance(rec, Mapping):
        raise InputError(f"{where} is not a JSON object")
    if rec.get("schema") != SCHEMA:
        raise InputError(f"{where} has schema {rec.get('schema')!r}, expected {SCHEMA!r}")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise InputError(f"{where} lacks {missing}")


def load_runs(path) -> List[Dict[str, Any]]:
    """The records of a bench JSON file (history or single record), oldest first.

    Raises InputError for a missing / unparsable file or a foreign schema."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"bench results {p} do not exist")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"bench results {p} are not readable JSON ({exc})") from None
    if isinstance(data, Mapping) and "runs" in data:
        if data.get("schema") != SCHEMA:
            raise InputError(f"{p} has schema {data.get('schema')!r}, expected {SCHEMA!r}")
        runs = list(data["runs"])
    else:
        runs = [data]
    for i, r in enumerate(runs):
        validate_record(r, f"{p} run {i}")
    if not runs:
        raise InputError(f"{p} holds no runs")
    return runs


def append_run(path, record: Mapping[str, Any]) -> Path:
    """Append ``record`` to the history at ``path`` (created if absent); atomic rewrite."""
    from dvis_trt.fileio import atomic_write_json
    validate_record(record)
    p = Path(path)
    runs = load_runs(p) if p.is_file() else []
    runs.append(dict(record))
    return atomic_write_json(p, {"schema": SCHEMA, "runs": runs}, indent=1)


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------
def _f(x: Optional[float], fmt: str = ".2f", dash: str = "–") -> str:
    return dash if x is None else format(x, fmt)


def _ms(sec: Optional[float]) -> str:
    if sec is None:
        return "–"
    ms = sec * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def _hardware(rec: Mapping[str, Any]) -> str:
    m = rec["machine"]
    gpu = m.get("gpu")
    th = rec["threads"]
    parts = [f"{m.get('cpu')}", f"{m.get('cpus_available')} CPUs available",
             f"{th.get('threads')} threads pinned", f"{m.get('memory_gb')} GB RAM"]
    if gpu:
        parts.append(f"GPU {gpu.get('name')} ({gpu.get('memory_gb')} GB)")
    else:
        parts.append("no GPU")
    return ", ".join(parts)


def markdown(rec: Mapping[str, Any]) -> str:
    """A human-readable report of one record (tables: end to end, stage groups, per-stage
    micro-benchmark, FLOPs / compute-bound minimum, sweep)."""
    s = rec["settings"]
    m = rec["machine"]
    v = m.get("versions", {})
    lines: List[str] = []
    lines.append(f"# dvis-trt bench {rec['id']}" + (f" — {rec['label']}" if rec.get("label")
                                                   else ""))
    lines.append("")
    lines.append(f"**Hardware:** {_hardware(rec)}; load average at start "
                 f"{_f((m.get('loadavg') or [None])[0])}, end "
                 f"{_f((m.get('loadavg_end') or [None])[0])}.  ")
    lines.append(f"**Software:** python {m.get('python')}, torch {v.get('torch')}, onnxruntime "
                 f"{v.get('onnxruntime') or v.get('onnxruntime-gpu')}, onnx {v.get('onnx')}, "
                 f"numpy {v.get('numpy')}, tensorrt {v.get('tensorrt') or '–'}; dvis-trt git "
                 f"{m.get('git')}.  ")
    lines.append(f"**Workload:** {s['frames']} frames of {s['video_size'][0]}x"
                 f"{s['video_size'][1]} ({s['video']}) resized to {s['resized'][0]}x"
                 f"{s['resized'][1]}, padded {s['padded'][0]}x{s['padded'][1]}; config "
                 f"{s.get('config')} ({s.get('num_queries')} queries, {s.get('num_classes')} "
                 f"classes); window {s['window']}; bundles msda={s['msda']}, precision "
                 f"{s['precision']}; weights: {s.get('weights')}.  ")
    lines.append(f"**Method:** {s['warmup']} warm-up run(s), then {s['repeats']} timed rounds "
                 "per backend, alternating order (ABBA); each round decodes the video and runs "
                 "the clip. CPU util = process CPU seconds / (wall x threads): well below 1 "
                 "means other processes took the cores. "
                 "Parity vs the eager baseline: same instances (Hungarian on video "
                 f"mask IoU, equal labels), IoU >= {s['parity']['iou_min']}, |Δscore| <= "
                 f"{s['parity']['score_atol']}.")
    if rec.get("command"):
        lines.append("")
        lines.append("```")
        lines.append("dvis-trt bench " + " ".join(rec["command"]))
        lines.append("```")
    # ---- end to end
    lines.append("")
    lines.append("## End to end")
    lines.append("")
    lines.append("| backend | parity | wall p50 s (min–max) | FPS | FPS incl. decode | engine s "
                 "| host s | CPU util | peak RSS MB | speedup vs torch (min / median / max) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    ratios = rec.get("ratios", {})
    for key, row in rec["e2e"].items():
        if row.get("skipped"):
            lines.append(f"| {key} | skipped: {row['skipped']} | | | | | | | | |")
            continue
        par = row.get("parity", {})
        if row.get("valid") is False and not par.get("accuracy"):
            lines.append(f"| {key} | **INVALID**: {par.get('reason')} | not reported | | | | | "
                         "| | |")
            continue
        if "wall_s" not in row:
            continue
        if par.get("ok") is None:
            ptxt = "unchecked"
        elif key == "torch":
            ptxt = "baseline"
        elif par.get("accuracy"):
            a = par["accuracy"]
            ptxt = (f"accuracy {'OK' if par.get('ok') else '**FAIL**'} vs "
                    f"{par.get('against', 'torch')}: {100 * a['matched_fraction']:.0f} % matched, labels "
                    f"{100 * a['label_agreement']:.0f} %, IoU mean {a['mask_iou_mean']:.3f} "
                    f"(worst {a['mask_iou_worst']:.3f}), Δscore ≤ "
                    f"{_f(a['score_delta_max'], '.1e')}")
        else:
            ptxt = (f"OK ({par.get('instances')} inst., IoU ≥ {_f(par.get('min_iou'), '.3f')}, "
                    f"Δscore ≤ {_f(par.get('max_score_diff'), '.1e')})")
        w = row["wall_s"]
        mem = row.get("memory") or {}
        r = ratios.get(f"{key} vs torch")
        rtxt = (f"{r['min']:.2f} / **{r['median']:.2f}** / {r['max']:.2f}"
                + (f" (fastest rounds: {r['of_fastest']:.2f})" if "of_fastest" in r else "")) \
            if r else ("1" if key == "torch" else "–")
        lines.append(f"| {key} | {ptxt} | {w['p50']:.2f} ({w['min']:.2f}–{w['max']:.2f}) | "
                     f"{row['fps']:.3f} | {row['fps_with_decode']:.3f} | "
                     f"{row['engine_s']['p50']:.2f} | {row['host_s']['p50']:.2f} | "
                     f"{_f((row.get('cpu_util') or {}).get('p50'))} | "
                     f"{_f(mem.get('peak_rss_mb'), '.0f')} | {rtxt} |")
    other = {k: r for k, r in ratios.items() if not k.endswith(" vs torch")}
    if other:  # reduced-precision bundles against their fp32 twin, same rounds
        lines.append("")
        for k, r in other.items():
            lines.append(f"- end to end, {k}: {r['min']:.2f} / **{r['median']:.2f}** / "
                         f"{r['max']:.2f} (min / median / max over rounds; fastest rounds "
                         f"{r.get('of_fastest', float('nan')):.2f})")
    # ---- stage groups
    timed = {k: r for k, r in rec["e2e"].items() if "groups_s" in r}
    if timed:
        fastest = all("fastest_round" in r for r in timed.values())
        lines.append("")
        if fastest:
            lines.append("## Where the time goes (fastest round of each backend, seconds per "
                         "clip)")
            lines.append("")
            lines.append("The fastest round is the least disturbed by other processes; its "
                         "groups add up to its wall time. Medians per group are in the JSON "
                         "(`groups_s`).")
        else:
            lines.append("## Where the time goes (end-to-end run, median seconds per clip)")
        lines.append("")
        keys = list(timed)
        lines.append("| stage group | " + " | ".join(keys) +
                     (" | torch / " + " | torch / ".join(k for k in keys if k != "torch") + " |"
                      if "torch" in keys and len(keys) > 1 else " |"))
        ncol = len(keys) + (len(keys) - 1 if "torch" in keys and len(keys) > 1 else 0)
        lines.append("|---|" + "---|" * ncol)
        def grp(k, g):
            r = timed[k]["fastest_round"] if fastest else timed[k]
            if g == "total":
                return r["wall_s"] if fastest else r["wall_s"]["p50"]
            if g in ("engine", "host"):
                return r[f"{g}_s"] if fastest else r[f"{g}_s"]["p50"]
            return r["groups_s"][g]
        for g in STAGE_GROUPS + ("total", "engine", "host"):
            vals = [grp(k, g) for k in keys]
            cells = [f"{x:.2f}" for x in vals]
            if "torch" in keys and len(keys) > 1:
                t = vals[keys.index("torch")]
                cells += [(f"{t / x:.2f}×" if x > 1e-4 else "–") for k, x in zip(keys, vals)
                          if k != "torch"]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        xs = {k: r.get("x_compute_bound") for k, r in timed.items() if r.get("x_compute_bound")}
        if xs:
            lines.append("")
            lines.append("Stage-group time (fastest round) as a multiple of its compute-bound "
                         "minimum (GEMM-class FLOPs / this machine's best measured GEMM rate): " +
                         "; ".join(
                             f"{k}: " + ", ".join(f"{g} {x:.1f}×" for g, x in v.items())
                             for k, v in xs.items()) + ".")
    # ---- per stage
    st = rec.get("stages") or {}
    if st:
        lines.append("")
        lines.append("## Per stage (same captured inputs, backends alternated)")
        lines.append("")
        lines.append("| stage | inputs | backend | p50 ms | p90 ms | p99 ms | n | frames/s | "
                     "GEMM GFLOP/call | × compute-bound min | speedup vs first (min/med/max) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for stage, res in st.items():
            shapes = res.get("_shapes", {})
            main = next(iter(shapes.items()), (None, None))
            shp = f"{main[0]} {tuple(main[1])}" if main[0] else ""
            fl = res.get("_flops") or {}
            for n, v in res.items():
                if n.startswith("_"):
                    continue
                rr = (res.get("_ratios") or {})
                rk = next((k for k in rr if k.startswith(f"{n} vs ")), None)
                rt = f"{rr[rk]['min']:.2f} / {rr[rk]['median']:.2f} / {rr[rk]['max']:.2f}" \
                    if rk else "–"
                lines.append(f"| {stage} | {shp} | {n} | {_ms(v['p50'])} | {_ms(v['p90'])} | "
                             f"{_ms(v['p99'])} | {v['n']} | {_f(v.get('throughput_fps'), '.2f')} "
                             f"| {_f(fl.get('gemm_gflops'), '.2f')} | "
                             f"{_f(v.get('x_compute_bound'), '.1f')} | {rt} |")
    # ---- op profile
    op = rec.get("op_profile") or {}
    if op.get("backends"):
        lines.append("")
        lines.append(f"## {op['stage']} by op type (one call, inputs "
                     + ", ".join(f"{k} {tuple(v)}" for k, v in op["inputs"].items()) + ")")
        lines.append("")
        lines.append("ONNX Runtime: kernel time per op type from its profiler (after its fusions); "
                     "torch: self CPU time per aten op (torch.profiler). Profilers add overhead; "
                     "read the shares, not the totals.")
        for name, prof in op["backends"].items():
            lines.append("")
            lines.append(f"**{name}** (total {prof['total_s']:.2f} s): " + ", ".join(
                f"{o['op']} {o['s']:.2f} s ({o['share'] * 100:.0f}%, {o['calls']} calls)"
                for o in prof["ops"][:10]) + ".")
    # ---- flops
    fl = rec.get("flops") or {}
    g = rec.get("gemm") or {}
    if g:
        lines.append("")
        parts = []
        for eng in ("torch", "ort", "numpy"):
            res = g.get(eng) or {}
            if "skipped" in res:
                continue
            parts += [f"{eng} {n}³ {v['gflops_median']:.0f} (max {v['gflops_max']:.0f})"
                      for n, v in res.items() if isinstance(v, dict) and "gflops_median" in v]
        b = g["best"]
        lines.append(f"**fp32 GEMM rate** ({g['threads']} threads, {g['seconds']} s per engine "
                     f"and size; GFLOP/s median (max)): " + "; ".join(parts) +
                     f". Compute-bound minimum uses the best product: {b['engine']} "
                     f"{b['size']}³ {b['gflops']:.0f} GFLOP/s (best sustained median "
                     f"{b['sustained_gflops']:.0f}).")
    if fl.get("stages"):
        lines.append("")
        lines.append("## FLOPs per frame (from the ONNX graphs at this run's shapes)")
        lines.append("")
        lines.append("| stage | calls | GEMM GFLOP/frame | other GFLOP/frame (approx.) | "
                     "compute-bound min per clip s |")
        lines.append("|---|---|---|---|---|")
        for stage, v in fl["stages"].items():
            lines.append(f"| {stage} | {v['calls']} | {v['gemm_gflops_per_frame']:.2f} | "
                         f"{v['other_gflops_per_frame']:.2f} | {v['compute_bound_min_s']:.3f} |")
        lines.append(f"| **total** | | {fl['gemm_gflops_per_frame']:.2f} | | "
                     f"{sum(v['compute_bound_min_s'] for v in fl['stages'].values()):.3f} |")
    # ---- sweep
    sw = rec.get("sweep")
    if sw and (sw.get("frames") or sw.get("resolution")):
        lines.append("")
        lines.append("## Scaling sweep")
        lines.append("")
        lines.append(sw.get("note", ""))
        lines.append("")
        names = sorted({n for part in ("frames", "resolution") for p in sw.get(part, [])
                        for n in p["results"]})
        lines.append("| sweep | frames | size | MIN_SIZE_TEST | " +
                     " | ".join(f"{n} s (s/frame)" for n in names) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(names))
        for part in ("frames", "resolution"):
            for p in sw.get(part, []):
                cells = []
                for n in names:
                    r = p["results"].get(n)
                    cells.append(f"{r['wall_s']['p50']:.2f} ({r['s_per_frame']:.3f})" if r
                                 else "–")
                lines.append(f"| {part} | {p['frames']} | {p['size'][0]}x{p['size'][1]} | "
                             f"{p['min_size_test']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------
def plot(rec: Mapping[str, Any], path) -> Path:
    """PNG: per-stage latency per backend (micro-benchmark p50, log scale, with p90 whiskers),
    the end-to-end stage-group breakdown (stacked), and the sweep when present."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    st = {k: v for k, v in (rec.get("stages") or {}).items()}
    timed = {k: r for k, r in rec["e2e"].items() if "groups_s" in r}
    sw = rec.get("sweep") or {}
    parts = [p for p in ("frames", "resolution") if sw.get(p)]
    panels = 2 + len(parts)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8))
    axes = np.atleast_1d(axes)
    # per-stage micro-benchmark
    ax = axes[0]
    stages = list(st)
    names = sorted({n for s in st.values() for n in s if not n.startswith("_")},
                   key=lambda n: (n != "torch", n))
    if stages and names:
        width = 0.8 / len(names)
        x = np.arange(len(stages))
        for i, n in enumerate(names):
            p50 = [st[s].get(n, {}).get("p50", np.nan) * 1e3 for s in stages]
            p90 = [st[s].get(n, {}).get("p90", np.nan) * 1e3 for s in stages]
            err = np.array([np.zeros(len(stages)), np.subtract(p90, p50)])
            ax.bar(x + (i - (len(names) - 1) / 2) * width, p50, width, label=n, yerr=err,
                   capsize=2)
        ax.set_xticks(x)
        ax.set_xticklabels(stages, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("latency per call, ms (p50, whisker p90)")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no per-stage results", ha="center", va="center")
    ax.set_title("Per-stage latency")
    # e2e breakdown
    ax = axes[1]
    if timed:
        keys = list(timed)
        bottom = np.zeros(len(keys))
        fastest = all("fastest_round" in timed[k] for k in keys)
        for g in STAGE_GROUPS:
            vals = np.array([(timed[k]["fastest_round"] if fastest else timed[k])["groups_s"][g]
                             for k in keys])
            ax.bar(keys, vals, bottom=bottom, label=g)
            bottom += vals
        ax.set_ylabel(f"seconds per clip ({rec['settings']['frames']} frames)"
                      + (", fastest round" if fastest else ", median"))
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no timed end-to-end rows", ha="center", va="center")
    ax.set_title("End to end, by stage group")
    for ax, part in zip(axes[2:], parts):
        pts = sw.get(part) or []
        for n in sorted({n for p in pts for n in p["results"]}):
            xs = [p["frames"] if part == "frames" else p["min_size_test"] for p in pts
                  if n in p["results"]]
            ys = [p["results"][n]["s_per_frame"] for p in pts if n in p["results"]]
            ax.plot(xs, ys, marker="o", label=n)
        if part == "frames":
            ax.set_xscale("log")
            from matplotlib.ticker import NullFormatter
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("frames per clip")
            ax.set_title("Scaling with clip length")
        else:
            ax.set_xlabel("short edge, px (16:9 frames)")
            ax.set_title("Scaling with resolution")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_ylabel("seconds per frame")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"dvis-trt bench {rec['id']} — {_hardware(rec)}", fontsize=9)
    fig.tight_layout()
    from dvis_trt.fileio import atomic_output
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------
def _pct(new: float, old: float) -> str:
    if not old:
        return "n/a"
    return f"{(new - old) / old * 100:+.1f}%"


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Deltas new vs old: end-to-end wall p50 and FPS per backend, speedups, per-stage p50.
    Negative wall/latency % = faster."""
    lines = [f"compare {new['id']} against {old['id']} (negative time % = faster)"]
    if old.get("machine", {}).get("cpu") != new.get("machine", {}).get("cpu") or \
            old.get("threads", {}).get("threads") != new.get("threads", {}).get("threads"):
        lines.append("  note: different machine or thread count")
    if old["settings"].get("frames") != new["settings"].get("frames") or \
            old["settings"].get("padded") != new["settings"].get("padded"):
        lines.append("  note: different workload (frames / input size)")
    for key, row in new["e2e"].items():
        o = old["e2e"].get(key)
        if not o or "wall_s" not in row or "wall_s" not in o:
            lines.append(f"  {key}: {'new row' if not o else 'not comparable (skipped/invalid)'}")
            continue
        lines.append(f"  {key}: wall p50 {o['wall_s']['p50']:.3f} -> {row['wall_s']['p50']:.3f} s "
                     f"({_pct(row['wall_s']['p50'], o['wall_s']['p50'])}), FPS {o['fps']:.3f} -> "
                     f"{row['fps']:.3f}")
    for k, r in new.get("ratios", {}).items():
        o = old.get("ratios", {}).get(k)
        if o:
            lines.append(f"  {k}: median speedup {o['median']:.2f} -> {r['median']:.2f}")
    for stage, res in (new.get("stages") or {}).items():
        ores = (old.get("stages") or {}).get(stage) or {}
        for n, v in res.items():
            if n.startswith("_") or n not in ores:
                continue
            lines.append(f"  stage {stage} {n}: p50 {_ms(ores[n]['p50'])} -> {_ms(v['p50'])} ms "
                         f"({_pct(v['p50'], ores[n]['p50'])})")
    return "\n".join(lines)


def write_outputs(rec: Mapping[str, Any], json_path, md_path, png_path) -> Dict[str, Path]:
    """Append to the JSON history and (over)write the markdown and the PNG."""
    from dvis_trt.fileio import atomic_output
    out = {"json": append_run(json_path, rec)}
    with atomic_output(md_path) as tmp:
        Path(tmp).write_text(markdown(rec))
    out["markdown"] = Path(md_path)
    out["png"] = plot(rec, png_path)
    return out
