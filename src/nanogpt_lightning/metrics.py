"""Names shared by training, logging and plotting: the data splits and the loss tags written to the loggers.

No imports: the plotting tools read these without loading Lightning or PyTorch.
"""

SPLITS = ("train", "val")  # the prepared data's splits; evaluation runs over both, in this order
ITER_LOSS_TAG = "train/iter_loss"  # the training loss of each logged iteration
EVAL_LOSS_TAGS = {split: f"{split}/loss" for split in SPLITS}  # the evaluation's loss estimate per split
EVAL_BPB_TAGS = {split: f"{split}/bpb" for split in SPLITS}  # ... and its bits per byte (tokenizer-independent)
