# Test fixture written for qwen-ckpt-compat: an independent, tiny re-implementation of the GLM-4-9B(-chat) remote
# code (THUDM's `modeling_chatglm.py` of June 2024, ChatGLM lineage). It reproduces the interface transformers and
# peft interact with: the class and module names of ChatGLM2/3 (`ChatGLMForConditionalGeneration`, `GLMTransformer`,
# `GLMBlock`, `model_type` "chatglm"), but **batch-first** hidden states `[batch, seq, hidden]`; the attention
# chosen from `CORE_ATTENTION_CLASSES` by `config._attn_implementation` (`_supports_sdpa`, `_supports_flash_attn_2`);
# no old `_set_gradient_checkpointing(module, value)`; a `gradient_checkpointing_enable(self,
# gradient_checkpointing_kwargs=None)` of its own that enables nothing (removed later upstream, see
# `write_tiny_glm4(revision="latest")`); `use_reentrant=False` hard-coded in the owner's checkpoint call; `skip_init`
# construction, no `post_init()` call, and `config.max_length` read in `ChatGLMForConditionalGeneration.__init__`.
# See docs/facts/glm4.md. It is not a copy of the real code.


import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.utils import skip_init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .configuration_chatglm import ChatGLMConfig

logger = logging.get_logger(__name__)


def _plain_init(cls, *args, **kwargs):
    return cls(*args, **kwargs)


def _dtype_of(config):
    return {"dtype": config.torch_dtype}


class RMSNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states):
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * normed).to(hidden_states.dtype)


class RotaryEmbedding(nn.Module):
    """Rotates the first `2 * dim` channels of each head in interleaved pairs; `inv_freq` is a (saved) buffer."""

    def __init__(self, dim, rope_ratio=1, original_impl=False, device=None, dtype=None):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).to(dtype=dtype) / dim))
        self.register_buffer("inv_freq", inv_freq)
        self.dim = dim
        self.rope_ratio = rope_ratio
        self.original_impl = original_impl

    def forward(self, max_seq_len):
        """`[max_seq_len, dim // 2, 2]`: cos and sin of every position and frequency."""
        base = 10000 * self.rope_ratio
        theta = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=self.inv_freq.device) / self.dim))
        positions = torch.arange(max_seq_len, dtype=torch.float, device=self.inv_freq.device)
        angles = torch.outer(positions, theta)
        cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        return cache.to(self.inv_freq.dtype) if self.inv_freq.dtype in (torch.float16, torch.bfloat16) else cache


def apply_rotary_pos_emb(x, rope_cache):
    """`x`: `[batch, heads, seq, head_dim]`; `rope_cache`: `[batch, seq, rot_dim // 2, 2]`."""
    batch, heads, seq = x.size(0), x.size(1), x.size(2)
    rot_dim = rope_cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    rope_cache = rope_cache[:, :seq]
    pairs = x.reshape(batch, heads, seq, rot_dim // 2, 2)
    rope_cache = rope_cache.view(-1, 1, seq, pairs.size(3), 2)
    rotated = torch.stack(
        [
            pairs[..., 0] * rope_cache[..., 0] - pairs[..., 1] * rope_cache[..., 1],
            pairs[..., 1] * rope_cache[..., 0] + pairs[..., 0] * rope_cache[..., 1],
        ],
        -1,
    ).flatten(3)
    return torch.cat((rotated, x_pass), dim=-1)


class CoreAttention(nn.Module):
    """Attention written out (`attn_implementation="eager"`); `query`/`key`/`value`: `[batch, heads, seq, dim]`."""

    def __init__(self, config, layer_number):
        super().__init__()
        self.config = config
        self.hidden_size_per_partition = config.kv_channels * config.num_attention_heads

    def forward(self, query, key, value, attention_mask):
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.size(-1))
        if attention_mask is None and scores.shape[2] == scores.shape[3]:
            attention_mask = ~torch.ones(scores.shape[2], scores.shape[3], dtype=torch.bool, device=scores.device).tril_()
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = F.dropout(F.softmax(scores, dim=-1).type_as(value), p=self.config.attention_dropout, training=self.training)
        context = torch.matmul(probs, value).transpose(1, 2)
        return context.reshape(context.size(0), context.size(1), self.hidden_size_per_partition)


class SdpaAttention(CoreAttention):
    """`attn_implementation="sdpa"`: torch's scaled dot-product attention."""

    def forward(self, query, key, value, attention_mask):
        dropout = self.config.attention_dropout if self.training else 0.0
        if attention_mask is None and query.shape[2] == key.shape[2]:
            context = F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout)
        else:
            mask = ~attention_mask if attention_mask is not None else None  # True in the mask means "masked"
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout)
        context = context.transpose(1, 2)
        return context.reshape(context.size(0), context.size(1), self.hidden_size_per_partition)


