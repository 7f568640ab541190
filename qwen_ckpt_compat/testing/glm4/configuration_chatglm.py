# Test fixture written for qwen-ckpt-compat: an independent re-implementation of the *interface* of the
# GLM-4-9B(-chat) remote-code configuration (ChatGLM2/3's class name, model type and keys, with GLM-4's
# `rope_ratio` and `original_rope`). Like the real one it sets neither `use_cache` nor `max_length` itself: both
# came from `PretrainedConfig` before transformers 5.0. See docs/facts/glm4.md.

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    """Configuration of the tiny GLM-4-9B look-alike."""

    model_type = "chatglm"

    def __init__(
        self,
        num_layers=28,
        padded_vocab_size=65024,
        hidden_size=4096,
        ffn_hidden_size=13696,
        kv_channels=128,
        num_attention_heads=32,
        seq_length=2048,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
        rmsnorm=True,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        multi_query_attention=False,
        multi_query_group_num=1,
        fp32_residual_connection=False,
        quantization_bit=0,
        pre_seq_len=None,
        rope_ratio=1,
        original_rope=True,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.vocab_size = padded_vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.fp32_residual_connection = fp32_residual_connection
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.rope_ratio = rope_ratio
        self.original_rope = original_rope
        super().__init__(**kwargs)
