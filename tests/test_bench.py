"""scripts/bench.py runs all four loops, and two in bf16-mixed, on a tiny config and prints its table, and nothing
of its participants."""

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["plain", "plain+tuned", "lightning", "lightning+fused", "plain bf16-mixed", "lightning+fused bf16-mixed"]


def test_bench_prints_its_table_with_real_figures_only(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 60)
    # the progress bar is left on: the participants' output must not reach bench's
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--warmup", "2", "--rounds", "1", "--steps", "1",
         "--precisions", "bf16-mixed",
         "data=text", f"data.input_file={text}", f"data.data_dir={tmp_path / 'data'}", "data.block_size=16",
         "data.batch_size=4", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "trainer.accelerator=cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\r" not in out + result.stderr
    assert not re.search(r"^(plain )?iter ", out, re.MULTILINE), out
    assert "GPU available" not in result.stderr  # Lightning's notes from the participants

    peak_line = next(line for line in out.splitlines() if line.startswith("fp32 matmul peak:"))
    assert "torch.mm" in peak_line and ("oneDNN" in peak_line or "torch.mm again" in peak_line)
    peak = float(re.match(r"fp32 matmul peak: (\S+) GFLOP/s", peak_line).group(1))
    assert math.isfinite(peak) and peak > 0

    table = out[out.index("variant"):].splitlines()
    assert table[0].split() == ["variant", "ms/iter", "p25-p75", "ms", "n", "tokens/s", "GFLOP/s", "%", "peak",
                                "peak", "MB"]
    rows = [row.rsplit(maxsplit=7) for row in table[1:7]]
    assert [row[0] for row in rows] == VARIANTS
    bf16_peak_line = next(line for line in out.splitlines() if line.startswith("bf16-mixed matmul peak:"))
    assert float(re.match(r"bf16-mixed matmul peak: (\S+) GFLOP/s", bf16_peak_line).group(1)) > 0
    for name, ms_per_iter, _, n, tokens_per_s, gflops, percent_peak, _ in rows:
        figures = [float(ms_per_iter), float(tokens_per_s), float(gflops), float(percent_peak.rstrip("%"))]
        assert all(math.isfinite(x) and x > 0 for x in figures), (name, figures)
        assert int(n) == 1  # one round of one step
    assert "time per iteration vs plain:" in out
    assert re.search(r"^in bf16-mixed: lightning\+fused \d+\.\d\dx of plain in bf16-mixed, \d+\.\d\dx of "
                     r"lightning\+fused in 32-true$", out, re.MULTILINE), out
