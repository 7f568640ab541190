# Test fixture written for qwen-ckpt-compat: a tiny causal LM in the style of 2023 remote code (the old
# `_set_gradient_checkpointing(self, module, value=False)` flagging the model that owns the layers, which calls
# `torch.utils.checkpoint.checkpoint` itself without `use_reentrant`). It is not a copy of any model's code.
# `qwen_ckpt_compat.testing.write_pattern_model(path, pattern)` writes it with one pattern of old remote code
# switched on (docs/facts/old-remote-code.md): a renamed block, a head tied to the input embeddings by default
# only, a forward that rejects keyword arguments it does not know, a test of `config.rope_scaling is None`.

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_pattern import PatternConfig


class PatternRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.eps)


def rotate_half_pairs(x, positions, scale):
    """Rotary embedding on `[batch, heads, seq, head_dim]`, positions divided by `scale` (linear scaling)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, dtype=torch.float32, device=x.device) / half))
    angles = (positions.float() / scale)[..., None] * inv_freq
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class PatternAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.rope_scale = 1.0  # ROPE SCALING

    def forward(self, hidden_states, positions, attention_mask=None):
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query = rotate_half_pairs(qkv[0], positions, self.rope_scale)
        key = rotate_half_pairs(qkv[1], positions, self.rope_scale)
        mask = torch.ones(length, length, dtype=torch.bool, device=hidden_states.device).tril()
        if attention_mask is not None:
            mask = mask[None, None] & attention_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(query, key, qkv[2], attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class PatternBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_norm = PatternRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = PatternAttention(config)
        self.post_norm = PatternRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp_up = nn.Linear(config.hidden_size, 2 * config.hidden_size, bias=False)
        self.mlp_down = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, positions, attention_mask=None):
        hidden_states = hidden_states + self.attn(self.input_norm(hidden_states), positions, attention_mask)
        return hidden_states + self.mlp_down(F.silu(self.mlp_up(self.post_norm(hidden_states))))


class PatternPreTrainedModel(PreTrainedModel):
    config_class = PatternConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PatternBlock"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, PatternModel):
            module.gradient_checkpointing = value


class PatternModel(PatternPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([PatternBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = PatternRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden_states.shape[:2]
        positions = torch.arange(length, device=hidden_states.device)[None].expand(batch, -1)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states, positions, attention_mask)
            else:
                hidden_states = layer(hidden_states, positions, attention_mask=attention_mask)
        return self.norm(hidden_states)


class PatternForCausalLM(PatternPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = PatternModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        hidden_states = self.model(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits)
