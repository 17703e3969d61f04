"""A trained run as an MLflow Model: `mlflow.pyfunc.load_model("models:/federated-dp-llm/N")` rebuilds the model
from the version's own files (adapter, config, privacy report) with the replica's loader, so a notebook and the
gateway serve the same model. The run's artifact root carries an `MLmodel` whose pyfunc flavour names this module;
MLflow calls `_load_pyfunc` with that folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import ReplicaConfig

TEXT_COLUMN = "text"
MLMODEL_FILE = "MLmodel"


def save_mlmodel(folder: Path, run_id: str) -> Path:
    """Write the `MLmodel` that makes a run's artifact root an MLflow Model loaded by this module: texts in (one
    string column), `max_tokens` as an inference parameter (MLflow drops parameters a signature does not name)."""
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string")]), params=ParamSchema(
        [ParamSpec("max_tokens", "long", ReplicaConfig().max_new_tokens)]))
    model = Model(run_id=run_id, signature=signature)
    mlflow.pyfunc.add_to_model(model, loader_module=__name__)
    model.save(str(folder / MLMODEL_FILE))
    return folder / MLMODEL_FILE


def _texts(model_input: Any) -> list[str]:
    """One string, a list of strings, or a table (pandas) with a `text` column or a single column."""
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:
        if TEXT_COLUMN not in columns and len(columns) != 1:
            raise ValueError(f"model input: a table needs a '{TEXT_COLUMN}' column (got {list(columns)[:5]})")
        return [str(t) for t in model_input[TEXT_COLUMN if TEXT_COLUMN in columns else columns[0]]]
    if isinstance(model_input, Iterable) and all(isinstance(t, str) for t in model_input):
        return list(model_input)
    raise ValueError("model input: a string, a list of strings, or a table with a 'text' column")


class FederatedModel:
    """What `mlflow.pyfunc.load_model` returns inside its PyFuncModel: texts in, one answer per text out. A
    classifier answers a table of label and class probabilities; a chat or causal language model its greedy
    answer (params `max_tokens`, within the replica's cap)."""

    def __init__(self, served: Any) -> None:
        self.served = served

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        from .schemas import GenerationParams

        texts = _texts(model_input)
        if self.served.task == "classification":
            predictions = [self.served.classify(text) for text in texts]
            return pd.DataFrame({"label": [p.label for p in predictions],
                                 "probabilities": [p.probabilities for p in predictions]})
        limit = int((params or {}).get("max_tokens", self.served.max_new_tokens))
        greedy = GenerationParams(max_tokens=limit, temperature=0.0, top_p=1.0, stop=(), seed=None)
        prompts = [self.served.chat_prompt([{"role": "user", "content": text}]) if self.served.task == "chat"
                   else self.served.completion_prompt(text) for text in texts]
        return [self.served.generate(prompt, greedy).text for prompt in prompts]


def _load_pyfunc(path: str) -> FederatedModel:
    """MLflow's entry point: `path` is the model version's downloaded folder, a trained run's layout."""
    from .served_model import ServedModel

    return FederatedModel(ServedModel(ReplicaConfig(source=path)))
