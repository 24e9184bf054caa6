"""What gradient-guided text attacks and token attributions need to know about a tokenizer.

An encoder's optional ``text_tokens()`` capability returns a :class:`TextTokens`: its
token-embedding layer, its special ids, the ids an attack may write, which positions may be
edited, how ids decode back to text and how tokens group into words. The generic
:class:`TextTokens` reads a Hugging Face tokenizer (``model.tokenizer``) and config; adapters
with another tokenizer return a subclass (tiny-clip's byte tokens: ``ByteTokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

Words = list[tuple[str, list[int]]]
"""One row's words: ``[(word, [token positions]), ...]`` in text order."""


class TextTokens:
    """Token facts of an adapter with a Hugging Face-style tokenizer and text config.

    Args:
        model: the adapter; ``model.tokenizer`` and ``model.model.config.text_config`` are read
            when present, and ``model.token_embedding()`` (or a CLIP/SigLIP text model's
            ``embeddings.token_embedding``) is the embedding layer.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tokenizer = getattr(model, "tokenizer", None)
        inner = getattr(model, "model", None)
        self.text_config = getattr(getattr(inner, "config", None), "text_config", None)

    def embedding(self) -> nn.Embedding | None:
        """The token-embedding layer, or ``None`` when none is reachable."""
        hook = getattr(self.model, "token_embedding", None)
        layer: Any = hook() if callable(hook) else None
        if layer is None:
            text_model = getattr(getattr(self.model, "model", None), "text_model", None)
            layer = getattr(getattr(text_model, "embeddings", None), "token_embedding", None)
        return layer if isinstance(layer, nn.Embedding) else None

    def special_ids(self) -> list[int]:
        """Ids of special tokens (BOS, EOS, PAD, ...), sorted."""
        ids: set[int] = set()
        ids.update(int(i) for i in getattr(self.tokenizer, "all_special_ids", None) or [])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self.text_config, key, None)
            if isinstance(value, int):
                ids.add(value)
        return sorted(ids)

    def candidates(self, vocab_size: int) -> Tensor:
        """Token ids an attack may write: every non-special id below ``vocab_size``."""
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[[i for i in self.special_ids() if 0 <= i < vocab_size]] = False
        return torch.nonzero(keep).squeeze(1)

    def editable(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Positions an attack may change: real, non-special tokens."""
        special = torch.as_tensor(self.special_ids(), dtype=ids.dtype, device=ids.device)
        return mask.bool() & ~torch.isin(ids, special)

    def pad_ids(self) -> tuple[int | None, set[int]]:
        """``(pad id or None, end-of-text ids)``; a pad equal to EOS cannot serve as a baseline."""
        eos = {
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(self.text_config, "eos_token_id", None),
        }
        for value in (
            getattr(self.tokenizer, "pad_token_id", None),
            getattr(self.text_config, "pad_token_id", None),
        ):
            if isinstance(value, int):
                return value, {e for e in eos if isinstance(e, int)}
        return None, {e for e in eos if isinstance(e, int)}

    def decode(self, ids: Tensor, mask: Tensor) -> list[str]:
        """The strings of a token batch (``""`` per row when there is no tokenizer)."""
        if self.tokenizer is None:
            return [""] * len(ids)
        pairs = zip(ids.cpu(), mask.cpu().bool(), strict=True)
        return [
            self.tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in pairs
        ]

    def words(self, row: Sequence[int], positions: Sequence[int]) -> Words:
        """Group the tokens at ``positions`` of one row into words (sub-word pieces joined).

        BPE pieces (CLIP's ``</w>`` word ends, SentencePiece's and GPT-2's word-start marks)
        and WordPiece pieces (BERT's ``##`` continuations) are both understood.
        """
        tok = self.tokenizer
        if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
            return [(f"#{row[j]}", [j]) for j in positions]
        prefix = wordpiece_prefix(tok)
        if prefix is not None:
            return wordpiece_words(
                [str(p) for p in tok.convert_ids_to_tokens([row[j] for j in positions])],
                list(positions),
                prefix,
            )
        groups: list[list[int]] = []
        words: list[str] = []
        open_word = False
        for j, p in zip(
            positions, tok.convert_ids_to_tokens([row[j] for j in positions]), strict=True
        ):
            p = str(p)
            starts = p.startswith(("▁", "Ġ")) or not open_word or not groups
            clean = p.lstrip("▁Ġ").removesuffix("</w>")
            if starts:
                groups.append([j])
                words.append(clean)
            else:
                groups[-1].append(j)
                words[-1] += clean
            open_word = not p.endswith("</w>")
        return list(zip(words, groups, strict=True))


def wordpiece_prefix(tokenizer: Any) -> str | None:
    """The continuation prefix (``##``) of a WordPiece tokenizer, else ``None``.

    Read from a fast tokenizer's backend model, so BPE and SentencePiece tokenizers (whose
    vocabularies may hold a literal ``##``) are never mistaken for WordPiece.
    """
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(model).__name__ != "WordPiece":
        return None
    return str(getattr(model, "continuing_subword_prefix", "##") or "##")


def wordpiece_words(pieces: Sequence[str], positions: Sequence[int], prefix: str = "##") -> Words:
    """Join WordPiece ``pieces`` (at ``positions``) into words: a ``prefix`` piece continues.

    Example:
        >>> wordpiece_words(["a", "tess", "##ella", "##ted", "cross"], [1, 2, 3, 4, 5])
        [('a', [1]), ('tessellated', [2, 3, 4]), ('cross', [5])]
    """
    words: Words = []
    for j, p in zip(positions, pieces, strict=True):
        if p.startswith(prefix) and words:
            word, group = words[-1]
            words[-1] = (word + p[len(prefix) :], [*group, j])
        else:
            words.append((p, [j]))
    return words
