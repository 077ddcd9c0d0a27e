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


def test_bench_measures_the_step_cache_and_compile(tmp_path):
    """Quick mode: 8 steps, one prompt, the eager compile backend — the same code as the full run."""
    results = bench.run(["stepcache", "compile"], quick=True, work=tmp_path)
    assert results["stepcache_steps"] == 8 and results["stepcache_model"]
    for mode in ("fast", "faster"):
        assert 0 <= results[f"stepcache_{mode}_skipped"] <= 1
        assert results[f"stepcache_{mode}_time_ratio"] > 0 and results[f"stepcache_{mode}_mad_255"] >= 0
    assert results["compile_backend"] == "eager" and results["compile_ratio"] > 0 and results["compile_first_s"] > 0
    table = bench.format_table(results)
    assert "stepcache_fast_skipped" in table and ">= 0.35" in table and "<= 4" in table