CORE_ATTENTION_CLASSES = {"eager": CoreAttention, "sdpa": SdpaAttention}


class SelfAttention(nn.Module):
    def __init__(self, config, layer_number, device=None):
        super().__init__()
        self.layer_number = max(1, layer_number)
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.head_dim = self.projection_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.multi_query_attention = config.multi_query_attention
        self.num_groups = config.multi_query_group_num if config.multi_query_attention else self.num_heads
        qkv_size = self.projection_size + 2 * self.head_dim * self.num_groups
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias,
            device=device, **_dtype_of(config),
        )
        self.core_attention = CORE_ATTENTION_CLASSES[config._attn_implementation](config, self.layer_number)
        self.dense = nn.Linear(
            self.projection_size, config.hidden_size, bias=config.add_bias_linear, device=device, **_dtype_of(config)
        )

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        # hidden_states: [batch, seq, hidden]
        mixed = self.query_key_value(hidden_states)
        query, key, value = mixed.split(
            [self.projection_size, self.head_dim * self.num_groups, self.head_dim * self.num_groups], dim=-1
        )
        # [batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim]
        query = query.view(query.size()[:-1] + (self.num_heads, self.head_dim)).transpose(1, 2)
        key = key.view(key.size()[:-1] + (self.num_groups, self.head_dim)).transpose(1, 2)
        value = value.view(value.size()[:-1] + (self.num_groups, self.head_dim)).transpose(1, 2)

        if rotary_pos_emb is not None:
            query = apply_rotary_pos_emb(query, rotary_pos_emb)
            key = apply_rotary_pos_emb(key, rotary_pos_emb)

        if kv_cache is not None:
            cache_key, cache_value = kv_cache
            key = torch.cat((cache_key, key), dim=2)
            value = torch.cat((cache_value, value), dim=2)
        kv_cache = (key, value) if use_cache else None

        repeat = self.num_heads // self.num_groups
        key = key.repeat_interleave(repeat, dim=1)
        value = value.repeat_interleave(repeat, dim=1)
        context = self.core_attention(query, key, value, attention_mask)
        return self.dense(context), kv_cache


