"""all-MiniLM-L6-v2 as a classifier the way it was trained: mean pooling, L2-normalised, a linear head on top.

The encoder can run in two halves. Its lower layers (and embeddings) carry no adapter and stay frozen: they are a
fixed public function of each text, so `frozen_prefix` computes their output once per example, and training runs
only the top layers and the head over it (`forward(prefix=...)`), for the same loss and gradients as the whole
model. When the lowest adapted layer has adapters in its feed-forward block only, its self-attention is frozen
too and joins the prefix: a step then runs one feed-forward block, and backpropagates through nothing else.
That block works on each token alone, so it runs on the batch's real tokens only, not on the padding up to the
longest text (a batch of ICD-10-CM texts is more than half padding): see `_packed_feed_forward`.
The accounting does not change: each step still touches each sampled record once, through a public map.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers import BertConfig, BertModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertLayer


def require_frozen_prefix(owner: str, modules: list[nn.Module]) -> None:
    """What a model that runs in two halves checks once its adapters are attached: nothing in what `frozen_prefix`
    runs may train, or the cached prefix would be stale and the model a wrong one."""
    trainable = [name for module in modules for name, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"{owner}: {len(trainable)} parameters below the top layers are trainable "
                         f"(first: {trainable[0]}); the frozen prefix would be stale")


def require_lora_only_in_packed(owner: str, blocks: dict[str, nn.Module]) -> None:
    """Blocks that run on packed tokens (`packed_linear`) may train LoRA's A and B only: they alone see one row per
    example, so any other parameter's per-sample gradient would be per token."""
    packed = [f"{where}.{name}" for where, block in blocks.items() for name, p in block.named_parameters()
              if p.requires_grad and not {"lora_A", "lora_B"} & set(name.split("."))]
    if packed:
        raise ValueError(f"{owner}: {packed[0]} trains in a block that runs on packed tokens, where per-sample "
                         "gradients would be per token; only LoRA's A and B may (lora.bias none, no modules_to_save "
                         "there)")


def packed_linear(module: nn.Module, tokens: torch.Tensor, keep: torch.Tensor,
                  padded: torch.Tensor | None = None) -> torch.Tensor:
    """`module` applied to each kept token ([tokens, in], in `padded[keep]`'s order), for [tokens, out]. A LoRA
    layer's frozen weight, its cost, sees those tokens alone; its low-rank path (r/in of that cost) runs on the padded
    batch [batch, width, in] (`padded`, or the tokens scattered back), where the padding contributes nothing and
    Opacus's hooks find one row per example for the per-sample gradients."""
    if not isinstance(module, LoraLinear):
        return module(tokens)
    if module.merged or module.lora_variant:
        raise ValueError("packed_linear: only plain, unmerged LoRA adapters run packed")
    out = module.base_layer(tokens)
    if module.disable_adapters:
        return out
    if padded is None:
        padded = scatter_tokens(tokens, keep)
    result = out
    for name in module.active_adapters:
        if name in module.lora_A:
            # fp32 adapters over bf16 weights compute in fp32, as peft's own forward: Opacus sees fp32 activations
            low_rank_in = module._cast_input_dtype(padded, module.lora_A[name].weight.dtype)  # type: ignore[arg-type]
            low_rank = module.lora_B[name](module.lora_A[name](module.lora_dropout[name](low_rank_in)))
            result = result + low_rank[keep] * module.scaling[name]
    return result.to(out.dtype)


