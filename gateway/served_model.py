"""The model a replica serves: a trained run (folder or MLflow URI) rebuilt exactly as trained, with its provenance.

Provenance is read from the run's privacy report, whose every number an accountant computed during training; the
gateway attaches it to each answer so a clinician sees what guarantee the model behind the answer carries.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fl_core.artifacts import ADAPTER_DIR, CONFIG_FILE, LABELS_FILE, PRIVACY_REPORT_FILE
from fl_core.chat import conversation_ids
from fl_core.config import AppConfig, ConfigError, to_app_config
from fl_core.data import load_splits
from fl_core.device import resolve_device
from fl_core.model import load_tokenizer, load_trained_model

from .config import ReplicaConfig
from .generation import Generation, TextWatch, visible
from .schemas import GenerationParams

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


def run_labels(folder: Path, cfg: AppConfig) -> tuple[str, ...]:
    """The classifier's label names as the run saved them; a run from before runs kept them (no `labels.json`)
    has them from its dataset, which must then be installed beside the replica."""
    if (folder / LABELS_FILE).exists():
        return tuple(json.loads((folder / LABELS_FILE).read_text()))
    return load_splits(cfg.data).train.label_names


def provenance(report: dict[str, Any], source: str, cfg: AppConfig) -> dict[str, Any]:
    """The training guarantee in a response: per unit of privacy, the weakest hospital's epsilon and each one's;
    and what the model was trained to answer (a chat model's answer format) in which precision."""
    guarantees = []
    for g in report["guarantees"]:
        per_hospital = {h: s["epsilon"] for h, s in g.get("hospitals", {}).items()}
        epsilon = g["epsilon"] if "epsilon" in g else max(per_hospital.values(), default=None)
        guarantees.append({"unit_of_privacy": g["unit_of_privacy"], "epsilon": epsilon, "delta": g["delta"],
                           "accountant": g["accountant"], "mechanism": g["mechanism"],
                           **({"epsilon_per_hospital": per_hospital} if per_hospital else {})})
    trained_as = {"task": cfg.task.name, "precision": cfg.train.precision,
                  **({"answer": cfg.task.answer} if cfg.task.name == "chat" else {})}
    return {"run_id": report["run_id"], "model_source": source, "guarantees": guarantees,
            "secure_aggregation": report["secure_aggregation"]["protocol"], "trained_as": trained_as}


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
        self.label_names = run_labels(folder, self.cfg) if self.task == "classification" else ()
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.model = load_trained_model(self.cfg, self.tokenizer, len(self.label_names), folder / ADAPTER_DIR,
                                        self.device)
        self.provenance = provenance(json.loads((folder / PRIVACY_REPORT_FILE).read_text()), replica.source,
                                     self.cfg)
        self.name = f"{self.cfg.model.name}+lora:{self.provenance['run_id']}"
        self.created = int((folder / PRIVACY_REPORT_FILE).stat().st_mtime)  # when training wrote its guarantee
        self._lock = threading.Lock()

    @torch.inference_mode()
    def classify(self, text: str) -> Prediction:
        batch = self.tokenizer([text], truncation=True, max_length=self.cfg.train.max_seq_len, return_tensors="pt")
        with self._lock:
            logits = self.model(**batch.to(self.device)).logits[0]
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return Prediction(self.label_names[best], dict(zip(self.label_names, probs, strict=True)))

    @property
    def context(self) -> int:
        """Tokens the model attends over: prompt and answer together."""
        return int(self.model.config.max_position_embeddings)

    def completion_prompt(self, prompt: str) -> list[int]:
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return conversation_ids(self.tokenizer, messages)

    def answer_limit(self, params: GenerationParams) -> int:
        """Tokens the answer may have: what the request asks, within the replica's cap."""
        return min(params.max_tokens, self.max_new_tokens)

    @torch.inference_mode()
    def generate(self, prompt: list[int], params: GenerationParams, on_text: Callable[[str], None] | None = None,
                 cancelled: threading.Event | None = None) -> Generation:
        """Greedy at temperature 0, else sampled with `top_p`; ends at the end of turn, a stop sequence, the token
        limit, or when `cancelled` is set. `on_text` receives the answer as it grows (for streaming)."""
        limit = self.answer_limit(params)
        input_ids = torch.tensor([prompt], device=self.device)
        watch = TextWatch(self.tokenizer, len(prompt), params.stop, on_text, cancelled)
        sampled = params.temperature > 0
        with self._lock:
            if cancelled is not None and cancelled.is_set():  # the client left while this waited for the model
                return Generation("", len(prompt), 0, "stop")
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=limit,
                do_sample=sampled, temperature=params.temperature if sampled else None,
                top_p=params.top_p if sampled else None, top_k=None, stopping_criteria=[watch],
                pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, len(prompt):]
        decoded = watch.text_of(out[0])
        text, stopped = visible(decoded, params.stop)
        if not stopped:  # generation is over: a tail that looked like the start of a stop sequence is text
            text = decoded
        watch.emit(text)
        ended = stopped or (len(new) > 0 and int(new[-1]) == self.tokenizer.eos_token_id)
        return Generation(text, len(prompt), len(new), "stop" if ended or len(new) < limit else "length")
