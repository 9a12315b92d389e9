"""Time preparation against the tokenizer's own speed (the body of scripts/bench_prepare.py).

Two corpora are made from one text (tiny-shakespeare by default): a text of `--text-mb` MB (the text repeated)
and a folder of `--files` files making `--corpus-mb` MB. On each, in its own process (so that each peak memory,
`ru_maxrss`, is its own), one after the other:

- `tiktoken`: the reference, tiktoken's `encode_ordinary_batch` over the text in 1 MB pieces with `--threads`
  threads (file by file for the folder: all of its tokens would not fit in memory);
- `prepare`: this project's preparation (data/prepare.py) with `data.num_proc=--threads`, GPT-2 tokens, from
  reading the files to the renamed directory; the GPT-2 encoding is built before the clock starts, in both.

With `--interrupt-after S`, the folder is then prepared again by scripts/prepare.py, stopped by Ctrl+C (SIGINT)
after S seconds, and prepared once more by the same command: the lines both print are shown, and every file of
the result is compared with the uninterrupted preparation's, byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PIECE = 1 << 20
ROOT = Path(__file__).resolve().parents[3]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tiktoken(path: Path, threads: int) -> dict:
    from nanogpt_lightning.data.tokenizer import gpt2_encoding

    encoding = gpt2_encoding()
    files = sorted(p for p in path.rglob("*.txt")) if path.is_dir() else [path]
    start = time.perf_counter()
    tokens = 0
    for file in files:
        text = file.read_text()
        pieces = [text[i:i + PIECE] for i in range(0, len(text), PIECE)]
        tokens += sum(map(len, encoding.encode_ordinary_batch(pieces, num_threads=threads)))
        del text, pieces
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def _prepare(path: Path, threads: int, data_dir: Path) -> dict:
    from nanogpt_lightning.data.preparation import Preparation
    from nanogpt_lightning.data.tokenizer import gpt2_encoding

    gpt2_encoding()
    data = Preparation(str(data_dir), tokenizer="gpt2", input_file=str(path), url=None,
                       cache_dir=str(data_dir / ".cache"), num_proc=threads)
    start = time.perf_counter()
    data.prepare_data(force=True)
    return {"seconds": time.perf_counter() - start, "tokens": sum(data.meta["tokens"].values())}


def _child(argv: list[str]) -> None:
    kind, path, threads, data_dir = argv
    measure = _tiktoken(Path(path), int(threads)) if kind == "tiktoken" else _prepare(Path(path), int(threads),
                                                                                       Path(data_dir))
    print(json.dumps({**measure, "peak_mb": _peak_mb()}))


def _measure(kind: str, path: Path, threads: int, data_dir: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "nanogpt_lightning.tools.bench_prepare", "--child", kind,
                             str(path), str(threads), str(data_dir)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def _make_corpora(source: Path, work: Path, text_mb: int, corpus_mb: int, n_files: int) -> tuple[Path, Path]:
    """The text of about `text_mb` MB, and the folder of `n_files` files of about `corpus_mb` MB in all (each
    file starts with its own line, so no two are the same)."""
    body = source.read_bytes()
    text = work / "text.txt"
    if not text.exists():
        text.write_bytes(body * max(1, round(text_mb * 1e6 / len(body))))
    folder = work / "corpus"
    if not folder.exists():
        folder.mkdir()
        repeats = max(1, round(corpus_mb * 1e6 / n_files / len(body)))
        for i in range(n_files):
            (folder / f"{i:03d}.txt").write_bytes(f"file {i}\n".encode() + body * repeats)
    return text, folder


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / name, b / name, shallow=False) for name in names)


def _interrupted(folder: Path, threads: int, data_dir: Path, after_s: float, uninterrupted: Path) -> None:
    command = [sys.executable, str(ROOT / "scripts" / "prepare.py"), "data=text", f"data.input_file={folder}",
               "data.tokenizer=gpt2", f"data.num_proc={threads}", f"data.data_dir={data_dir}"]
    print(f"$ {' '.join(command[1:])}   # Ctrl+C after {after_s:g}s")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    print(process.communicate()[0].rstrip())
    print(f"$ {' '.join(command[1:])}")
    print(subprocess.run(command, capture_output=True, text=True).stdout.rstrip())
    [prepared] = [p for p in data_dir.iterdir() if not p.name.startswith(".")]
    same = _same_files(prepared, uninterrupted)
    print(f"every file of {prepared} equals the uninterrupted preparation's (cmp): {same}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="bench_prepare.py", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--work", default="bench-prepare", help="where the corpora and prepared data go")
    parser.add_argument("--text-mb", type=int, default=100)
    parser.add_argument("--corpus-mb", type=int, default=1000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--interrupt-after", type=float, default=None, help="seconds; see the description")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text, folder = _make_corpora(Path(args.source), work, args.text_mb, args.corpus_mb, args.files)
    print(f"{args.threads} threads; GPT-2 tokens; times from reading the text to the prepared data")
    print("| corpus | tiktoken s | prepare s | ratio | prepare MB/s | tokens | peak MB tiktoken | peak MB prepare |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in ((f"{text.stat().st_size / 1e6:.0f} MB text", text),
                       (f"{args.files} files, {sum(p.stat().st_size for p in folder.iterdir()) / 1e6:.0f} MB", folder)):
        data_dir = work / f"prepared-{path.name}"
        shutil.rmtree(data_dir, ignore_errors=True)
        reference = _measure("tiktoken", path, args.threads, data_dir)
        ours = _measure("prepare", path, args.threads, data_dir)
        size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
        print(f"| {name} | {reference['seconds']:.1f} | {ours['seconds']:.1f} | "
              f"{ours['seconds'] / reference['seconds']:.2f} | {size / 1e6 / ours['seconds']:.1f} | "
              f"{ours['tokens']:,} | {reference['peak_mb']:.0f} | {ours['peak_mb']:.0f} |", flush=True)
    if args.interrupt_after is not None:
        [uninterrupted] = [p for p in (work / "prepared-corpus").iterdir() if not p.name.startswith(".")]
        data_dir = work / "prepared-interrupted"
        shutil.rmtree(data_dir, ignore_errors=True)
        _interrupted(folder, args.threads, data_dir, args.interrupt_after, uninterrupted)


if __name__ == "__main__":
    main(sys.argv[1:])
