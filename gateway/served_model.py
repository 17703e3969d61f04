"""The model a replica serves: a trained run (folder or MLflow URI) rebuilt exactly as trained, with its provenance.

Provenance is read from the run's privacy report, whose every number an accountant computed during training; the
gateway attaches it to each answer so a clinician sees what guarantee the model behind the answer carries.
"""

from __future__ import annotations

import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fl_core.artifacts import ADAPTER_DIR, CONFIG_FILE, PRIVACY_REPORT_FILE
from fl_core.config import AppConfig, ConfigError, to_app_config
from fl_core.data import load_splits
from fl_core.device import resolve_device
from fl_core.model import load_tokenizer, load_trained_model

from .config import ReplicaConfig

MLFLOW_SCHEMES = ("runs:/", "models:/")


def fetch_run(source: str, mlflow_uri: str) -> Path:
    """A local folder with the run's files: the folder itself, or a download of an MLflow run or model version."""
    if source.startswith(MLFLOW_SCHEMES):
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(mlflow_uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=source.rstrip("/") + "/",
                                                            dst_path=tempfile.mkdtemp(prefix="fl-replica-")))
        except MlflowException as err:
            raise ConfigError("replica.source", f"{source}: {str(err).splitlines()[0]}") from err
    folder = Path(source)
    for name in (ADAPTER_DIR, CONFIG_FILE, PRIVACY_REPORT_FILE):
        if not (folder / name).exists():
            raise ConfigError("replica.source", f"{folder} is not a trained run: {name} is missing")
    return folder


def provenance(report: dict[str, Any], source: str) -> dict[str, Any]:
    """The training guarantee in a response: per unit of privacy, the weakest hospital's epsilon and each one's."""
    guarantees = []
    for g in report["guarantees"]:
        per_hospital = {h: s["epsilon"] for h, s in g.get("hospitals", {}).items()}
        epsilon = g["epsilon"] if "epsilon" in g else max(per_hospital.values(), default=None)
        guarantees.append({"unit_of_privacy": g["unit_of_privacy"], "epsilon": epsilon, "delta": g["delta"],
                           "accountant": g["accountant"], "mechanism": g["mechanism"],
                           **({"epsilon_per_hospital": per_hospital} if per_hospital else {})})
    return {"run_id": report["run_id"], "model_source": source, "guarantees": guarantees,
            "secure_aggregation": report["secure_aggregation"]["protocol"]}


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]


class ServedModel:
    """One trained model on one device; inference is serialised (one forward at a time keeps latency predictable)."""

    def __init__(self, replica: ReplicaConfig) -> None:
        folder = fetch_run(replica.source, replica.mlflow_uri)
        raw = json.loads((folder / CONFIG_FILE).read_text())
        self.cfg: AppConfig = to_app_config(OmegaConf.create(raw))
        self.device = resolve_device(replica.device, "replica.device")
        if replica.num_threads:
            torch.set_num_threads(replica.num_threads)
        self.max_new_tokens = replica.max_new_tokens
        self.task = self.cfg.task.name
        self.label_names = load_splits(self.cfg.data).train.label_names if self.task == "classification" else ()
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.model = load_trained_model(self.cfg, self.tokenizer, len(self.label_names), folder / ADAPTER_DIR,
                                        self.device)
        self.provenance = provenance(json.loads((folder / PRIVACY_REPORT_FILE).read_text()), replica.source)
        self.name = f"{self.cfg.model.name}+lora:{self.provenance['run_id']}"
        self._lock = threading.Lock()

    @torch.inference_mode()
    def classify(self, text: str) -> Prediction:
        batch = self.tokenizer([text], truncation=True, max_length=self.cfg.train.max_seq_len, return_tensors="pt")
        with self._lock:
            logits = self.model(**batch.to(self.device)).logits[0]
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return Prediction(self.label_names[best], dict(zip(self.label_names, probs, strict=True)))

    @torch.inference_mode()
    def complete(self, prompt: str, max_tokens: int, temperature: float, seed: int | None) -> tuple[str, int, int]:
        """(text, prompt tokens, completion tokens)."""
        encoded = self.tokenizer([prompt], return_tensors="pt")
        batch = {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask")}  # no token_type_ids (BERT)
        with self._lock:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                **batch, max_new_tokens=min(max_tokens, self.max_new_tokens), do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, batch["input_ids"].shape[1]:]
        text = str(self.tokenizer.decode(new, skip_special_tokens=True))
        return text, int(batch["input_ids"].shape[1]), len(new)
