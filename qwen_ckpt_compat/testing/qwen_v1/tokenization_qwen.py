# Test fixture written for qwen-ckpt-compat: a byte-level stand-in for Qwen v1's tiktoken tokenizer.
# It needs no vocabulary file and no tiktoken: ids 0..255 are the UTF-8 bytes, and the three special
# tokens reuse the control bytes 0, 1 and 2, which never occur in ordinary text. Like the real one it has its
# own `tokenize`, which finds the special tokens itself (tiktoken's `allowed_special="all"`), so that transformers'
# handling of added tokens (which stripped the whitespace around them before 4.34) never touches the text.

import re
from typing import Dict, List, Optional, Tuple, Union

from transformers import PreTrainedTokenizer

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
SPECIAL_TOKENS = {ENDOFTEXT: 0, IMSTART: 1, IMEND: 2}
VOCAB_FILES_NAMES: Dict[str, str] = {}
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")")


class QWenTokenizer(PreTrainedTokenizer):
    """Byte-level tokenizer with the Qwen v1 special tokens; good enough for demos and tests."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, errors: str = "replace", **kwargs):
        # Set up before `super().__init__`, which looks the special tokens up in the vocabulary.
        self.errors = errors
        self.special_tokens = dict(SPECIAL_TOKENS)
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("additional_special_tokens", [IMSTART, IMEND])
        super().__init__(errors=errors, **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> Dict[str, int]:
        vocab = {chr(i): i for i in range(256)}
        vocab.update(self.special_tokens)
        return vocab

    def tokenize(self, text: str, **kwargs) -> List[str]:
        tokens: List[str] = []
        for part in _SPECIAL_SPLIT.split(text):
            if part in self.special_tokens:
                tokens.append(part)
            elif part:
                tokens += self._tokenize(part)
        return tokens

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if len(token) == 1 and ord(token) < 256:
            return ord(token)
        raise ValueError(f"{token!r} is not a byte token")

    def build_inputs_with_special_tokens(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None
    ) -> List[int]:
        # No BOS/EOS are added around a sequence (transformers 5.0's default would add a missing BOS id).
        return list(token_ids_0) + list(token_ids_1 or [])

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_special.get(index, chr(index))

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self._decode([self._convert_token_to_id(t) for t in tokens])

    def _decode(
        self,
        token_ids: Union[int, List[int]],
        skip_special_tokens: bool = False,
        errors: Optional[str] = None,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        pieces, buffer = [], bytearray()
        for index in token_ids:
            if index in self._id_to_special:
                pieces.append(buffer.decode("utf-8", errors=errors or self.errors))
                buffer = bytearray()
                if not skip_special_tokens:
                    pieces.append(self._id_to_special[index])
            else:
                buffer.append(index)
        pieces.append(buffer.decode("utf-8", errors=errors or self.errors))
        return "".join(pieces)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str, ...]:
        return ()
