"""Lightning around the model: the run, the LightningModule, optimizers, callbacks, checkpoints, sweeps."""
