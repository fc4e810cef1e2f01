"""scripts/perf_table.py: README's performance table rewritten from a harness result, nothing else touched."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("perf_table", ROOT / "scripts" / "perf_table.py")
assert _spec is not None and _spec.loader is not None
perf_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf_table)

RESULT = {
    "commit": "0123456789abcdef",
    "reps": 3,
    "time": "2026-12-07T05:19:30",
    "floor_c1": {"rps": 1900.0, "p50_ms": 0.494, "p99_ms": 0.7, "server_cpu_us_per_req": 320.0},
    "floor_c16": {"rps": 3000.0, "p50_ms": 5.1, "p99_ms": 8.0, "server_cpu_us_per_req": 313.0},
    "gw_c1": {"rps": 900.0, "p50_ms": 1.047, "p99_ms": 1.6, "server_cpu_us_per_req": 850.0},
    "gw_c16": {"rps": 1800.0, "p50_ms": 7.6, "p99_ms": 11.0, "server_cpu_us_per_req": 582.4},
    "gw_vs_floor_c16": 0.622,
    "gw-raw_c16": {"rps": 2100.0, "p50_ms": 7.0, "p99_ms": 10.0, "server_cpu_us_per_req": 532.0},
}


def test_the_table_has_a_row_per_measured_target_with_its_ratio_to_the_floor():
    lines = perf_table.table(RESULT).splitlines()
    floor, gw, raw = (line for line in lines if line.startswith("| ") and "target" not in line)
    assert floor.endswith("| 3,000 | 313 | 0.49 | 1.00x |")
    assert gw.endswith("| 1,800 | 582 | 1.05 | 0.62x |")  # the harness's own ratio wins
    assert raw.endswith("| 2,100 | 532 | - | 0.70x |")  # no 1-in-flight run; ratio of the medians
    assert lines[-1] == "Medians of 3 interleaved repetitions (2026-12-07, commit 0123456)."


def test_only_the_block_between_the_markers_is_rewritten(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{perf_table.BEGIN}\nold table\n{perf_table.END}\nafter\n")
    result = tmp_path / "gateway_check.json"
    result.write_text(json.dumps(RESULT))
    assert perf_table.main([str(result), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{perf_table.BEGIN}\n| target |")
    assert text.endswith(f"{perf_table.END}\nafter\n")
    assert "old table" not in text


def test_a_readme_without_markers_is_an_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no block\n")
    result = tmp_path / "gateway_check.json"
    result.write_text(json.dumps(RESULT))
    assert perf_table.main([str(result), "--readme", str(readme)]) == 2
    assert "perf-table:begin" in capsys.readouterr().err
    assert readme.read_text() == "no block\n"


def test_the_readme_has_the_block():
    text = (ROOT / "README.md").read_text()
    assert perf_table.BEGIN in text and perf_table.END in text


def test_a_missing_result_is_an_error(tmp_path):
    assert perf_table.main([str(tmp_path / "result.json"), "--readme", str(ROOT / "README.md")]) == 2
