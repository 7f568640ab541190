# Test fixture written for qwen-ckpt-compat: an independent, tiny re-implementation of the Qwen-Audio(-Chat)
# remote-code model: the Qwen v1 fixture's text model (same interface, old `_set_gradient_checkpointing(module,
# value)` flagging `QWenModel` only) with a Whisper-style audio encoder as `QWenModel.audio` (`audio.py`). Audio
# enters as `audio_info` (`input_audios`, `input_audio_lengths`, `audio_span_tokens`, from the tokenizer's
# `process_audio`), passed to `forward` and `generate`; the encoder's output replaces the hidden states of each
# `<audio>...</audio>` span (`config.audio["audio_start_id"]` and that id + 1). A batch without audio does not run
# the encoder. See docs/facts/qwen-audio.md. It is not a copy of the real code.

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizer
from transformers.generation.logits_process import LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .audio import AudioEncoder
from .configuration_qwen import QWenConfig
from .qwen_generation_utils import (
    HistoryType,
    StopWordsLogitsProcessor,
    decode_tokens,
    get_stop_words_ids,
    make_context,
)

logger = logging.get_logger(__name__)

_SYSTEM = "You are a helpful assistant."


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = (x.float() * torch.rsqrt(variance + self.eps)).type_as(x)
        return normed * self.weight


