"""Gemma 3 text models: q/k norms with a (1 + w) gain, sandwich norms, sliding local layers, MQA."""

from .base import QKNormAdapter


class Gemma3Adapter(QKNormAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)

    def k_norm_weight(self, attn):
        # Gemma3RMSNorm multiplies by (1 + weight), not by weight.
        return 1.0 + super().k_norm_weight(attn)

    def check_supported(self) -> None:
        super().check_supported()
        from ..errors import KvxError

        if getattr(self.config, "attn_logit_softcapping", None):
            raise KvxError("gemma3 with attention logit soft-capping is not supported")
        if getattr(self.config, "use_bidirectional_attention", False):
            raise KvxError("gemma3 with bidirectional attention is not a causal LM")
