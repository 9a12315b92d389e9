"""scripts/prepare.py run as a user would: token counts printed, the data's own directory written whole."""

import json
import shlex

import numpy as np
import pytest

from helpers import SONNETS, run_script
from nanogpt_lightning.data.datamodule import TextDataModule
from nanogpt_lightning.errors import UserError


def files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_script_writes_the_datas_own_directory_and_rebuilds_it_whole(tmp_path):
    data_dir = tmp_path / "data"
    result = run_script("prepare.py", "data=text", f"data.input_file={SONNETS}", f"data.data_dir={data_dir}",
                        cwd=tmp_path)
    [directory] = data_dir.iterdir()
    assert directory.name.startswith("char-")
    assert result.stdout.splitlines() == ["train has 2,748 tokens", "val has 306 tokens",
                                          f"prepared data: {directory}"]
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["source"] == str(SONNETS.resolve()) and meta["tokens"] == {"train": 2748, "val": 306}
    for split, count in meta["tokens"].items():
        assert len(np.fromfile(directory / f"{split}.bin", dtype=np.uint16)) == count
    written = files(data_dir)

    # damaged: a reader refuses it with the command that rebuilds it, and that command does
    with open(directory / "val.bin", "r+b") as f:
        f.truncate(10)
    reader = TextDataModule(data_dir=str(data_dir), input_file=str(SONNETS), url=None)
    with pytest.raises(UserError, match=r"is damaged \(val.bin has 10 bytes, meta.json says 306 tokens\)") as refused:
        reader.setup("fit")
    command = shlex.split(str(refused.value).split("; rebuild it with ")[1])
    assert command[:2] == ["python", "scripts/prepare.py"]
    result = run_script("prepare.py", *command[2:], cwd=tmp_path)
    assert result.stdout.splitlines()[0] == (
        f"prepared data in {directory} is damaged (val.bin has 10 bytes, meta.json says 306 tokens); rebuilding it")
    assert files(data_dir) == written  # the same directory, whole again, and nothing beside it