class RotaryEmbedding(nn.Module):
    """Rotary tables; `inv_freq` is rebuilt on first use and whenever the dynamic-NTK factor changes."""

    def __init__(self, dim: int, base: float = 10000):
        super().__init__()
        self.dim = dim
        self.base = base
        self.register_buffer("inv_freq", self._inv_freq(1.0, None), persistent=False)
        # Not cached yet: the first forward recomputes `inv_freq`, so a buffer left uninitialised by a
        # meta-device load does no harm.
        self._ntk_alpha_cached = None

    def _inv_freq(self, ntk_alpha, device):
        base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(self, max_seq_len: int, ntk_alpha: float = 1.0, device=None):
        """Returns `(cos, sin)`, each of shape `(1, 1, max_seq_len, dim)`, in float32."""
        if device is None:
            device = self.inv_freq.device
        if ntk_alpha != self._ntk_alpha_cached or self.inv_freq.device != torch.device(device):
            self.inv_freq = self._inv_freq(ntk_alpha, device)
            self._ntk_alpha_cached = ntk_alpha
        inv_freq = self.inv_freq
        positions = torch.arange(max_seq_len, device=inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)[None, None, :, :]
        return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(t, cos, sin):
    """Rotates the first `cos.shape[-1]` channels of `t` (`(batch, heads, seq, head_dim)`)."""
    rot_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    t_rot = (t_rot.float() * cos + _rotate_half(t_rot.float()) * sin).type_as(t)
    return torch.cat((t_rot, t_pass), dim=-1)


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.scale_attn_weights = config.scale_attn_weights
        self.use_logn_attn = config.use_logn_attn
        self.seq_length = config.seq_length
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)
        self.attn_dropout = nn.Dropout(config.attn_dropout_prob)

    def _split_heads(self, x):
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states,
        rotary_pos_emb_list=None,
        layer_past=None,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        use_cache=False,
    ):
        query, key, value = self.c_attn(hidden_states).split(self.projection_size, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)

        if rotary_pos_emb_list is not None:
            # One `(cos, sin)` pair for the whole batch, or one per sample.
            cos = torch.cat([pair[0] for pair in rotary_pos_emb_list], dim=0)
            sin = torch.cat([pair[1] for pair in rotary_pos_emb_list], dim=0)
            query = apply_rotary_pos_emb(query, cos, sin)
            key = apply_rotary_pos_emb(key, cos, sin)

        if layer_past is not None:
            past_key, past_value = layer_past
            key = torch.cat((past_key, key), dim=2)
            value = torch.cat((past_value, value), dim=2)
        present = (key, value) if use_cache else None

        q_len, kv_len = query.size(2), key.size(2)
        if self.use_logn_attn and not self.training and kv_len > self.seq_length:
            positions = torch.arange(kv_len - q_len + 1, kv_len + 1, device=query.device, dtype=torch.float32)
            logn = torch.clamp(positions.log() / math.log(self.seq_length), min=1.0)
            query = query * logn[None, None, :, None].type_as(query)

        # Additive bias: causal part, then padding (`attention_mask` is already additive).
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0

        attn_weights = None
        if output_attentions or head_mask is not None:
            bias = torch.zeros(q_len, kv_len, dtype=query.dtype, device=query.device)
            if attention_mask is not None:
                bias = bias + attention_mask
            bias = bias.masked_fill(~causal, torch.finfo(query.dtype).min)
            scores = torch.matmul(query, key.transpose(-1, -2)) * scale + bias
            attn_weights = self.attn_dropout(torch.softmax(scores.float(), dim=-1).type_as(query))
            if head_mask is not None:
                attn_weights = attn_weights * head_mask
            context = torch.matmul(attn_weights, value)
        else:
            # The mask SDPA gets is built the way Qwen v1 builds it when queries and keys line up (no KV cache):
            # a boolean causal mask of shape (1, 1, q, q) without a padding mask; with one, the additive padding
            # mask expanded to (batch, 1, q, q) with the causal part filled in. With a KV cache (q < kv) the
            # fixture keeps its additive bias (Qwen v1 drops the causal part there; one query row is the same).
            if q_len == kv_len:
                mask = causal.view(1, 1, q_len, kv_len)
                if attention_mask is not None:
                    mask = attention_mask.expand(-1, -1, q_len, -1).masked_fill(~mask, torch.finfo(query.dtype).min)
            else:
                mask = torch.zeros(q_len, kv_len, dtype=query.dtype, device=query.device)
                if attention_mask is not None:
                    mask = mask + attention_mask
                mask = mask.masked_fill(~causal, torch.finfo(query.dtype).min)
            # As in Qwen v1: SDPA with its default 1/sqrt(head_dim) scaling (torch 2.0 has no `scale=`).
            dropout_p = self.attn_dropout.p if self.training else 0.0
            if not self.scale_attn_weights:
                query = query * math.sqrt(self.head_dim)
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)

        context = context.transpose(1, 2).reshape(hidden_states.shape[0], q_len, self.projection_size)
        outputs = (self.c_proj(context), present)
        if output_attentions:
            outputs += (attn_weights,)
        return outputs


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states):
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states,
        rotary_pos_emb_list=None,
        layer_past=None,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        use_cache=False,
        output_attentions=False,
    ):
        attn_outputs = self.attn(
            self.ln_1(hidden_states),
            rotary_pos_emb_list=rotary_pos_emb_list,
            layer_past=layer_past,
            attention_mask=attention_mask,
            head_mask=head_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + attn_outputs[0]
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        # (hidden_states, present) + (attn_weights,) when use_cache, else (hidden_states,) + (attn_weights,)
        extra = attn_outputs[1:] if use_cache else attn_outputs[2:]
        return (hidden_states,) + extra


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    is_parallelizable = False
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = "past_key_values"

    def __init__(self, *inputs, **kwargs):
        super().__init__(*inputs, **kwargs)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, QWenModel):
            module.gradient_checkpointing = value


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.num_hidden_layers = config.num_hidden_layers
        self.embed_dim = config.hidden_size
        self.seq_length = config.seq_length
        self.use_dynamic_ntk = config.use_dynamic_ntk
        self.use_flash_attn = config.use_flash_attn  # accepted for compatibility; SDPA is always used
        self.gradient_checkpointing = False

        self.wte = nn.Embedding(self.vocab_size, self.embed_dim)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = RotaryEmbedding(int(config.kv_channels * config.rotary_pct), base=config.rotary_emb_base)
        self.h = nn.ModuleList([QWenBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.audio = AudioEncoder(**config.audio)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def _ntk_alpha(self, kv_seq_len: int) -> float:
        if not self.use_dynamic_ntk or self.training or kv_seq_len <= self.seq_length:
            return 1.0
        return max(2 ** math.ceil(math.log(kv_seq_len / self.seq_length, 2) + 1) - 1, 1)

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        audio_info=None,
    ):
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict

        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is not None:
            input_shape = input_ids.size()
            input_ids = input_ids.view(-1, input_shape[-1])
            batch_size = input_ids.shape[0]
        elif inputs_embeds is not None:
            input_shape = inputs_embeds.size()[:-1]
            batch_size = inputs_embeds.shape[0]
        else:
            raise ValueError("You have to specify either input_ids or inputs_embeds")

        # Deliberate tolerance (not a Qwen v1 behaviour): newer `generate()` hands in an empty `Cache`
        # object on the first step; this model only speaks legacy tuples, which it returns from then on.
        if past_key_values is not None and not isinstance(past_key_values, (tuple, list)):
            if past_key_values.get_seq_length() > 0:
                past_key_values = past_key_values.to_legacy_cache()
            else:
                past_key_values = None
        if past_key_values is None:
            past_length = 0
            past_key_values = tuple([None] * len(self.h))
        else:
            past_length = past_key_values[0][0].size(-2)

        if attention_mask is not None:
            # (batch, kv_len) of 1/0 -> additive (batch, 1, 1, kv_len)
            attention_mask = attention_mask.view(batch_size, -1)[:, None, None, :].to(dtype=self.dtype)
            attention_mask = (1.0 - attention_mask) * torch.finfo(self.dtype).min

        encoder_attention_mask = None
        head_mask = self.get_head_mask(head_mask, self.config.num_hidden_layers)

        audios, spans = None, None
        start_id = self.config.audio["audio_start_id"]
        if past_key_values[0] is None and input_ids is not None and torch.any(input_ids == start_id):
            starts = torch.where(input_ids == start_id)
            ends = torch.where(input_ids == start_id + 1)
            if not torch.equal(starts[0], ends[0]):
                raise ValueError("every <audio> needs its </audio> in the same row")
            spans = torch.stack((starts[0], starts[1], ends[1]), dim=1)
            if audio_info is None:
                raise ValueError("the ids hold audio spans: pass the `audio_info` of `tokenizer.process_audio`")
            audios = self.audio.encode(
                audio_info["input_audios"], audio_info["input_audio_lengths"], audio_info["audio_span_tokens"]
            )

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        hidden_states = self.drop(inputs_embeds)
        if audios is not None:
            hidden_states = hidden_states.clone()
            for index, (row, first, last) in enumerate(spans.tolist()):
                hidden_states[row, first : last + 1] = audios[index].to(hidden_states.dtype)
        output_shape = input_shape + (hidden_states.size(-1),)

        kv_seq_len = past_length + hidden_states.size(1)
        cos, sin = self.rotary_emb(kv_seq_len, ntk_alpha=self._ntk_alpha(kv_seq_len), device=hidden_states.device)
        rotary_pos_emb_list = [(cos[:, :, past_length:], sin[:, :, past_length:])]

        if self.gradient_checkpointing and self.training:
            if use_cache:
                logger.warning_once(
                    "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`..."
                )
                use_cache = False

        presents = () if use_cache else None
        all_self_attentions = () if output_attentions else None
        all_hidden_states = () if output_hidden_states else None
        for i, (block, layer_past) in enumerate(zip(self.h, past_key_values)):
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)

            if self.gradient_checkpointing and self.training:

                def create_custom_forward(module):
                    def custom_forward(*inputs):
                        return module(*inputs, use_cache, output_attentions)

                    return custom_forward

                outputs = torch.utils.checkpoint.checkpoint(
                    create_custom_forward(block),
                    hidden_states,
                    rotary_pos_emb_list,
                    None,
                    attention_mask,
                    head_mask[i],
                    encoder_hidden_states,
                    encoder_attention_mask,
                )
            else:
                outputs = block(
                    hidden_states,
                    layer_past=layer_past,
                    rotary_pos_emb_list=rotary_pos_emb_list,
                    attention_mask=attention_mask,
                    head_mask=head_mask[i],
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                    use_cache=use_cache,
                    output_attentions=output_attentions,
                )

            hidden_states = outputs[0]
            if use_cache:
                presents = presents + (outputs[1],)
            if output_attentions:
                all_self_attentions = all_self_attentions + (outputs[2 if use_cache else 1],)

        hidden_states = self.ln_f(hidden_states).view(output_shape)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)

        if not return_dict:
            return tuple(
                v for v in (hidden_states, presents, all_hidden_states, all_self_attentions) if v is not None
            )
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=presents,
            hidden_states=all_hidden_states,
            attentions=all_self_attentions,
        )


class QWenLMHeadModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        if config.bf16 and config.fp16:
            raise ValueError("Only one of `bf16` and `fp16` can be set in the config.")
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.bf16:
            self.transformer.bfloat16()
            self.lm_head.bfloat16()
        if config.fp16:
            self.transformer.half()
            self.lm_head.half()
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        if past_key_values:
            input_ids = input_ids[:, -1].unsqueeze(-1)
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update(
            {
                "past_key_values": past_key_values,
                "use_cache": kwargs.get("use_cache"),
                "attention_mask": kwargs.get("attention_mask"),
                "audio_info": kwargs.get("audio_info"),
            }
        )
        return model_inputs

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        audio_info=None,
    ):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        transformer_outputs = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            audio_info=audio_info,
        )
        lm_logits = self.lm_head(transformer_outputs[0])

        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))

        if not return_dict:
            output = (lm_logits,) + tuple(transformer_outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=lm_logits,
            past_key_values=transformer_outputs.past_key_values,
            hidden_states=transformer_outputs.hidden_states,
            attentions=transformer_outputs.attentions,
        )

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(
            tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer_past)
            for layer_past in past_key_values
        )

    def _chat_inputs(self, tokenizer, query, history, system, stop_words_ids, generation_config):
        chat_format = getattr(generation_config, "chat_format", "chatml")
        max_window_size = getattr(generation_config, "max_window_size", self.config.seq_length)
        _, context_tokens = make_context(
            tokenizer, query, history=history, system=system, max_window_size=max_window_size, chat_format=chat_format
        )
        stop_words_ids = list(stop_words_ids or []) + get_stop_words_ids(chat_format, tokenizer)
        eos_token_id = generation_config.eos_token_id
        if eos_token_id is None:
            eos_token_id = tokenizer.eod_id
        processors = LogitsProcessorList([StopWordsLogitsProcessor(stop_words_ids, eos_token_id)])
        input_ids = torch.tensor([context_tokens], device=self.device)
        return input_ids, processors

    def chat(
        self,
        tokenizer: PreTrainedTokenizer,
        query: str,
        history: Optional[HistoryType] = None,
        system: str = _SYSTEM,
        stop_words_ids: Optional[List[List[int]]] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs,
    ) -> Tuple[str, HistoryType]:
        generation_config = generation_config if generation_config is not None else self.generation_config
        history = list(history or [])
        input_ids, processors = self._chat_inputs(tokenizer, query, history, system, stop_words_ids, generation_config)
        outputs = self.generate(
            input_ids, generation_config=generation_config, logits_processor=processors, **kwargs
        )
        response = decode_tokens(outputs[0], tokenizer, context_length=input_ids.size(1))
        history.append((query, response))
        return response, history

    def chat_stream(
        self,
        tokenizer: PreTrainedTokenizer,
        query: str,
        history: Optional[HistoryType] = None,
        system: str = _SYSTEM,
        stop_words_ids: Optional[List[List[int]]] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs,
    ):
        from transformers_stream_generator.main import NewGenerationMixin, StreamGenerationConfig

        generation_config = generation_config if generation_config is not None else self.generation_config
        input_ids, processors = self._chat_inputs(tokenizer, query, history, system, stop_words_ids, generation_config)
        self.__class__.generate_stream = NewGenerationMixin.generate
        self.__class__.sample_stream = NewGenerationMixin.sample_stream
        # transformers_stream_generator only streams in sampling mode.
        stream_config = StreamGenerationConfig(**{**generation_config.to_dict(), "do_sample": True}, do_stream=True)

        def stream_generator():
            generated: List[int] = []
            for token in self.generate_stream(
                input_ids,
                return_dict_in_generate=False,
                generation_config=stream_config,
                logits_processor=processors,
                seed=-1,
                **kwargs,
            ):
                generated.append(token.item())
                yield tokenizer.decode(generated, skip_special_tokens=True, errors="ignore")

        return stream_generator()
