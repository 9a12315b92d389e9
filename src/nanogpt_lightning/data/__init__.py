"""Text -> token bins -> batches: preparation, tokenizers and the LightningDataModule (knows no model)."""
