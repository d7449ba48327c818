"""Smoke test of the sampler benchmark harness (evaluation/sampler_bench.py) on tiny settings."""
import csv
import math

import unifusion as uf
from unifusion.evaluation import sampler_bench


def test_bench_harness_tiny(tmp_path, capsys):
    nfes = [5, 8]
    out = sampler_bench.run(["--dims", "2", "--nfe", *map(str, nfes), "--batch", "16", "--check-nfe", "0",
                             "--no-peers", "--no-timing", "--out", str(tmp_path)])
    (table,) = out["tables"]

    # one row per deterministic fixed-step sampler, unipc once per variant, plus the grids.tuned recipe rows
    expected = {"uf:ipndm@tuned", "uf:unipc@tuned", "uf:dpmpp_2m@tuned"}
    for name in uf.samplers.names():
        spec = uf.samplers.get(name)
        if not (spec.stochastic or spec.adaptive):
            expected |= {"uf:unipc_bh1", "uf:unipc_bh2"} if name == "unipc" else {f"uf:{name}"}
    assert {"uf:euler", "uf:heun", "uf:dpmpp_2m"} <= expected
    assert set(table.rows) == expected
    assert table.dim == 2 and table.nfes == nfes

    for name, row in table.rows.items():
        assert sorted(row) == nfes, name
        for budget, res in row.items():
            assert math.isfinite(res.rmse) and res.rmse >= 0, (name, budget)
            assert 1 <= res.nfe_used <= budget, (name, budget, res.nfe_used)

    printed = capsys.readouterr().out
    assert "NFE 5" in printed and "NFE 8" in printed and "uf:dpmpp_2m" in printed
    with open(tmp_path / "samplers.csv") as f:
        assert len(list(csv.DictReader(f))) == len(expected) * len(nfes)
    assert (tmp_path / "samplers.png").stat().st_size > 0
