"""A Llama causal LM (SmolLM2) that can run in two halves, as `fl_core.encoder` does for MiniLM.

With adapters on the top layers only, the embeddings and the lower layers are a fixed public function of each text:
`frozen_prefix` computes their output once per example, and training runs the top layers over it
(`forward(prefix=...)`), for the same loss and gradients as the whole model. Only the positions that predict an
answer token go through the output layer (49,152 by 576 on SmolLM2), the largest cost left once the prefix is cached.
Without `prefix` the model is transformers' own `LlamaForCausalLM`: generation, evaluation and serving are unchanged,
and the adapter's weight names are those of a plain Llama, so peft loads it onto one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Cache, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

from .encoder import packed_linear, require_frozen_prefix, require_lora_only_in_packed, scatter_tokens


class PrefixedLlama(LlamaForCausalLM):
    frozen_layers = 0  # set by `split`: the lower layers that carry no adapter
    attention_in_prefix = False  # the encoder's refinement (a frozen attention block in the prefix) is not used here

    def split(self, trainable_layers: int) -> None:
        layers = self.config.num_hidden_layers
        if not 1 <= trainable_layers <= layers:
            raise ValueError(f"trainable_layers must be between 1 and {layers} (got {trainable_layers})")
        if layers > trainable_layers and float(getattr(self.config, "attention_dropout", 0.0)) > 0:
            raise ValueError("PrefixedLlama: a cached prefix would hold one draw of attention dropout")
        self.frozen_layers = layers - trainable_layers

    def settle_prefix(self) -> None:
        """Once adapters are attached: nothing in the prefix may train (a stale cache would be a wrong model), and
        the adapted layers' feed-forward blocks, which run packed, train LoRA's A and B only."""
        require_frozen_prefix(type(self).__name__, self.prefix_modules())
        require_lora_only_in_packed(type(self).__name__, {
            f"model.layers.{i}.mlp": self.model.layers[i].mlp
            for i in range(self.frozen_layers, self.config.num_hidden_layers)})

    @property
    def prefix_dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def prefix_modules(self) -> list[nn.Module]:
        """What `frozen_prefix` runs, in order (the rotary embedding has no weights, only its buffers)."""
        return [self.model.embed_tokens, self.model.rotary_emb, *self.model.layers[: self.frozen_layers]]

    def _layer_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """What each decoder layer takes beside its input, for right-padded rows: positions 0.., the causal padding
        mask and the rotary embedding, as `LlamaModel.forward` builds them."""
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        return {"attention_mask": mask, "position_ids": position_ids,
                "position_embeddings": self.model.rotary_emb(hidden, position_ids=position_ids)}

    def _adapted_layers(self, prefix: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The top layers over a cached prefix, as `LlamaDecoderLayer.forward` runs them, except the feed-forward
        block (three quarters of a layer's weights): it works on each token alone, so it runs on the batch's real
        tokens, not on the padding up to the longest row (`packed_linear`)."""
        inputs, keep, hidden = self._layer_inputs(prefix, attention_mask), attention_mask.bool(), prefix
        for layer in self.model.layers[self.frozen_layers:]:
            assert isinstance(layer, LlamaDecoderLayer)
            attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **inputs)
            hidden = hidden + attended
            tokens = hidden[keep] + _packed_mlp(layer.mlp, layer.post_attention_layernorm(hidden), keep)
            hidden = scatter_tokens(tokens, keep)
        return hidden

    @torch.no_grad()
    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen layers: [batch, tokens, hidden]."""
        hidden = self.model.embed_tokens(input_ids)
        inputs = self._layer_inputs(hidden, attention_mask)
        for layer in self.model.layers[: self.frozen_layers]:
            hidden = layer(hidden, **inputs)
        return hidden

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, *,
                prefix: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Without `prefix`, transformers' forward, with its signature (which `generate` inspects to pass
        `position_ids` and `logits_to_keep`). With it (the training path): logits at `positions` only ([batch, k]
        token indices; all positions when None), from the top layers over the cached prefix."""
        if prefix is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)
        if attention_mask is None:
            raise ValueError("PrefixedLlama needs the attention mask with a prefix")
        if labels is not None or cache is not None or input_ids is not None:
            raise ValueError("PrefixedLlama: a prefix replaces input_ids, and its loss and cache are the caller's")
        hidden = self.model.norm(self._adapted_layers(prefix, attention_mask))
        if positions is not None:
            hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))


def _packed_mlp(mlp: LlamaMLP, normed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`LlamaMLP` over the kept tokens of `normed` [batch, width, hidden]: [tokens, hidden]."""
    tokens = normed[keep]
    gate = packed_linear(mlp.gate_proj, tokens, keep, normed)
    up = packed_linear(mlp.up_proj, tokens, keep, normed)
    return packed_linear(mlp.down_proj, mlp.act_fn(gate) * up, keep)
