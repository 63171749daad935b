"""Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral (no sliding window), and look-alikes."""

from .base import ArchAdapter


class LlamaAdapter(ArchAdapter):
    family = "llama"
    model_types = ("llama", "mistral")

    def check_supported(self) -> None:
        super().check_supported()
        if getattr(self.config, "sliding_window", None) and self.config.model_type == "mistral":
            from ..errors import KvxError

            raise KvxError("mistral with a sliding window is not supported yet (use a config without one)")
