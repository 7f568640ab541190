# Test fixture written for qwen-ckpt-compat: the tokenizer of Baichuan2-7B/13B (Base, Chat), re-implemented from
# the documented interface of the 2023 remote code (not copied from it). What matters for the tests is kept as
# the real file has it: a LLaMA-era SentencePiece tokenizer whose `__init__` wraps the special tokens in
# `AddedToken`, calls `super().__init__(...)` FIRST and only then loads `self.sp_model` (transformers 4.34's
# `PreTrainedTokenizer.__init__` adds the special tokens, which asks `vocab_size` / `get_vocab`, which read
# `self.sp_model`: "'BaichuanTokenizer' object has no attribute 'sp_model'"); `add_bos_token` / `add_eos_token`
# in `build_inputs_with_special_tokens`; special tokens kept whole when decoding; the imports of that era
# (`transformers.tokenization_utils`).

import os
from shutil import copyfile
from typing import Any, Dict, List, Optional, Tuple

import sentencepiece as spm
from transformers.tokenization_utils import AddedToken, PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


def _added(token):
    return AddedToken(token, lstrip=False, rstrip=False) if isinstance(token, str) else token


class BaichuanTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        sp_model_kwargs: Optional[Dict[str, Any]] = None,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.sp_model_kwargs = {} if sp_model_kwargs is None else sp_model_kwargs
        bos_token, eos_token, unk_token, pad_token = (_added(t) for t in (bos_token, eos_token, unk_token, pad_token))
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        return state

    def __setstate__(self, state):
        self.__dict__ = state
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(self.vocab_file)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def get_vocab(self):
        vocab = {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.IdToPiece(index)

    def convert_tokens_to_string(self, tokens):
        pieces, text, previous_special = [], "", False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not previous_special and i != 0:
                    text += " "
                text += self.sp_model.decode(pieces) + token
                previous_special, pieces = True, []
            else:
                pieces.append(token)
                previous_special = False
        return text + self.sp_model.decode(pieces)

    def save_vocabulary(self, save_directory, filename_prefix: Optional[str] = None) -> Tuple[str]:
        if not os.path.isdir(save_directory):
            return
        out_file = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file) and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out_file)
        elif not os.path.isfile(self.vocab_file):
            with open(out_file, "wb") as target:
                target.write(self.sp_model.serialized_model_proto())
        return (out_file,)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None, already_has_special_tokens: bool = False) -> List[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0=token_ids_0, token_ids_1=token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None) -> List[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = [0] * len(bos + token_ids_0 + eos)
        if token_ids_1 is not None:
            output += [1] * len(bos + token_ids_1 + eos)
        return output
