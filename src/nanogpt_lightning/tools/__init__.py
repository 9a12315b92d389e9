"""Use a trained model: sample, evaluate, export, and time training (bench)."""
