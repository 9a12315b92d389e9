"""scripts/bench.py runs all four loops on a tiny config and prints its table."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_prints_its_table(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 60)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--warmup", "2", "--rounds", "1", "--steps", "1",
         "data=text", f"data.input_file={text}", f"data.data_dir={tmp_path / 'data'}", "data.block_size=16",
         "data.batch_size=4", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "trainer.accelerator=cpu",
         "callbacks.progress_bar.refresh_rate=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    peak_line = next(line for line in out.splitlines() if line.startswith("fp32 matmul peak:"))
    assert "torch.mm" in peak_line and ("oneDNN" in peak_line or "torch.mm again" in peak_line)
    table = out[out.index("variant"):].splitlines()
    assert [row.split()[0] for row in table[1:5]] == ["plain", "plain+tuned", "lightning", "lightning+fused"]
    assert "time per iteration vs plain:" in out

