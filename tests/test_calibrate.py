"""Read-out calibration (canao.nas.calibrate) and its use by the search's evaluator."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from canao.nas.calibrate import (
    calibrate_readout,
    calibration_rows,
    fit_classifier,
    pooled_features,
)
from canao.nas.finetune import accuracy
from canao.nas.job import SearchJob, SupernetEvaluator, check_job
from canao.nas.search import SearchConfigError
from canao.nas.space import ArchConfig
from canao.nas.supernet import extract
from tests.tiny_teacher import tiny_teacher, toy_supernet


def test_fit_classifier_separates_what_the_prior_misreads() -> None:
    torch.manual_seed(0)
    features = torch.randn(200, 8)
    labels = (features[:, 3] > 0).long()
    classifier = torch.nn.Linear(8, 2)
    with torch.no_grad():  # a read-out that looks at the wrong feature
        classifier.weight.zero_()
        classifier.weight[1, 0] = 1.0
        classifier.bias.zero_()
    fit_classifier(features, labels, classifier)
    predicted = classifier(features).argmax(-1)
    assert (predicted == labels).float().mean() >= 0.95  # the prior scores ~0.5


def test_strong_l2_keeps_the_prior_read_out() -> None:
    torch.manual_seed(0)
    features, labels = torch.randn(64, 8), torch.randint(0, 2, (64,))
    classifier = torch.nn.Linear(8, 2)
    before = classifier.weight.detach().clone()
    fit_classifier(features, labels, classifier, l2=1e4)
    assert torch.allclose(classifier.weight, before, atol=1e-3)


def test_calibration_rows_are_seeded_and_bounded() -> None:
    from canao.nas.tasks import Split

    split = Split(tuple((f"t{i}",) for i in range(10)), tuple([0, 1] * 5), ("a", "b"))
    assert calibration_rows(split, 4, seed=1) == calibration_rows(split, 4, seed=1)
    assert len(set(calibration_rows(split, 4))) == 4
    assert calibration_rows(split, 50) == list(range(10))


def test_calibrated_sub_network_learns_a_task_its_shared_read_out_misses(
    tmp_path: Path,
) -> None:
    supernet, train = toy_supernet(tmp_path, examples=64)
    arch = ArchConfig.from_key(supernet.space.smallest().key)
    cut = extract(supernet.model, arch)
    shared = accuracy(cut, supernet.tokenizer, train, 32)
    calibrated = calibrate_readout(cut, supernet.tokenizer, train, 64, max_length=32)
    assert calibrated is cut  # in place: the same plain BERT classifier, exported as is
    assert accuracy(cut, supernet.tokenizer, train, 32) > max(shared, 0.9)


def test_read_out_is_fitted_on_the_deployed_models_features(tmp_path: Path) -> None:
    """An int8 search fits the read-out on the quantized model's features. Here the
    "deployed" copy negates the pooled features (tanh is odd): the read-out fitted on them
    reads the deployed copy right and the float model inverted."""
    supernet, train = toy_supernet(tmp_path, examples=64)
    arch = ArchConfig.from_key(supernet.space.smallest().key)
    copies: list[torch.nn.Module] = []

    def deployed(model: torch.nn.Module) -> torch.nn.Module:
        flipped = copy.deepcopy(model)
        with torch.no_grad():
            flipped.bert.pooler.dense.weight.neg_()  # type: ignore[union-attr]
            flipped.bert.pooler.dense.bias.neg_()  # type: ignore[union-attr]
        copies.append(flipped)
        return flipped

    cut = extract(supernet.model, arch)
    calibrate_readout(cut, supernet.tokenizer, train, 64, max_length=32, deployed=deployed)
    (reader,) = copies
    untouched = extract(supernet.model, arch).classifier.weight
    assert torch.equal(reader.classifier.weight, untouched)  # the fit went to the model
    reader.classifier.load_state_dict(cut.classifier.state_dict())
    assert accuracy(reader, supernet.tokenizer, train, 32) > 0.9
    assert accuracy(cut, supernet.tokenizer, train, 32) <= 0.5  # chance, or inverted


def test_evaluator_scores_the_calibrated_sub_network(tmp_path: Path) -> None:
    supernet, train = toy_supernet(tmp_path, examples=64)
    arch = supernet.space.smallest()
    evaluator = SupernetEvaluator(supernet, train, latency_evaluator=None, train=train)  # type: ignore[arg-type]
    shared = evaluator.accuracy(arch)
    calibrated = dataclasses.replace(evaluator, calibrate=64, max_length=32)
    assert calibrated.accuracy(arch) > max(shared, 0.9)
    # The shared read-out's cached score is not served for the calibrated one, nor back.
    assert evaluator.accuracy(arch) == shared
    refitted = calibrated.sub_network(arch).classifier.weight.detach()
    assert not np.allclose(refitted, extract(supernet.model, arch).classifier.weight.detach())


def test_negative_calibrate_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(SearchConfigError, match="--calibrate"):
        check_job(SearchJob(calibrate=-1, out=tmp_path))


def test_pooled_features_come_back_in_the_texts_order() -> None:
    # Batched shortest first internally; each row must still be its own text's features.
    from transformers import BertTokenizerFast

    from canao.compiler.models import minilm_path

    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()), local_files_only=True)
    model = tiny_teacher()
    texts = [("a much longer sentence about a slow and dull film",), ("good",), ("bad plot",)]
    together = pooled_features(model, tokenizer, texts, 64, batch_size=2)
    for row, text in enumerate(texts):
        alone = pooled_features(model, tokenizer, [text], 64)
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)
