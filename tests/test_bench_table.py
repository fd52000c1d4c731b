"""tools/bench_table.py --runner: the README's runner overheads, pooled over benchmark files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_table.py"


def bench_table():
    spec = importlib.util.spec_from_file_location("bench_table", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def end_to_end(model_s, tiles_s, total_s, first=None):
    extra = {"pipeline": "overlapped", "tiles": 196, "device": "cpu", "model_only_s_all": model_s,
             "tile_stage_s_all": tiles_s, "total_s_all": total_s}
    if first is not None:  # (the process's first slide: model-only, whole run)
        extra.update(first_model_only_s=first[0], first_total_s=first[1])
    return {"name": "test_end_to_end[demo-overlapped]", "group": None,
            "params": {"slide_model": "demo", "pipeline": "overlapped"}, "stats": {"median": 1.0}, "extra_info": extra}


def test_runner_rounds_pooled_over_files(tmp_path, capsys):
    files = []
    for i, (m, t, tot, first) in enumerate([([1.0, 2.0], [1.1, 2.0], [1.2, 2.4], (1.0, 1.6)),
                                             ([1.0], [1.3], [1.5], (2.0, 2.6))]):
        path = tmp_path / f"r{i}.json"
        other = {"name": "test_model_only[demo]", "group": None, "params": {}, "stats": {"median": 1.0}, "extra_info": {}}
        path.write_text(json.dumps({"benchmarks": [end_to_end(m, t, tot, first), other]}))
        files.append(str(path))
    assert bench_table().main(files + ["--runner"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = [line for line in out if line.startswith("| overlapped")]
    # per round: tile stage +10%, 0%, +30% -> median +10%; whole run +20%, +20%, +50% -> +20%;
    # after the last tile 0.1, 0.4, 0.2 s -> 0.2 s; first slides +60%, +30% -> +45%
    assert row == ["| overlapped, demo, 196, cpu | 3 | 1.000 s | +10.0% (+5.0 / +20.0%) | +20.0% (+20.0 / +35.0%) "
                   "| 0.200 s | +45.0% (+37.5 / +52.5%) |"]


def test_runner_rounds_of_other_settings_are_not_pooled(tmp_path, capsys):
    files = []
    for i, precision in enumerate(["float32", "bfloat16"]):
        path = tmp_path / f"r{i}.json"
        b = end_to_end([1.0], [1.1], [1.2], (1.0, 1.6))
        b["extra_info"].update(precision=precision, batch=8)
        path.write_text(json.dumps({"benchmarks": [b]}))
        files.append(str(path))
    assert bench_table().main(files + ["--runner"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| overlapped")]
    assert [r.split(" | ")[0] for r in rows] == ["| overlapped, demo, 196, cpu; precision float32, batch 8",
                                                 "| overlapped, demo, 196, cpu; precision bfloat16, batch 8"]


def test_several_files_only_with_runner(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit):
        bench_table().main([str(path), str(path)])
