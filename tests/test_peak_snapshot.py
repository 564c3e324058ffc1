"""bench/peak_snapshot.py's replay of an allocator trace, on hand-made traces (no GPU)."""

from bench.peak_snapshot import peak_breakdown, rounding_at

MIB = 2**20


def _alloc(addr, size, file="/x/site-packages/poetx/ops/a.py", line=1, name="f"):
    return {"action": "alloc", "addr": addr, "size": size,
            "frames": [{"filename": "/x/site-packages/torch/autograd/function.py", "line": 9,
                        "name": "apply"},
                       {"filename": file, "line": line, "name": name}]}


def _free(addr, size):
    return {"action": "free_requested", "addr": addr, "size": size}


def test_peak_counts_blocks_from_before_the_step_until_they_are_freed():
    trace = [_alloc(1, 100 * MIB), _free(99, 50 * MIB),  # a block of the previous step goes
             _alloc(2, 30 * MIB, line=2, name="g"), _free(1, 100 * MIB), _alloc(3, 10 * MIB)]
    result = peak_breakdown(trace, start_bytes=1000 * MIB)
    # 1000 + 100 = 1100 MiB, then 1100 - 50 + 30 = 1080 MiB: the first allocation is the peak
    assert result["peak_gib"] * 2**30 == 1100 * MIB
    assert result["step_alive_at_peak_gib"] * 2**30 == 100 * MIB
    assert result["sites"] == [{"site": "poetx/ops/a.py:1 f", "gib": 100 * MIB / 2**30}]
    assert result["peak_reached_by"] == "poetx/ops/a.py:1 f"


def test_sites_sum_what_is_alive_at_the_peak_by_frame():
    trace = [_alloc(1, 8 * MIB), _alloc(2, 8 * MIB), _alloc(3, 4 * MIB, line=5, name="h"),
             _free(3, 4 * MIB), _free(2, 8 * MIB)]
    result = peak_breakdown(trace, start_bytes=0)
    assert result["peak_gib"] * 2**30 == 20 * MIB
    assert {s["site"]: s["gib"] * 2**30 for s in result["sites"]} == {
        "poetx/ops/a.py:1 f": 16 * MIB, "poetx/ops/a.py:5 h": 4 * MIB}


def test_rounding_counts_what_active_blocks_hold_beyond_the_request():
    segments = [{"blocks": [
        {"state": "active_allocated", "size": 512, "requested_size": 100},
        {"state": "active_allocated", "size": 7 * MIB, "requested_size": 6 * MIB + 655360},
        {"state": "inactive", "size": 13 * MIB, "requested_size": 0},
        {"state": "active_allocated", "size": 18 * MIB, "requested_size": 18 * MIB},
    ]}]
    r = rounding_at(segments)
    assert r["<1MiB"]["blocks"] == 1 and r["<1MiB"]["beyond_gib"] * 2**30 == 412
    assert r["1-10MiB"]["beyond_gib"] * 2**30 == MIB - 655360
    assert r[">10MiB"]["beyond_gib"] == 0 and r[">10MiB"]["blocks"] == 1