def scatter_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The inverse of `padded[keep]`: [tokens, d] back to [batch, width, d], zeros at the padding."""
    padded = tokens.new_zeros(*keep.shape, tokens.shape[-1])
    return padded.masked_scatter(keep.unsqueeze(-1), tokens)


class MeanPooledClassifier(nn.Module):
    """BERT-style encoder (no pooler: the mean over tokens is the sentence embedding) and a zero-initialised head,
    so that at the start every class scores the same and the first DP steps move the head, not noise."""

    def __init__(self, encoder: BertModel, num_labels: int, trainable_layers: int) -> None:
        super().__init__()
        layers = encoder.config.num_hidden_layers
        if not 1 <= trainable_layers <= layers:
            raise ValueError(f"trainable_layers must be between 1 and {layers} (got {trainable_layers})")
        self.encoder = encoder
        self.config: BertConfig = encoder.config
        self.frozen_layers = layers - trainable_layers
        self.attention_in_prefix = False  # set by `settle_prefix` once the adapters are in place
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def settle_prefix(self) -> None:
        """Once adapters are attached: take the lowest adapted layer's self-attention into the prefix if it has no
        trainable parameter, and check that nothing in the prefix trains (a stale cache would be a wrong model).
        Then the block runs packed: only LoRA's A and B may train in it, as only they see one row per example."""
        layer = self._first_adapted()
        self.attention_in_prefix = not any(p.requires_grad for p in layer.attention.parameters())
        require_frozen_prefix(type(self).__name__, self.prefix_modules())
        if self.attention_in_prefix:
            require_lora_only_in_packed(type(self).__name__, {"intermediate": layer.intermediate,
                                                              "output": layer.output})

    @property
    def prefix_dtype(self) -> torch.dtype:
        return self.classifier.weight.dtype

    def prefix_modules(self) -> list[nn.Module]:
        """What `frozen_prefix` runs, in order."""
        layers = self.encoder.encoder.layer
        extra = [layers[self.frozen_layers].attention] if self.attention_in_prefix else []
        return [self.encoder.embeddings, *layers[: self.frozen_layers], *extra]

    def _extended_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask BERT's attention takes: 0 for tokens, the dtype's minimum for padding."""
        mask = attention_mask[:, None, None, :].to(dtype)
        return (1.0 - mask) * torch.finfo(dtype).min

    def _layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        mask = self._extended_mask(attention_mask, hidden.dtype)
        for layer in self.encoder.encoder.layer[start:stop]:
            hidden = layer(hidden, attention_mask=mask)
        return hidden

    def _first_adapted(self) -> BertLayer:
        layer = self.encoder.encoder.layer[self.frozen_layers]
        assert isinstance(layer, BertLayer)
        return layer

    def _attention(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The lowest adapted layer's self-attention block (its output is the feed-forward block's input)."""
        output: tuple[torch.Tensor, ...] = self._first_adapted().attention(
            hidden, self._extended_mask(attention_mask, hidden.dtype))
        return output[0]

    @torch.no_grad()
    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the frozen layers: [batch, tokens, hidden]."""
        hidden = self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        hidden = self._layers(hidden, attention_mask, 0, self.frozen_layers)
        return self._attention(hidden, attention_mask) if self.attention_in_prefix else hidden

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> SequenceClassifierOutput:
        """Logits from token ids, or from `frozen_prefix`'s output of the same batch (the training path)."""
        if attention_mask is None:
            raise ValueError("MeanPooledClassifier needs the attention mask (padding must not be pooled)")
        if prefix is None:
            if input_ids is None:
                raise ValueError("MeanPooledClassifier needs input_ids or a prefix")
            prefix = self.frozen_prefix(input_ids, attention_mask, token_type_ids)
        keep = attention_mask.bool()
        if self.attention_in_prefix:
            tokens = self._packed_feed_forward(prefix, keep)
            if self.frozen_layers + 1 < self.config.num_hidden_layers:
                hidden = self._layers(scatter_tokens(tokens, keep), attention_mask, self.frozen_layers + 1,
                                      self.config.num_hidden_layers)
                tokens = hidden[keep]
        else:
            tokens = self._layers(prefix, attention_mask, self.frozen_layers, self.config.num_hidden_layers)[keep]
        return SequenceClassifierOutput(logits=self.classifier(nn.functional.normalize(mean_pool(tokens, keep),
                                                                                       dim=-1)))

    def _packed_feed_forward(self, attention_output: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """BERT's feed-forward block (`BertLayer.feed_forward_chunk`) of the lowest adapted layer over the kept
        tokens of `attention_output` [batch, width, hidden]: [tokens, hidden]. Each token's output depends on that
        token alone, so this is the same function as the padded block, at the cost of the real tokens."""
        layer = self._first_adapted()
        tokens = attention_output[keep]
        intermediate = layer.intermediate.intermediate_act_fn(
            packed_linear(layer.intermediate.dense, tokens, keep, attention_output))
        out = layer.output
        dense = packed_linear(out.dense, intermediate, keep)
        result: torch.Tensor = out.LayerNorm(out.dropout(dense) + tokens)
        return result


def mean_pool(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each example's mean over its kept tokens ([tokens, d] in `padded[keep]`'s order): [batch, d]."""
    example = keep.nonzero()[:, 0]
    counts = keep.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)
    return tokens.new_zeros(keep.shape[0], tokens.shape[-1]).index_add(0, example, tokens) / counts
