"""Train a GPT: `python scripts/train.py [overrides]`, e.g. `experiment=macbook_char trainer.accelerator=mps`."""

from nanogpt_lightning.cpu_memory import tune_cpu_memory

tune_cpu_memory()  # before torch loads: it reads its huge-page switch once

from nanogpt_lightning.errors import ctrl_c_held, exit_on_user_error, quiet_ctrl_c  # noqa: E402  (standard library)

quiet_ctrl_c()  # from here on: Ctrl+C before training is one line, not a traceback

with ctrl_c_held():
    from omegaconf import DictConfig

    from nanogpt_lightning.config import hydra_main, register_resolvers
    from nanogpt_lightning.train.rundir import removed_unless_saved
    from nanogpt_lightning.train.settings import validate_train_config
    from nanogpt_lightning.train.sweeps import report_sweep_job

register_resolvers()  # before hydra.main composes the config


@hydra_main("train")
@exit_on_user_error
@report_sweep_job
def main(cfg: DictConfig) -> float:
    validate_train_config(cfg)  # a bad setting is refused before the seconds of loading PyTorch and Lightning
    with ctrl_c_held():
        from nanogpt_lightning.train.run import train

    return train(cfg)


if __name__ == "__main__":
    with removed_unless_saved():  # a run that fails or is stopped before its first checkpoint leaves nothing
        main()