class MLP(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(
            config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear, device=device,
            **_dtype_of(config),
        )
        self.dense_4h_to_h = nn.Linear(
            config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear, device=device,
            **_dtype_of(config),
        )

    def forward(self, hidden_states):
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    """One transformer layer on `[batch, seq, hidden]`; returns `(hidden_states, kv_cache)`."""

    def __init__(self, config, layer_number, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        norm = RMSNorm if config.rmsnorm else nn.LayerNorm
        self.input_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=config.torch_dtype)
        self.self_attention = SelfAttention(config, layer_number, device=device)
        self.hidden_dropout = config.hidden_dropout
        self.post_attention_layernorm = norm(
            config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=config.torch_dtype
        )
        self.mlp = MLP(config, device=device)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        normed = self.input_layernorm(hidden_states)
        attention_output, kv_cache = self.self_attention(
            normed, attention_mask, rotary_pos_emb, kv_cache=kv_cache, use_cache=use_cache
        )
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        hidden = residual + F.dropout(attention_output, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden
        output = residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)
        return output, kv_cache


class GLMTransformer(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.num_layers = config.num_layers
        self.post_layer_norm = config.post_layer_norm
        self.layers = nn.ModuleList([GLMBlock(config, i + 1, device=device) for i in range(self.num_layers)])
        if self.post_layer_norm:
            norm = RMSNorm if config.rmsnorm else nn.LayerNorm
            self.final_layernorm = norm(
                config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=config.torch_dtype
            )
        self.gradient_checkpointing = False

    def _get_layer(self, layer_number):
        return self.layers[layer_number]

    def forward(
        self, hidden_states, attention_mask, rotary_pos_emb, kv_caches=None, use_cache=True, output_hidden_states=False
    ):
        if not kv_caches:
            kv_caches = [None] * self.num_layers
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`...")
            use_cache = False
        presents = () if use_cache else None
        all_hidden_states = () if output_hidden_states else None
        for index in range(self.num_layers):
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            layer = self._get_layer(index)
            if self.gradient_checkpointing and self.training:
                layer_ret = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, attention_mask, rotary_pos_emb, kv_caches[index], use_cache,
                    use_reentrant=False,
                )
            else:
                layer_ret = layer(
                    hidden_states, attention_mask, rotary_pos_emb, kv_cache=kv_caches[index], use_cache=use_cache
                )
            hidden_states, kv_cache = layer_ret
            if use_cache:
                presents = presents + (kv_cache,)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if self.post_layer_norm:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, presents, all_hidden_states, None


class ChatGLMPreTrainedModel(PreTrainedModel):
    is_parallelizable = False
    supports_gradient_checkpointing = True
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]
    _supports_flash_attn_2 = True
    _supports_sdpa = True

    def _init_weights(self, module):
        """The weights come from the checkpoint (modules are built with `skip_init`)."""
        return

    def get_masks(self, input_ids, past_key_values, padding_mask=None):
        """Boolean `[batch, 1, seq, past + seq]` mask, True where attention is not allowed."""
        batch_size, seq_length = input_ids.shape
        mask = torch.ones(batch_size, seq_length, seq_length, device=input_ids.device).tril_()
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_length:
            mask = torch.cat((torch.ones(batch_size, seq_length, past_length, device=input_ids.device), mask), dim=-1)
        if padding_mask is not None:
            mask = mask * padding_mask.unsqueeze(1)
            if not past_length:
                mask -= padding_mask.unsqueeze(-1) - 1
        return (mask < 0.5).bool().unsqueeze(1)

    def get_position_ids(self, input_ids, device):
        batch_size, seq_length = input_ids.shape
        return torch.arange(seq_length, dtype=torch.long, device=device).unsqueeze(0).repeat(batch_size, 1)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        # GLM-4-9B's June 2024 code: refuses a model that cannot checkpoint; turns nothing on.
        if not self.supports_gradient_checkpointing:
            raise ValueError(f"{self.__class__.__name__} does not support gradient checkpointing.")


class Embedding(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.padded_vocab_size, config.hidden_size, dtype=config.torch_dtype, device=device
        )
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)  # [batch, seq, hidden]: batch-first, unlike ChatGLM2/3
        return embeddings.float() if self.fp32_residual_connection else embeddings


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config, device=None, empty_init=True):
        super().__init__(config)
        init_method = skip_init if empty_init else _plain_init
        init_kwargs = {"device": device} if device is not None else {}
        self.embedding = init_method(Embedding, config, **init_kwargs)
        self.num_layers = config.num_layers
        self.seq_length = config.seq_length
        rotary_dim = config.hidden_size // config.num_attention_heads if config.kv_channels is None else config.kv_channels
        self.rotary_pos_emb = RotaryEmbedding(
            rotary_dim // 2, rope_ratio=config.rope_ratio, original_impl=config.original_rope, device=device,
            dtype=config.torch_dtype,
        )
        self.encoder = init_method(GLMTransformer, config, **init_kwargs)
        self.output_layer = init_method(
            nn.Linear, config.hidden_size, config.padded_vocab_size, bias=False, dtype=config.torch_dtype, **init_kwargs
        )

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        full_attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict

        # Deliberate tolerance (not a ChatGLM behaviour): newer `generate()` may hand in an empty `Cache` object
        # on the first step; this model only speaks legacy tuples, which it returns from then on.
        if past_key_values is not None and not isinstance(past_key_values, (tuple, list)):
            past_key_values = past_key_values.to_legacy_cache() if past_key_values.get_seq_length() > 0 else None

        batch_size, seq_length = input_ids.shape
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        if full_attention_mask is None:
            if (attention_mask is not None and not attention_mask.all()) or (past_key_values and seq_length != 1):
                full_attention_mask = self.get_masks(input_ids, past_key_values, padding_mask=attention_mask)

        rotary_pos_emb = self.rotary_pos_emb(self.seq_length)
        if position_ids is not None:
            rotary_pos_emb = rotary_pos_emb[position_ids]
        else:
            rotary_pos_emb = rotary_pos_emb[None, :seq_length]

        hidden_states, presents, all_hidden_states, all_self_attentions = self.encoder(
            inputs_embeds,
            full_attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            kv_caches=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        if not return_dict:
            return tuple(v for v in (hidden_states, presents, all_hidden_states, all_self_attentions) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=presents,
            hidden_states=all_hidden_states,
            attentions=all_self_attentions,
        )


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.max_length
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.config = config
        self.quantized = False

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, position_ids=None, use_cache=None, **kwargs
    ):
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids, device=input_ids.device)
        if past_key_values:
            position_ids = position_ids[..., -1:]
            input_ids = input_ids[:, -1:]
        return {
            "input_ids": input_ids,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "return_last_logit": True,
            "use_cache": use_cache,
        }

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        return_last_logit=False,
    ):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        transformer_outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        hidden_states = transformer_outputs[0]
        if return_last_logit:
            hidden_states = hidden_states[:, -1:]
        lm_logits = self.transformer.output_layer(hidden_states)

        loss = None
        if labels is not None:
            lm_logits = lm_logits.to(torch.float32)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=-100)
            lm_logits = lm_logits.to(hidden_states.dtype)
            loss = loss.to(hidden_states.dtype)

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
    def _reorder_cache(past, beam_idx):
        return tuple(
            (layer[0].index_select(0, beam_idx.to(layer[0].device)), layer[1].index_select(0, beam_idx.to(layer[1].device)))
            for layer in past
        )
