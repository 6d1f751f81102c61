"""The machine record kept with every benchmark result (ldeq_fast/machine.py, bench/common.py)."""
import json
import os
import sys

from conftest import REPO

from ldeq_fast import machine

BENCH = str(REPO / "bench")


def test_record_has_the_cpu_identity_isa_flags_and_the_load_before_and_after(monkeypatch):
    loads = iter([(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    info = machine.machine_info()
    ident = machine.cpu_identity()
    assert info["cpu_identity"] == {k: v for k, v in ident.items() if k != "isa"}
    assert info["isa_flags"] == ident["isa"]
    if ident["isa"] is not None:      # a Linux CPU: only flags it has, from the list that picks kernels
        flags = open("/proc/cpuinfo").read().split("\n\n")[0]
        flags = set(next(ln for ln in flags.splitlines() if ln.startswith("flags")).split(":", 1)[1].split())
        assert set(ident["isa"]) == flags & set(machine.KERNEL_ISA_FLAGS)
    assert info["load_average_before"] == [1.0, 2.0, 3.0] and "load_average_after" not in info
    assert machine.finish_record(info)["load_average_after"] == [4.0, 5.0, 6.0]


def test_bench_json_gets_the_load_after_the_measurement(tmp_path, monkeypatch):
    sys.path.insert(0, BENCH)
    try:
        import common
    finally:
        sys.path.remove(BENCH)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    info = common.machine_info()
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 2.0, 1.0))
    common.write_json(str(tmp_path / "r.json"), {"machine": info, "x": 1})
    m = json.loads((tmp_path / "r.json").read_text())["machine"]
    assert m["load_average_before"] == [1.5, 1.0, 0.5] and m["load_average_after"] == [7.0, 2.0, 1.0]
    assert "isa_flags" in m and m["cpu_identity"]["vendor"]


def test_bench_repeats_alternate_the_order_of_the_methods(monkeypatch):
    sys.path.insert(0, BENCH)
    try:
        import common
    finally:
        sys.path.remove(BENCH)
    calls = []
    times = common.interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, repeats=4, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "cba" + "abc" + "cba"     # the warm-up, then alternating rounds
    assert all(len(v) == 4 for v in times.values())
