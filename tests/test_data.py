import json
import re
from collections import Counter
from pathlib import Path

import pytest

from fl_core.config import compose_config, to_app_config
from fl_core.data import (
    TEST_FILE,
    TRAIN_FILE,
    DataError,
    _build_icd10_examples,
    hospital_share,
    icd10_examples,
    load_splits,
    local_examples,
    partition_indices,
    read_examples,
    write_examples,
)


def test_icd10_is_chapter_classification_over_22_classes() -> None:
    data = icd10_examples()
    assert len(data.label_names) == 22
    assert len(data) > 55_000
    assert set(data.labels) == set(range(22))
    assert len(set(data.texts)) == len(data.texts)


def test_split_is_deterministic_and_disjoint() -> None:
    cfg = to_app_config(compose_config(["data.max_train_examples=null", "data.max_test_examples=null"]))
    a, b = load_splits(cfg.data), load_splits(cfg.data)
    assert a.train.texts == b.train.texts and a.test.texts == b.test.texts
    assert not set(a.train.texts) & set(a.test.texts)


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_complete(partitioning: str) -> None:
    cfg = to_app_config(compose_config([f"federation.partitioning={partitioning}", "federation.num_clients=5",
                                        "federation.min_participants=3", "data.max_train_examples=2000"]))
    train = load_splits(cfg.data).train
    parts = partition_indices(train, cfg.federation, seed=0)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(train)))
    assert all(parts)


def test_dirichlet_skews_labels_more_than_iid() -> None:
    def mean_label_distance(partitioning: str) -> float:
        """Mean total-variation distance of each hospital's label mix from the pooled one."""
        cfg = to_app_config(compose_config([f"federation.partitioning={partitioning}",
                                            "federation.dirichlet_alpha=0.3", "data.max_train_examples=3000"]))
        train = load_splits(cfg.data).train
        pooled = Counter(train.labels)
        distances = []
        for part in partition_indices(train, cfg.federation, seed=0):
            local = Counter(train.labels[i] for i in part)
            distances.append(0.5 * sum(abs(local[c] / len(part) - pooled[c] / len(train)) for c in pooled))
        return sum(distances) / len(distances)

    iid, skewed = mean_label_distance("iid"), mean_label_distance("dirichlet")
    assert skewed > 0.15 and skewed > 3 * iid


def test_more_hospitals_than_examples_is_a_clear_error() -> None:
    cfg = to_app_config(compose_config(["data.max_train_examples=3", "federation.num_clients=5",
                                        "federation.min_participants=3", "federation.partitioning=iid"]))
    with pytest.raises(DataError, match=r"federation\.num_clients"):
        partition_indices(load_splits(cfg.data).train, cfg.federation, seed=0)


def test_drugreview_maps_reviews_to_clinics() -> None:
    cfg = to_app_config(compose_config(["data=drugreview"]))
    splits = load_splits(cfg.data)
    assert len(splits.train) > 500 and len(splits.test) > 300
    assert "women's health" in splits.train.label_names
    assert all(t and "&#039;" not in t for t in splits.train.texts)


def test_icd10_cache_holds_exactly_what_the_build_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDERATED_DP_LLM_CACHE", str(tmp_path))
    icd10_examples.cache_clear()
    try:
        first = icd10_examples()  # builds and writes the cache
        icd10_examples.cache_clear()
        assert list((tmp_path / "data").glob("icd10-*.json"))
        assert icd10_examples() == first == _build_icd10_examples()
    finally:
        icd10_examples.cache_clear()


def test_a_hospitals_own_files_round_trip_as_its_share(tmp_path: Path) -> None:
    cfg = to_app_config(compose_config(["data.max_train_examples=300", "data.max_test_examples=60"]))
    share = hospital_share(cfg.data, cfg.federation, 1)
    write_examples(tmp_path / TRAIN_FILE, share.train)
    write_examples(tmp_path / TEST_FILE, share.test)
    assert local_examples(tmp_path, cfg.data) == share
    first = json.loads((tmp_path / TRAIN_FILE).read_text().splitlines()[0])
    assert first["label"] in share.train.label_names  # labels by name, readable by a hospital's own tooling


@pytest.mark.parametrize(("line", "problem"), [
    ("not json", "line 2: not JSON"),
    ('{"text": "", "label": "Neoplasms (C00-D49)"}', "line 2: needs a non-empty string 'text'"),
    ('{"text": "fracture of femur", "label": "Orthopaedics"}', "line 2: 'label' is not one of"),
    ('{"text": "fracture of femur", "label": ["Injury"]}', "line 2: 'label' is not one of"),
])
def test_a_bad_line_in_a_hospitals_file_is_one_error_naming_it(tmp_path: Path, line: str, problem: str) -> None:
    """By line and field, never by value: the error reaches the node's log, and a record's content stays out."""
    path = tmp_path / TRAIN_FILE
    path.write_text('{"text": "malignant neoplasm of lung", "label": "Neoplasms (C00-D49)"}\n' + line + "\n")
    labels = icd10_examples().label_names
    with pytest.raises(DataError, match=r"^data-dir: train\.jsonl " + re.escape(problem)) as raised:
        read_examples(path, labels)
    assert not any(value in str(raised.value) for value in ("fracture", "femur", "Orthopaedics", "Injury"))


def test_a_partition_outside_the_federation_names_the_node_setting() -> None:
    cfg = to_app_config(compose_config([]))
    with pytest.raises(DataError, match=r"^partition-id: 3 is not in 0\.\.2"):
        hospital_share(cfg.data, cfg.federation, 3)
