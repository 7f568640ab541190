# Test fixture written for qwen-ckpt-compat: the tokenizer of GLM-4-9B(-chat), re-implemented from the documented
# interface of its remote code (not copied from it). What matters for the tests is kept as the real file has it
# (docs/facts/glm4.md, "The tokenizer"):
# * `tokenizer.model` is a tiktoken ranks file (one "<base64 bytes> <rank>" per line), read in `__init__` into a
#   `tiktoken.Encoding` with a GPT-4-like split pattern; the special tokens get the ids after the ranks;
# * tokens are `bytes` (the ranks' keys), not `str`: `_tokenize` returns them and `convert_tokens_to_string`
#   joins bytes and special-token strings;
# * `__init__(vocab_file, padding_side="left", ..., encode_special_tokens=False)` builds everything before
#   `super().__init__`; `eos_token_id` is a read-only property (`<|endoftext|>`), the rest comes from
#   `tokenizer_config.json`;
# * `build_inputs_with_special_tokens` prepending [gMASK] and <sop>;
# * `_pad(encoded_inputs, max_length, padding_strategy, pad_to_multiple_of, return_attention_mask)`: the signature
#   of transformers before 4.45 (no `padding_side`), left padding only (an assert), `position_ids` padded too;
# * `build_chat_input` (role tokens, then `batch_encode_plus`), beside the chat template of `tokenizer_config.json`.

import base64
import os
from typing import Dict, List, Optional, Union

import tiktoken
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, EncodedInput
from transformers.utils import PaddingStrategy

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
]  # fmt: skip


class ChatGLM4Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(
        self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, encode_special_tokens=False, **kwargs
    ):
        self.name = "GLM4Tokenizer"
        self.vocab_file = vocab_file
        self.encode_special_tokens = encode_special_tokens
        ranks: Dict[bytes, int] = {}
        with open(vocab_file) as f:
            for line in f:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        self.mergeable_ranks = ranks
        self.special_tokens = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.special_token_ids = {i: token for token, i in self.special_tokens.items()}
        self.tokenizer = tiktoken.Encoding(
            name="glm4_tiny", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.decoder = {rank: token for token, rank in ranks.items()}
        self.n_words = len(self.decoder) + len(self.special_tokens)
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def get_command(self, token):
        assert token in self.special_tokens, token
        return self.special_tokens[token]

    @property
    def vocab_size(self):
        return self.n_words

    @property
    def eos_token_id(self):
        return self.get_command("<|endoftext|>")

    def get_vocab(self):
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def convert_tokens_to_string(self, tokens: List[Union[bytes, str]]) -> str:
        text, pending = "", b""
        for token in tokens:
            if isinstance(token, bytes):
                pending += token
                continue
            if not isinstance(token, str):
                raise TypeError("a token is bytes or str")
            if pending:
                text, pending = text + pending.decode("utf-8", errors="replace"), b""
            text += token
        return text + (pending.decode("utf-8", errors="replace") if pending else "")

    def _tokenize(self, text, **kwargs):
        if self.encode_special_tokens:
            ids = self.tokenizer.encode(text, allowed_special="all")
        else:
            ids = self.tokenizer.encode(text, disallowed_special=())
        return [self.decoder[i] for i in ids]

    def _convert_token_to_id(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.mergeable_ranks[token]

    def _convert_id_to_token(self, index):
        if index in self.special_token_ids:
            return self.special_token_ids[index]
        return self.decoder[index]

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if os.path.isdir(save_directory):
            vocab_file = os.path.join(save_directory, self.vocab_files_names["vocab_file"])
        else:
            vocab_file = save_directory
        with open(self.vocab_file, "rb") as source:
            data = source.read()
        with open(vocab_file, "wb") as target:
            target.write(data)
        return (vocab_file,)

    def get_prefix_tokens(self):
        return [self.get_command("[gMASK]"), self.get_command("<sop>")]

    def build_single_message(self, role, metadata, message):
        assert role in ["system", "user", "assistant", "observation"], role
        role_tokens = [self.get_command(f"<|{role}|>")] + self.tokenizer.encode(f"{metadata}\n")
        return role_tokens + self.tokenizer.encode(message, disallowed_special=())

    def build_chat_input(self, query, history=None, role="user"):
        input_ids = []
        for item in history or []:
            input_ids.extend(self.build_single_message(item["role"], item.get("metadata", ""), item["content"]))
        input_ids.extend(self.build_single_message(role, "", query))
        input_ids.extend([self.get_command("<|assistant|>")])
        return self.batch_encode_plus([input_ids], return_tensors="pt", is_split_into_words=True)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None) -> List[int]:
        token_ids_0 = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            token_ids_0 = token_ids_0 + token_ids_1 + [self.get_command("<|endoftext|>")]
        return token_ids_0

    def _pad(
        self,
        encoded_inputs: Union[Dict[str, EncodedInput], BatchEncoding],
        max_length: Optional[int] = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: Optional[int] = None,
        return_attention_mask: Optional[bool] = None,
    ) -> dict:
        assert self.padding_side == "left"

        required_input = encoded_inputs[self.model_input_names[0]]
        seq_length = len(required_input)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = len(required_input)
        if max_length is not None and pad_to_multiple_of is not None and (max_length % pad_to_multiple_of != 0):
            max_length = ((max_length // pad_to_multiple_of) + 1) * pad_to_multiple_of
        needs_to_be_padded = padding_strategy != PaddingStrategy.DO_NOT_PAD and len(required_input) != max_length

        if "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * seq_length
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(seq_length))
        if needs_to_be_padded:
            difference = max_length - len(required_input)
            if "attention_mask" in encoded_inputs:
                encoded_inputs["attention_mask"] = [0] * difference + encoded_inputs["attention_mask"]
            if "position_ids" in encoded_inputs:
                encoded_inputs["position_ids"] = [0] * difference + encoded_inputs["position_ids"]
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * difference + required_input
        return encoded_inputs
