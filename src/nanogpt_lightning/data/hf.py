"""A Hugging Face dataset as a corpus (`data=hf data.dataset=NAME`, the optional `hf` extra): its examples are
documents, streamed from the hub, or read from a copy saved with `save_to_disk` when `data.dataset` is its
folder. Validation is the dataset's own `validation` split where it has one, else the last `val_fraction` of
the examples of `data.split`.

A dataset of the hub is known by its name, subset, split, revision and text field, so prepared data is found
without the network; a saved copy by its files' bytes, as a folder of text is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nanogpt_lightning.data.sources import Corpus, FileInfoCache, Source, document_pieces, folder_sha256
from nanogpt_lightning.errors import UserError, first_line

VALIDATION = "validation"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("data.dataset needs the datasets library: pip install -e '.[hf]'") from None
    return datasets


def _saved(dataset: str) -> Path | None:
    """The folder of a copy saved with `save_to_disk`, if `dataset` names one."""
    path = Path(dataset).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return path
    return None


class HFDataset(Corpus):
    """The examples of a dataset's split (and of its validation split), their text in `text_field`."""

    documents = True

    def __init__(self, dataset: str, subset: str | None, split: str, revision: str | None, text_field: str,
                 val_fraction: float, cache: FileInfoCache):
        self.dataset, self.subset, self.split, self.revision = dataset, subset, split, revision
        self.text_field = text_field
        self.val_fraction = val_fraction
        options = {"split": split, "text_field": text_field}
        self.saved = _saved(dataset)
        if self.saved is not None:
            self.source = Source(str(self.saved.resolve()), folder_sha256(self.saved, cache), options)
            self.total_bytes = None
        else:
            options.update({key: value for key, value in (("subset", subset), ("revision", revision)) if value})
            self.source = Source(f"hf:{dataset}", None, options)
            self.total_bytes = None

    def _failed(self, err: Exception) -> UserError:
        named = self.dataset + (f" (subset {self.subset})" if self.subset else "")
        return UserError(f"cannot load the dataset {named} ({first_line(err)}); check its name on "
                         "https://huggingface.co/datasets and the network, or pass a copy saved with save_to_disk: "
                         "data.dataset=PATH")

    def _splits(self) -> dict:
        """The split to train on and the validation split (None: the last val_fraction of the first)."""
        datasets = _datasets()
        try:
            if self.saved is not None:
                loaded = datasets.load_from_disk(str(self.saved))
                splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {self.split: loaded}
            else:
                names = datasets.get_dataset_split_names(self.dataset, self.subset, revision=self.revision)
                splits = {name: datasets.load_dataset(self.dataset, self.subset, split=name, streaming=True,
                                                      revision=self.revision)
                          for name in {self.split, VALIDATION} & set(names)}
        except (OSError, ValueError, ImportError, datasets.exceptions.DatasetsError) as err:
            raise self._failed(err) from None
        if self.split not in splits:
            raise UserError(f"the dataset {self.dataset} has no split {self.split!r} (it has "
                            f"{', '.join(sorted(splits))}); pass data.split=NAME")
        return splits

    def _texts(self, examples, named: str) -> Iterator[str]:
        for number, example in enumerate(examples, 1):
            text = example.get(self.text_field)
            if not isinstance(text, str):
                raise UserError(f"example {number} of {named} has no text field {self.text_field!r} (it has "
                                f"{', '.join(example)}); name the field holding the text with data.text_field=NAME")
            yield text

    def pieces(self) -> Iterator[tuple[str, str, bool]]:
        splits = self._splits()
        train = splits[self.split]
        named = f"{self.dataset}:{self.split}"
        if VALIDATION in splits and self.split != VALIDATION:
            parts = [("train", self._texts(train, named)), ("val", self._texts(splits[VALIDATION], VALIDATION))]
            for split, texts in parts:
                for text in texts:
                    if text:
                        yield from document_pieces(split, iter([text]))
            return
        total = len(train) if hasattr(train, "__len__") else getattr(
            (train.info.splits or {}).get(self.split), "num_examples", None)
        if not total:
            raise UserError(f"the dataset {self.dataset} does not say how many examples its split {self.split!r} "
                            "has, so its last data.val_fraction cannot be found; save it with save_to_disk and pass "
                            "data.dataset=PATH")
        n_train = int(total * (1 - self.val_fraction))
        for index, text in enumerate(self._texts(train, named)):
            if text:
                yield from document_pieces("train" if index < n_train else "val", iter([text]))
