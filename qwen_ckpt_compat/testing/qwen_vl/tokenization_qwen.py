# Test fixture written for qwen-ckpt-compat: a byte-level stand-in for Qwen-VL's tiktoken tokenizer, written
# from the documented interface of the real one (not copied from it). Like the Qwen v1 fixture's tokenizer it
# needs no vocabulary file: ids 0..255 are the UTF-8 bytes, and <|endoftext|>, <|im_start|>, <|im_end|> reuse
# the control bytes 0, 1 and 2. What Qwen-VL adds is kept as the real file has it: its own `tokenize` (not
# `_tokenize`), which writes an image as `<img>`, the UTF-8 bytes of its path or URL, `<imgpad>` up to a fixed
# span, then `</img>` (ids 300, 301, 302: the tiny model's `visual["image_start_id"]` and the two after it);
# `from_list_format` / `to_list_format` for the list form of a query ("Picture 1: <img>...</img>\n..."); the
# ids as attributes (`eod_id`, `im_start_id`, `im_end_id`, `img_start_id`, ...) set before `super().__init__`;
# and a `_decode` that writes an image span back as `<img>path</img>`.

import re
from typing import Dict, List, Optional, Tuple, Union

from transformers import PreTrainedTokenizer

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_PAD = "<imgpad>"
IMG_TOKEN_SPAN = 64  # the tiny model's visual["n_queries"] (the real Qwen-VL: 256)
SPECIAL_TOKENS = {ENDOFTEXT: 0, IMSTART: 1, IMEND: 2, IMG_START: 300, IMG_END: 301, IMG_PAD: 302}
VOCAB_FILES_NAMES: Dict[str, str] = {}
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in (ENDOFTEXT, IMSTART, IMEND)) + ")")
_IMAGE = re.compile(re.escape(IMG_START) + "(.*?)" + re.escape(IMG_END), re.S)


class QWenTokenizer(PreTrainedTokenizer):
    """Byte-level tokenizer with the Qwen-VL special tokens and image spans."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, errors: str = "replace", image_start_tag=IMG_START, image_end_tag=IMG_END, image_pad_tag=IMG_PAD, **kwargs):
        self.errors = errors
        self.special_tokens = dict(SPECIAL_TOKENS)
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self.image_start_tag, self.image_end_tag, self.image_pad_tag = image_start_tag, image_end_tag, image_pad_tag
        self.img_start_id = self.special_tokens[IMG_START]
        self.img_end_id = self.special_tokens[IMG_END]
        self.img_pad_id = self.special_tokens[IMG_PAD]
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

    def tokenize(self, text: str, **kwargs) -> List[str]:
        tokens: List[str] = []
        position = 0
        for match in _IMAGE.finditer(text):
            tokens += self._text_tokens(text[position:match.start()])
            path = match.group(1).encode("utf-8")
            if len(path) > IMG_TOKEN_SPAN:
                raise ValueError(f"an image path of {len(path)} bytes does not fit a span of {IMG_TOKEN_SPAN}")
            tokens += [IMG_START] + [chr(b) for b in path] + [IMG_PAD] * (IMG_TOKEN_SPAN - len(path)) + [IMG_END]
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

    def from_list_format(self, list_format: List[Dict]) -> str:
        text, pictures = "", 0
        for element in list_format:
            if "image" in element:
                pictures += 1
                text += f"Picture {pictures}: {IMG_START}{element['image']}{IMG_END}\n"
            elif "text" in element:
                text += element["text"]
            elif "box" in element:
                raise NotImplementedError("boxes are not part of the tiny fixture")
        return text

    def to_list_format(self, text: str) -> List[Dict]:
        elements: List[Dict] = []
        position = 0
        for match in _IMAGE.finditer(text):
            before = re.sub(r"Picture \d+: $", "", text[position:match.start()])
            if before:
                elements.append({"text": before})
            elements.append({"image": match.group(1)})
            position = match.end() + (1 if text[match.end():match.end() + 1] == "\n" else 0)
        if text[position:]:
            elements.append({"text": text[position:]})
        return elements

    def _decode(self, token_ids: Union[int, List[int]], skip_special_tokens: bool = False, errors: Optional[str] = None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        pieces, buffer = [], bytearray()
        for index in token_ids:
            if index == self.img_pad_id:
                continue
            if index in self._id_to_special:
                pieces.append(buffer.decode("utf-8", errors=errors or self.errors))
                buffer = bytearray()
                if not skip_special_tokens or index in (self.img_start_id, self.img_end_id):
                    pieces.append(self._id_to_special[index])
            else:
                buffer.append(index)
        pieces.append(buffer.decode("utf-8", errors=errors or self.errors))
        return "".join(pieces)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str, ...]:
        return ()
