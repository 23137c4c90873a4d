"""`bench.recipe`: options it does not know reach every seed's `app.demo`; the summary is mean ± sd over seeds."""

from __future__ import annotations

import json

import bench.recipe as recipe


def test_unknown_options_go_to_each_seeds_demo_and_the_summary_averages_them(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def fake_demo(argv: list[str]) -> None:  # stands in for a 10-minute demo run: records its argv, writes results
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        seed = int(argv[argv.index("--seed") + 1])
        stage = {"greedy": {"accuracy": 0.1 * (seed + 1), "format_rate": 1.0}, "sampled": {"accuracy": 0.2}}
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "results.json").write_text(json.dumps({s: stage for s in recipe.STAGES}))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipe, "demo_main", fake_demo)
    recipe.main(["--seeds", "0", "2", "--out", "b", "--trace-error-kind", "count", "--eval-samples", "3"])
    assert [c[c.index("--seed") + 1] for c in calls] == ["0", "2"]
    assert all(c[-2:] == ["--trace-error-kind", "count"] for c in calls)
    assert all(c[c.index("--eval-samples") + 1] == "3" and c[c.index("--eval-limit") + 1] == "300" for c in calls)
    summary = (tmp_path / "b" / "summary.md").read_text()
    assert "| sft | 0.200 ± 0.141 | 0.200 ± 0.000 | 1.000 ± 0.000 | 2 |" in summary
    recipe.main(["--seeds", "0", "2", "--out", "b"])  # results already there: no seed runs again
    assert len(calls) == 2
