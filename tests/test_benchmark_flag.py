"""`webui.py --benchmark`: a short timed generation (the figures are only checked to be there, never timed)."""
from __future__ import annotations

from modules.benchmark import run_benchmark
from modules.cli import main
from tests.conftest import make_engine


def test_run_benchmark_reports_every_phase(tmp_path, tiny_sd1):
    result = run_benchmark(make_engine(tmp_path, ckpt=tiny_sd1), size=64, steps=2)
    assert result.steps == 2 and result.size == 64 and result.peak_vram_gb is None
    assert min(result.load_s, result.text_s, result.step_s, result.decode_s, result.total_s) > 0
    assert result.it_per_s > 0 and result.peak_rss_gb > 0
    assert "sampling step" in result.table() and set(result.as_dict()) >= {"it_per_s", "step_s", "device"}
    assert result.warm_up == "1 step(s) at 64x64" and result.warm_up_s > 0


def test_compiled_benchmark_compiles_at_its_own_size_before_timing(tmp_path, tiny_sd1):
    engine = make_engine(tmp_path, ckpt=tiny_sd1, compile=True, compile_backend="eager")
    result = run_benchmark(engine, size=72, steps=1)
    assert result.warm_up == "2 step(s) at 72x72, compiles" and "compiles" in result.table()


def test_benchmark_flag(tmp_path, tiny_sd1, capsys):
    code = main(["--benchmark", "--benchmark-size", "64", "--benchmark-steps", "1", "--ckpt", str(tiny_sd1),
                 "--device", "cpu", "--precision", "fp32", "--data-dir", str(tmp_path / "data"),
                 "--outputs-dir", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "it/s" in out and "float32" in out
