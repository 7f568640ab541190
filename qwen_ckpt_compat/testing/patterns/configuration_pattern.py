# Test fixture written for qwen-ckpt-compat: the config of a tiny 2023-style remote-code causal LM (not a copy of
# any model's code). `write_pattern_model(path, "rope_scaling_null")` adds the `rope_scaling` argument.

from transformers import PretrainedConfig


class PatternConfig(PretrainedConfig):
    model_type = "qcc_pattern"

    def __init__(
        self,
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        super().__init__(**kwargs)
