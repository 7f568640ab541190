"""A SentencePiece model written in code: a tiny unigram vocabulary, serialised without the trainer or protobuf.

ChatGLM2/3, Baichuan2 and InternLM v1 ship a ``tokenizer.model`` (a SentencePiece ``ModelProto``) that their
remote tokenizers load with ``sentencepiece.SentencePieceProcessor``. The fixtures need one too, the same bytes
on every release and every sentencepiece version, so this module writes the protobuf message itself from a list
of pieces with scores: no training, no download. The message has the fields sentencepiece reads for a unigram
model (``sentencepiece_model.proto``): the pieces (text, score, type), the trainer spec (model type, vocabulary
size, the ids of ``<unk>``, ``<s>``, ``</s>``) and an identity normaliser that adds the ``▁`` prefix and escapes
spaces, as LLaMA-era models have.

Imports nothing beyond the standard library.
"""

from __future__ import annotations

import struct
from typing import Iterable, List, Sequence, Tuple

__all__ = ["NORMAL", "CONTROL", "USER_DEFINED", "UNKNOWN", "BASE_PIECES", "model_bytes"]

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4

_WORDS = (
    "hello", "world", "the", "a", "is", "and", "to", "of", "in", "it", "you", "how", "are", "what", "this",
    "token", "test", "chat", "user", "system", "assistant", "Round", "good", "day", "name",
)
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]<>-_/|=+*#%&@\n"
_CJK = "问答你好谢世界是的我：，。"

#: ``<unk>``, ``<s>``, ``</s>`` (ids 0, 1, 2), ``▁``, the words (each with and without ``▁``), single characters.
BASE_PIECES: Tuple[Tuple[str, float, int], ...] = (
    ("<unk>", 0.0, UNKNOWN),
    ("<s>", 0.0, CONTROL),
    ("</s>", 0.0, CONTROL),
    ("\u2581", -5.0, NORMAL),
    *(("\u2581" + word, -2.0 - 0.01 * i, NORMAL) for i, word in enumerate(_WORDS)),
    *((word, -3.0 - 0.01 * i, NORMAL) for i, word in enumerate(_WORDS) if len(word) > 1),
    *((char, -8.0 - 0.001 * i, NORMAL) for i, char in enumerate(_CHARS + _CJK)),
)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _field_float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def model_bytes(extra: Iterable[Tuple[str, float, int]] = (), *, add_dummy_prefix: bool = True) -> bytes:
    """The serialised ``ModelProto`` of :data:`BASE_PIECES` followed by ``extra`` (piece, score, type).

    ``extra`` pieces get the next ids in order; a piece already in the base vocabulary is rejected.
    """
    pieces: List[Tuple[str, float, int]] = list(BASE_PIECES)
    seen = {piece for piece, _, _ in pieces}
    for piece, score, kind in extra:
        if piece in seen:
            raise ValueError(f"duplicate piece {piece!r}")
        seen.add(piece)
        pieces.append((piece, float(score), int(kind)))
    message = b"".join(
        _field_bytes(1, _field_bytes(1, piece.encode("utf-8")) + _field_float(2, score) + _field_varint(3, kind))
        for piece, score, kind in pieces
    )
    trainer_spec = (
        _field_varint(3, 1)  # model_type: UNIGRAM
        + _field_varint(4, len(pieces))  # vocab_size
        + _field_varint(40, 0)  # unk_id
        + _field_varint(41, 1)  # bos_id
        + _field_varint(42, 2)  # eos_id
        + _field_varint(43, _PAD_NONE)  # pad_id: none
    )
    normalizer_spec = (
        _field_bytes(1, b"identity")
        + _field_varint(3, int(add_dummy_prefix))
        + _field_varint(4, 0)  # remove_extra_whitespaces
        + _field_varint(5, 1)  # escape_whitespaces
    )
    return message + _field_bytes(2, trainer_spec) + _field_bytes(3, normalizer_spec)


_PAD_NONE = -1


def piece_count(extra: Sequence[Tuple[str, float, int]] = ()) -> int:
    """How many pieces :func:`model_bytes` writes with ``extra``."""
    return len(BASE_PIECES) + len(extra)
