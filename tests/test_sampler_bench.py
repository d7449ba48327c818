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


def test_without_peers_it_says_where_they_are(tmp_path, capsys):
    sampler_bench.main(["--dims", "2", "--nfe", "5", "--batch", "4", "--check-nfe", "0", "--no-timing",
                        "--out", str(tmp_path)])
    assert "benchmarks/samplers.py" in capsys.readouterr().out


def test_peers_plug_in_from_outside(tmp_path, capsys):
    """A stand-in peer (DDIM written out here, 'zz:') runs beside ours, on the same counted denoiser
    and noise: the same algorithm as uf:euler, so the same error; its notes are printed."""
    def peer_ddim(denoiser, noise, nfe):
        sig = uf.samplers.grids.karras(nfe, sampler_bench.SIGMA_MIN, sampler_bench.SIGMA_MAX).tolist() + [0.0]
        x = noise
        for s, s_next in zip(sig[:-1], sig[1:]):
            D = denoiser(x, sampler_bench.full_sigma(x, s))
            x = D + (x - D) * (s_next / s)
        return x

    peers = sampler_bench.Peers(runners=lambda grid: ([sampler_bench.Runner("zz:ddim", peer_ddim)], ["zz note"]),
                                timing=lambda *a: ({}, []))
    out = sampler_bench.run(["--dims", "2", "--nfe", "5", "8", "--batch", "16", "--check-nfe", "0", "--no-timing",
                             "--out", str(tmp_path)], peers=peers)
    (table,) = out["tables"]
    for n in (5, 8):
        assert math.isclose(table.rows["zz:ddim"][n].rmse, table.rows["uf:euler"][n].rmse, rel_tol=1e-9)
    printed = capsys.readouterr().out
    assert "# zz note" in printed and "peer zz:ddim" in printed


def test_peer_adapters_import_outside_the_package():
    """benchmarks/peers.py imports without the peers installed and builds the harness's Peers; the
    package itself holds no peer code."""
    import importlib.util
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_peers", root / "benchmarks" / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    assert isinstance(peers.PEERS, sampler_bench.Peers)
    runners, notes = peers.runners("karras")
    assert all(r.name.split(":")[0] in ("kd", "hf") for r in runners) and notes
    source = (root / "src" / "unifusion" / "evaluation" / "sampler_bench.py").read_text()
    assert "import diffusers" not in source and "k_diffusion" not in source


def test_timing_table_adds_a_column_per_peer_library():
    """Format only (tiny sizes, one repeat): ours, each peer library's µs/step, and ours/theirs."""
    fake = sampler_bench.Peers(runners=lambda grid: ([], []),
                               timing=lambda free, x0, nfe, repeats: ({"euler": {"zz": 1e-3}}, ["zz timed"]))
    text = sampler_bench.timing_table(nfe=3, repeats=1, peers=fake, shape=(1, 1, 2, 2))
    lines = text.splitlines()
    assert lines[1].split() == ["sampler", "uf", "µs/step", "zz", "µs/step", "uf/zz"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:2 + len(sampler_bench.TIMED)]}
    assert set(rows) == set(sampler_bench.TIMED)
    assert rows["euler"][1] == "1000.0" and rows["heun"][1:] == ["-", "-"]
    assert math.isclose(float(rows["euler"][2]), float(rows["euler"][0]) / 1000.0, rel_tol=0.05, abs_tol=0.011)
    assert lines[-1] == "zz timed"
    alone = sampler_bench.timing_table(nfe=3, repeats=1, shape=(1, 1, 2, 2)).splitlines()
    assert alone[1].split() == ["sampler", "uf", "µs/step"] and "benchmarks/samplers.py" in alone[-1]
