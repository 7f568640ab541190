# Test fixture written for qwen-ckpt-compat: small chat helpers in the spirit of Qwen v1's
# `qwen_generation_utils.py` (same role and names, independent code).

from typing import List, Optional, Sequence, Tuple

import torch
from transformers import PreTrainedTokenizer
from transformers.generation.logits_process import LogitsProcessor

HistoryType = List[Tuple[str, str]]


def _chatml_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def make_context(
    tokenizer: PreTrainedTokenizer,
    query: str,
    history: Optional[HistoryType] = None,
    system: str = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> Tuple[str, List[int]]:
    """Builds the prompt text and its token ids; the oldest turns are dropped to fit `max_window_size`."""
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise NotImplementedError(f"Unknown chat format {chat_format!r}")

    history = list(history or [])
    while True:
        raw_text = _chatml_turn("system", system)
        for old_query, old_response in history:
            raw_text += _chatml_turn("user", old_query) + _chatml_turn("assistant", old_response)
        raw_text += _chatml_turn("user", query) + "<|im_start|>assistant\n"
        context_tokens = tokenizer.encode(raw_text)
        if len(context_tokens) <= max_window_size or not history:
            return raw_text, context_tokens
        history.pop(0)


def get_stop_words_ids(chat_format: str, tokenizer: PreTrainedTokenizer) -> List[List[int]]:
    """Token sequences that end a reply in the given chat format."""
    if chat_format == "raw":
        return [[tokenizer.eod_id]]
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    raise NotImplementedError(f"Unknown chat format {chat_format!r}")


def decode_tokens(
    tokens: Sequence[int],
    tokenizer: PreTrainedTokenizer,
    context_length: int,
    stop_words: Sequence[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    errors: str = "replace",
) -> str:
    """Decodes the generated part of `tokens` and cuts it at the first stop word."""
    if torch.is_tensor(tokens):
        tokens = tokens.tolist()
    text = tokenizer.decode(list(tokens[context_length:]), errors=errors)
    for stop in stop_words:
        text = text.split(stop, 1)[0]
    return text.strip()


class StopWordsLogitsProcessor(LogitsProcessor):
    """Forces `eos_token_id` once a row of `input_ids` ends with one of `stop_words_ids`."""

    def __init__(self, stop_words_ids: Sequence[Sequence[int]], eos_token_id: int):
        self.stop_words_ids = [list(ids) for ids in stop_words_ids if len(ids) > 0]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids.tolist()):
            if any(len(stop) <= len(ids) and ids[-len(stop) :] == stop for stop in self.stop_words_ids):
                scores[row, :] = -float("inf")
                scores[row, self.eos_token_id] = 0.0
        return scores
