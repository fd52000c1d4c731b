#!/usr/bin/env python
"""Turn a pytest-benchmark JSON file into the Markdown table of the README.

    pytest benchmarks/bench_ops.py --benchmark-only --benchmark-json=bench.json
    python tools/bench_table.py bench.json [--targets]

One row per benchmark: group, implementation, median time, achieved GB/s (minimum bytes the
op must move / median), and the ratio to the wsss kernel of the same group.  All ratios come
from the one run in the file.  --targets adds the issue's targets for the op benchmarks.

    pytest benchmarks/bench_models.py --benchmark-only --benchmark-json=models.json
    python tools/bench_table.py models.json --models

--models: one row per network/width/batch, one column per mode, tiles/s with the speed-up over
eager float32 of the same row; then the precision-agreement table.

    for i in 1 2 3; do WSSS_BENCH_SIZE=3072 pytest benchmarks/bench_runner.py --benchmark-only \
        -k end_to_end --benchmark-json=r$i.json; done
    python tools/bench_table.py r1.json r2.json r3.json --runner

--runner: pools the end-to-end rounds of every file (each runner round against the model-only
pass made just before it) into the runner's overheads: tile stage and whole run (all outputs
written) over model-only, median and quartiles, per pipeline and model, and the median time
after the last tile (whole run minus tile stage: the outputs' tail, mostly a fixed cost).  The
rounds are warm (as every slide but a command's first); the last column is the process's first
slide, run before them (worker processes started, buffers allocated), against its own model-only pass.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    groups: dict = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b["extra_info"].get("impl", b["name"])
        groups[b["group"] or b["name"]][impl] = b
    return {"groups": groups, "machine": data.get("machine_info", {}), "when": data.get("datetime", "")}


def table(groups: dict) -> list[str]:
    lines = ["| group | implementation | median | GB/s | time / wsss |", "|---|---|---:|---:|---:|"]
    for group, impls in groups.items():
        base = impls.get("wsss")
        for impl, b in sorted(impls.items(), key=lambda kv: kv[1]["stats"]["median"]):
            med = b["stats"]["median"]
            gbs = b["extra_info"].get("gb_per_s")
            ratio = f"{med / base['stats']['median']:.2f}x" if base else ""
            lines.append(f"| {group} | {impl} | {med * 1e3:.2f} ms | {gbs if gbs is not None else ''} | {ratio} |")
    return lines


def targets(groups: dict) -> list[str]:
    def med(group, impl):
        b = groups.get(group, {}).get(impl)
        return b["stats"]["median"] if b else None

    read = groups.get("memory", {}).get("read")
    read_gbs = read["extra_info"].get("gb_per_s") if read else None
    out = []

    def row(name, value, goal, ok):
        out.append(f"| {name} | {value} | {goal} | {'met' if ok else 'NOT met'} |")

    fwd, fwd_eager = med("pda_pool forward", "wsss"), med("pda_pool forward", "eager")
    if fwd and med("pda_pool forward", "one_read"):
        r = fwd / med("pda_pool forward", "one_read")
        row("PDA pooled forward / one read of the features (same group)", f"{r:.2f}x", "<= 2x", r <= 2)
    if fwd and fwd_eager:
        row("PDA pooled forward speed-up over eager", f"{fwd_eager / fwd:.1f}x", ">= 2.5x", fwd_eager / fwd >= 2.5)
    fb, fb_eager = med("pda_pool forward+backward", "wsss"), med("pda_pool forward+backward", "eager")
    if fb and fb_eager:
        row("PDA forward+backward speed-up over eager", f"{fb_eager / fb:.1f}x", ">= 2x", fb_eager / fb >= 2)
    gate = groups.get("gate_argmax", {})
    if "wsss" in gate and "one_read" in gate:
        r = med("gate_argmax", "one_read") / med("gate_argmax", "wsss")
        row("gate+argmax speed / one read of the scores (same group)", f"{r:.0%}", ">= 70%", r >= 0.7)
    if "wsss" in gate and read_gbs:
        g = gate["wsss"]["extra_info"].get("gb_per_s")
        if g:
            row("gate+argmax GB/s / memory-group read GB/s", f"{g / read_gbs:.0%}", ">= 70%", g / read_gbs >= 0.7)
    for eager in ("eager_argmax", "eager_reference"):
        if "wsss" in gate and eager in gate:
            r = med("gate_argmax", eager) / med("gate_argmax", "wsss")
            row(f"gate+argmax speed-up over {eager}", f"{r:.0f}x", ">= 50x", r >= 50)
    if "wsss" in gate and "compiled" in gate:
        r = med("gate_argmax", "compiled") / med("gate_argmax", "wsss")
        row("gate+argmax vs torch.compile", f"{r:.2f}x faster", "> 1x", r > 1)
    if med("gradcam", "wsss") and med("gradcam", "one_read"):
        r = med("gradcam", "wsss") / med("gradcam", "one_read")
        row("Grad-CAM / one read of its inputs (same group)", f"{r:.2f}x", "<= 2x", r <= 2)
    if out:
        out = ["| target | measured | goal | |", "|---|---:|---|---|"] + out
    return out


def models_table(groups: dict) -> list[str]:
    """Rows: (net, width tag, batch) x precision; columns: modes; cells: tiles/s (x eager fp32)."""
    modes = ["eager", "scripted", "frozen", "compiled"]
    lines = ["| network | width, batch | precision | " + " | ".join(modes) + " |",
             "|---|---|---|" + "---:|" * len(modes)]
    agreement = []
    for group, impls in groups.items():
        if group == "precision-agreement":
            agreement = sorted(impls.values(), key=lambda b: b["extra_info"]["precision"])
            continue
        if not group.startswith("models-"):
            continue
        _, net, tag, batch = group.split("-")
        base = impls.get("eager float32")
        base_tps = base["extra_info"].get("tiles_per_s") if base else None
        precisions = sorted({b["extra_info"]["precision"] for b in impls.values()},
                            key=lambda p: ("float32", "bfloat16", "bfloat16-autocast", "float16-autocast").index(p))
        for precision in precisions:
            cells = []
            for mode in modes:
                b = impls.get(f"{mode} {precision}")
                tps = b["extra_info"].get("tiles_per_s") if b else None
                if tps is None:
                    cells.append("-")
                else:
                    cells.append(f"{tps:.3g}" + (f" ({tps / base_tps:.2f}x)" if base_tps else ""))
            lines.append(f"| {net} | {tag}, {batch} | {precision} | " + " | ".join(cells) + " |")
    if agreement:
        lines += ["", "| reduced precision (demo bundle) | label agreement with float32 | same, pixels not near a tie "
                      "| tissue accuracy vs truth: float32 / reduced | tiles |", "|---|---:|---:|---:|---|"]
        for b in agreement:
            e = b["extra_info"]
            lines.append(f"| {e['precision']} | {100 * e['label_agreement']:.2f}% | "
                         f"{100 * e['agreement_clear_pixels']:.2f}% ({100 * e['clear_pixel_share']:.0f}% of pixels) | "
                         f"{100 * e['accuracy_float32']:.1f}% / {100 * e['accuracy_reduced']:.1f}% | "
                         f"{e['tiles']} x {e['tile']} px |")
    return lines


def runner_table(paths: list) -> list[str]:
    import numpy as np

    pooled: dict = defaultdict(lambda: defaultdict(list))
    others: list = []
    for path in paths:
        with open(path) as f:
            for b in json.load(f)["benchmarks"]:
                e = b["extra_info"]
                if "tile_stage_s_all" not in e:
                    others.append(b)  # (memory, MONAI, many slides: the second table)
                    continue
                # NB: rounds are pooled only across runs of one configuration: files of another
                # precision, batch, overlap, ... (or another bundle) make rows of their own
                model = b["params"].get("slide_model", "") if b.get("params") else ""
                config = ", ".join(f"{k} {e[k]}" for k in ("precision", "batch", "overlap", "workers", "threads",
                                                         "output_tile") if e.get(k) is not None)
                # (a bundle given with WSSS_BENCH_BUNDLE is named; else the generated one of the parameter)
                key = (e.get("pipeline", "overlapped"), e.get("bundle") or model, e["tiles"], e["device"], config)
                for k in ("model_only_s_all", "tile_stage_s_all", "total_s_all"):
                    pooled[key][k] += e.get(k, [])
                if "first_total_s" in e:
                    pooled[key]["first_total_s"].append(e["first_total_s"])
                    pooled[key]["first_model_only_s"].append(e["first_model_only_s"])
    lines = ["| pipeline, model, tiles, device; settings | rounds | model only | tile stage: overhead (quartiles) "
             "| whole run: overhead (quartiles) | after the last tile | first slide: whole run |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def pct(xs, ms):
        if len(xs) != len(ms) or not xs:
            return "-"
        r = 100 * (np.asarray(xs) / np.asarray(ms) - 1)
        return f"{np.median(r):+.1f}% ({np.quantile(r, .25):+.1f} / {np.quantile(r, .75):+.1f}%)"

    for (pipeline, model, tiles, device, config), v in pooled.items():
        ms = v["model_only_s_all"]
        # (the outputs' tail: whole run minus tile stage, per round; mostly a fixed cost)
        tail = np.subtract(v["total_s_all"], v["tile_stage_s_all"]) if len(v["total_s_all"]) == len(v["tile_stage_s_all"]) else []
        lines.append(f"| {pipeline}, {model or 'bundle'}, {tiles}, {device}{'; ' + config if config else ''} | {len(ms)} | "
                     f"{np.median(ms):.3f} s | "
                     f"{pct(v['tile_stage_s_all'], ms)} | {pct(v['total_s_all'], ms)} | "
                     f"{f'{np.median(tail):.3f} s' if len(tail) else '-'} | "
                     f"{pct(v['first_total_s'], v['first_model_only_s']) if v['first_total_s'] else '-'} |")
    return lines + other_runner_rows(others)


def other_runner_rows(benchmarks: list) -> list[str]:
    """The runner benchmarks that are not one slide's overhead: peak memory, MONAI, many slides."""
    import numpy as np

    rows = []
    for b in benchmarks:
        e, name = b["extra_info"], b["name"]
        if "run_rss_growth_difference_mb" in e:
            s, g = e["small_stats"], e["big_stats"]
            rows.append(f"| {name} | peak RSS growth {e['small']}^2: {s['growth_mb']:.0f} MB ({s['tiles_run']} tiles), "
                        f"{e['big']}^2: {g['growth_mb']:.0f} MB ({g['tiles_run']} tiles); difference "
                        f"{e['run_rss_growth_difference_mb']:+.0f} MB for {e['area_ratio']:.0f}x the area |")
        elif "monai_over_runner_tile_stage" in e:
            rows.append(f"| {name} | MONAI sliding_window_inference takes {e['monai_over_runner_tile_stage']:.2f}x the "
                        f"runner's tile stage ({e['megapixels']:.1f} Mpx) |")
        elif "total_overhead_paired" in e and "wall_s_all" in e:
            rows.append(f"| {name} | {e['slides']} slides, {e['tiles']} tiles: whole runs "
                        f"{100 * e['total_overhead_paired']:+.1f}% over the model alone (median of "
                        f"{len(e['wall_s_all'])} paired rounds; {np.median(e['wall_s_all']):.2f} s) |")
    return ["", "| other runner benchmark | result |", "|---|---|"] + rows if rows else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_file", nargs="+", help="pytest-benchmark JSON (several only with --runner)")
    p.add_argument("--targets", action="store_true", help="also print the op targets table")
    p.add_argument("--models", action="store_true", help="the models table (benchmarks/bench_models.py)")
    p.add_argument("--runner", action="store_true", help="the runner's overheads, rounds pooled over the files "
                                                         "(benchmarks/bench_runner.py -k end_to_end)")
    args = p.parse_args(argv)
    if args.runner:
        print("\n".join(runner_table(args.json_file)))
        return 0
    if len(args.json_file) > 1:
        p.error("several files only with --runner")
    data = load(args.json_file[0])
    m = data["machine"]
    print(f"Measured {data['when'][:16]} on {m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, "
          f"{m.get('cpu', {}).get('count', '?')} cores; medians.\n")
    print("\n".join(models_table(data["groups"]) if args.models else table(data["groups"])))
    if args.targets:
        print()
        print("\n".join(targets(data["groups"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
