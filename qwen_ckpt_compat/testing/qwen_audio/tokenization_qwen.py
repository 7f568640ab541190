# Test fixture written for qwen-ckpt-compat: a byte-level stand-in for Qwen-Audio's tiktoken tokenizer, written
# from the documented interface of the real one (not copied from it). Like the Qwen v1 and Qwen-VL fixtures'
# tokenizers it needs no vocabulary file: ids 0..255 are the UTF-8 bytes, and <|endoftext|>, <|im_start|>,
# <|im_end|> reuse the control bytes 0, 1 and 2. What Qwen-Audio adds is kept as the real file has it
# (docs/facts/qwen-audio.md, "The tokenizer"):
# * `process_audio(text)`: reads the file of every `<audio>path</audio>` span, computes its log-mel spectrogram
#   (`audio.py`) and returns `audio_info` (`input_audios`, `input_audio_lengths`, `audio_span_tokens`,
#   `audio_urls`);
# * its own `tokenize(text, audio_info=None, ...)` (not `_tokenize`), which writes each span as `<audio>`, the
#   span's padding, `</audio>` (ids 300, 301, 302: the tiny model's `audio["audio_start_id"]` and the two after
#   it), as long as `audio_span_tokens` says; `audio_info` reaches it from `tokenizer(text, audio_info=...)`;
# * the task tokens of its speech prompts (`<|startoftranscript|>`, `<|en|>`, `<|transcribe|>`, `<|notimestamps|>`);
# * the ids as attributes set before `super().__init__`, and a `_decode(..., audio_info=None)` that writes a span
#   back as `<audio>path</audio>`.

import re
from typing import Dict, List, Optional, Tuple, Union

import torch
from transformers import PreTrainedTokenizer

from .audio import (
    CHUNK_SAMPLES,
    HOP_LENGTH,
    length_after_convolutions,
    load_audio,
    log_mel_spectrogram,
    pad_or_trim,
)

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
AUDIO_START = "<audio>"
AUDIO_END = "</audio>"
AUDIO_PAD = "<audiopad>"
TASK_TOKENS = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
SPECIAL_TOKENS = {
    ENDOFTEXT: 0, IMSTART: 1, IMEND: 2, AUDIO_START: 300, AUDIO_END: 301, AUDIO_PAD: 302,
    **{token: 303 + i for i, token in enumerate(TASK_TOKENS)},
}  # fmt: skip
VOCAB_FILES_NAMES: Dict[str, str] = {}
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in (ENDOFTEXT, IMSTART, IMEND, *TASK_TOKENS)) + ")")
_AUDIO = re.compile(re.escape(AUDIO_START) + "(.*?)" + re.escape(AUDIO_END), re.S)


class QWenTokenizer(PreTrainedTokenizer):
    """Byte-level tokenizer with the Qwen-Audio special tokens and audio spans."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, errors: str = "replace", audio_start_tag=AUDIO_START, audio_end_tag=AUDIO_END, **kwargs):
        self.errors = errors
        self.special_tokens = dict(SPECIAL_TOKENS)
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self.audio_start_tag, self.audio_end_tag = audio_start_tag, audio_end_tag
        self.audio_start_id = self.special_tokens[AUDIO_START]
        self.audio_end_id = self.special_tokens[AUDIO_END]
        self.audio_pad_id = self.special_tokens[AUDIO_PAD]
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("additional_special_tokens", [IMSTART, IMEND])
        super().__init__(errors=errors, **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def __len__(self) -> int:
        return 320

    def get_vocab(self) -> Dict[str, int]:
        vocab = {chr(i): i for i in range(256)}
        vocab.update(self.special_tokens)
        return vocab

    def process_audio(self, text: str) -> Optional[Dict]:
        """The `audio_info` of the audio files named in ``text`` (``None`` when it names none)."""
        urls = [match.group(1) for match in _AUDIO.finditer(text)]
        if not urls:
            return None
        audios, lengths, spans = [], [], []
        for url in urls:
            samples = load_audio(url)
            frames = min(samples.shape[0], CHUNK_SAMPLES) // HOP_LENGTH
            audios.append(log_mel_spectrogram(pad_or_trim(samples)))
            after_convolutions = length_after_convolutions(frames)
            tokens = (after_convolutions - 2) // 2 + 1  # after the average pool
            lengths.append([after_convolutions, tokens])
            spans.append(tokens + 2)  # and the first and last vectors
        return {
            "input_audios": torch.stack(audios),
            "input_audio_lengths": torch.tensor(lengths, dtype=torch.int32),
            "audio_span_tokens": spans,
            "audio_urls": urls,
        }

    def tokenize(self, text: str, audio_info: Optional[Dict] = None, **kwargs) -> List[str]:
        tokens: List[str] = []
        position = 0
        for index, match in enumerate(_AUDIO.finditer(text)):
            if audio_info is None:
                audio_info = self.process_audio(text)
            tokens += self._text_tokens(text[position:match.start()])
            span = audio_info["audio_span_tokens"][index]
            tokens += [AUDIO_START] + [AUDIO_PAD] * (span - 2) + [AUDIO_END]
            position = match.end()
        return tokens + self._text_tokens(text[position:])

    def _text_tokens(self, text: str) -> List[str]:
        tokens: List[str] = []
        for part in _SPLIT.split(text):
            if part in self.special_tokens:
                tokens.append(part)
            elif part:
                tokens += [chr(b) for b in part.encode("utf-8")]
        return tokens

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if len(token) == 1 and ord(token) < 256:
            return ord(token)
        raise ValueError(f"{token!r} is not a byte token")

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_special.get(index, chr(index))

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None) -> List[int]:
        return list(token_ids_0) + list(token_ids_1 or [])

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self._decode([self._convert_token_to_id(t) for t in tokens])

    def _decode(
        self,
        token_ids: Union[int, List[int]],
        skip_special_tokens: bool = False,
        errors: Optional[str] = None,
        audio_info: Optional[Dict] = None,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        urls = list((audio_info or {}).get("audio_urls", []))
        pieces, buffer = [], bytearray()
        for index in token_ids:
            if index == self.audio_pad_id:
                continue
            if index in self._id_to_special:
                pieces.append(buffer.decode("utf-8", errors=errors or self.errors))
                buffer = bytearray()
                if index == self.audio_start_id:
                    pieces.append(AUDIO_START + (urls.pop(0) if urls else ""))
                elif not skip_special_tokens or index == self.audio_end_id:
                    pieces.append(self._id_to_special[index])
            else:
                buffer.append(index)
        pieces.append(buffer.decode("utf-8", errors=errors or self.errors))
        return "".join(pieces)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str, ...]:
        return ()
