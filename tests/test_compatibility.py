"""Checkpoints written by earlier versions of the project still sample, evaluate and resume.

tests/data/before_layout_move.ckpt was written at commit a599a56, before the package was cut into folders
(model/, data/, train/, tools/): a 1-layer character model trained 4 iterations on tests/data/sonnets.txt by

    python scripts/train.py data=text data.input_file=tests/data/sonnets.txt data.block_size=16 data.batch_size=8 \
        model.n_layer=1 model.n_head=2 model.n_embd=16 scheduler.warmup_iters=2 scheduler.lr_decay_iters=1000 \
        eval_iters=2 trainer.max_steps=4 eval_interval=2
"""

import json
import shutil

from helpers import ROOT, SONNETS, STEP_LINE, run_script

OLD_CHECKPOINT = ROOT / "tests" / "data" / "before_layout_move.ckpt"
# the settings that checkpoint's run recorded (what a resume must repeat)
OLD_RUN = ["data=text", f"data.input_file={SONNETS}", "data.block_size=16", "data.batch_size=8", "model.n_layer=1",
           "model.n_head=2", "model.n_embd=16", "scheduler.warmup_iters=2", "scheduler.lr_decay_iters=1000",
           "eval_iters=2", "eval_interval=2"]


def test_a_checkpoint_from_before_the_move_samples_evaluates_and_resumes(tmp_path):
    checkpoint = tmp_path / "old" / "last.ckpt"
    checkpoint.parent.mkdir()
    shutil.copy(OLD_CHECKPOINT, checkpoint)

    sampled = run_script("sample.py", f"ckpt={checkpoint}", "num_samples=1", "max_new_tokens=20", "prompt=Shall",
                         cwd=tmp_path)
    assert sampled.stdout.startswith("Shall") and len(sampled.stdout.split("\n---------------")[0]) == 25
    assert f"sampling from {checkpoint} (step 4)" in sampled.stderr

    evaluated = run_script("eval.py", f"ckpt={checkpoint}", f"text={SONNETS}", "format=json", cwd=tmp_path)
    report = json.loads(evaluated.stdout)
    assert report["step"] == 4 and 3.0 < report["loss"] < 4.2  # a model 4 iterations from uniform (ln 59 = 4.08)

    # the recorded data names the source by its absolute path at the time: allow_other_data for another checkout
    resumed = run_script("train.py", *OLD_RUN, "trainer.max_steps=6", f"ckpt_path={checkpoint}",
                         "allow_other_data=true", f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path)
    assert [int(step) for step, *_ in STEP_LINE.findall(resumed.stdout)] == [6]
    assert "iter 5: loss" in resumed.stdout and "iter 4:" not in resumed.stdout
