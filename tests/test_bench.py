"""The bench module runs and reports every ratio by name (timings are not asserted here)."""

import json

from studio import bench


def test_bench_reports_named_ratios(tmp_path, capsys):
    results = bench.run(["overhead", "swap", "cache", "gallery"], quick=True, work=tmp_path)
    for key in ("overhead_ratio", "swap_shared_ratio", "swap_cached_ratio", "prompt_cache_ratio",
                "prompt_cache_hit_encoder_passes", "gallery_page_ms", "gallery_search_ms"):
        assert key in results and results[key] >= 0, key
    assert results["prompt_cache_hit_encoder_passes"] == 0
    table = bench.format_table(results)
    assert "swap_cached_ratio" in table and "<= 0.1" in table


def test_bench_json_cli(monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", lambda only, quick: {"swap_cached_ratio": 0.05, "gallery_page_ms": 1.0})
    assert bench.main(["--json", "--quick"]) == 0
    assert json.loads(capsys.readouterr().out) == {"swap_cached_ratio": 0.05, "gallery_page_ms": 1.0}
