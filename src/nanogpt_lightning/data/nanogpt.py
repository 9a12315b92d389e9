"""Train on a folder that nanoGPT's prepare.py wrote (`data=nanogpt data.nanogpt_dir=PATH`): `train.bin` and
`val.bin` of uint16 tokens, and for a character vocabulary `meta.pkl` (a dict with `vocab_size`, `itos` and
`stoi`); without meta.pkl the tokens are GPT-2's. The folder is used as it is, never written.

meta.pkl is read by an unpickler that refuses every class: only plain dicts, lists, strings and numbers load,
so a pickle cannot run code here.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from nanogpt_lightning.data.sources import FileInfoCache, Source, files_sha256
from nanogpt_lightning.data.tokenizer import CharTokenizer, GPT2Tokenizer
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.metrics import SPLITS


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it holds {module}.{name}, not plain data")


def _read_meta_pkl(path: Path) -> dict:
    try:
        meta = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"cannot read {path} as nanoGPT's meta.pkl ({err}); pass a folder nanoGPT's prepare.py "
                        "wrote, or delete meta.pkl for GPT-2 tokens") from None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or sorted(itos) != list(range(meta.get("vocab_size", -1))):
        raise UserError(f"{path} has no character vocabulary (vocab_size and itos); pass a folder nanoGPT's "
                        "prepare.py wrote, or delete meta.pkl for GPT-2 tokens")
    return meta


def nanogpt_data(directory: Path, cache: FileInfoCache) -> tuple[Source, dict]:
    """The Source and the meta (as meta.json would hold it) of the nanoGPT folder `directory`."""
    bins = [directory / f"{split}.bin" for split in SPLITS]
    for path in bins:
        if not path.is_file() or path.stat().st_size % 2:
            raise UserError(f"{path} is missing or not uint16 tokens; data.nanogpt_dir takes a folder nanoGPT's "
                            "prepare.py wrote (train.bin, val.bin, and meta.pkl for characters)")
    meta_pkl = directory / "meta.pkl"
    files = [*bins, meta_pkl] if meta_pkl.is_file() else bins
    source = Source(str(directory.resolve()), files_sha256(directory, files, [cache.info(p, "binary") for p in files]))
    cache.save()
    if meta_pkl.is_file():
        itos = _read_meta_pkl(meta_pkl)["itos"]
        tokenizer = CharTokenizer("".join(itos[i] for i in range(len(itos))))
    else:
        tokenizer = GPT2Tokenizer()
    tokens = {split: path.stat().st_size // 2 for split, path in zip(SPLITS, bins)}
    meta = {"source": source.location, "source_bytes": sum(p.stat().st_size for p in files),
            "source_sha256": source.sha256, "tokenizer": tokenizer.to_meta(), "vocab_size": tokenizer.vocab_size,
            "val_fraction": None, "tokens": tokens, "dtype": "uint16",
            "shards": {split: [[f"{split}.bin", tokens[split]]] for split in SPLITS}}
    return source, meta
