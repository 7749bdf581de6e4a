"""eval_predictions.npz: the evaluator's per-image predictions agree with its accuracies, name the
test images, are written whole beside eval_results.json, and results written before it existed still
load."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import distill_trainer
import evaluate_checkpoints as ev
import metrics
from helpers import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, synthetic_root):
    path = str(tmp_path_factory.mktemp("predrun") / "run")
    assert (
        distill_trainer.main(
            [
                "--override",
                *tiny_overrides(
                    synthetic_root, path, **{"train.num_epochs": 1, "train.save_epochs": [1]}
                ),
            ]
        )
        == 0
    )
    entries = ev.evaluate_run(
        ev.options(path, eval_untrained=True, linear_probe_C=1.0, device="cpu")
    )
    return path, entries


def test_predictions_match_every_accuracy_and_name_the_test_images(evaluated):
    path, entries = evaluated
    saved = ev.load_predictions(os.path.join(path, "eval_results.json"))
    results = json.load(open(os.path.join(path, "eval_results.json")))["entries"]
    assert {e["name"] for e in results} == set(saved["predictions"]) == {"epoch_1", "untrained"}
    assert saved["labels"].dtype == np.int16 and len(saved["labels"]) == results[0]["num_test"]
    assert saved["test_id"] == results[0]["test_id"] and len(saved["test_id"]) == 16
    for e in results:
        assert "predictions" not in e and "test_labels" not in e  # the JSON stays small
        probes = saved["predictions"][e["name"]]
        assert set(probes) == set(metrics.PROBES)  # every probe of the table, low-shot included
        for key, predicted in probes.items():
            assert predicted.dtype == np.int16
            assert 100 * np.mean(predicted == saved["labels"]) == pytest.approx(e[key])


def test_test_id_changes_with_the_test_images(evaluated):
    _, entries = evaluated
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    data = ev.Data(images, labels, images, labels, 2, "x")
    other = ev.Data(
        images, labels, images.clone().index_fill_(0, torch.tensor([3]), 1), labels, 2, "x"
    )
    assert ev.test_id(data) != ev.test_id(other)
    assert ev.test_id(data) == ev.test_id(ev.Data(images, labels, images, labels, 2, "y"))


def test_results_without_predictions_still_load(evaluated, tmp_path):
    path, _ = evaluated
    results = tmp_path / "eval_results.json"
    results.write_text(open(os.path.join(path, "eval_results.json")).read())
    assert (
        ev.load_predictions(str(results)) is None
    )  # an old run: no eval_predictions.npz beside it
    assert ev.predictions_path(str(tmp_path / "legacy_eval_results.json")) == str(
        tmp_path / "legacy_eval_predictions.npz"
    )


def test_probes_return_the_predictions_they_score():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 5, generator=gen), torch.randn(30, 5, generator=gen)
    train_y, test_y = (train_x[:, 0] > 0).long(), (test_x[:, 0] > 0).long()
    for acc, predicted in (
        metrics.legacy_probe(train_x, train_y, test_x, test_y, C=1.0, return_predictions=True),
        metrics.knn_accuracy(train_x, train_y, test_x, test_y, 2, return_predictions=True),
    ):
        assert predicted.dtype == torch.int16 and acc == pytest.approx(
            100 * (predicted == test_y).float().mean()
        )
    linear = metrics.linear_probe(train_x, train_y, test_x, test_y, 2, return_predictions=True)
    assert linear["acc"] == pytest.approx(100 * (linear["predictions"] == test_y).float().mean())
    assert linear["acc"] > 80  # the label is the sign of the first feature: learnable
