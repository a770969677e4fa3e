"""Read-out calibration: refit a sub-network's classifier on its own features before scoring.

A sub-network cut from the super-network reads its logits through the classifier trained
for the whole family. Its pooled features can be informative while that shared classifier
reads them wrong: in the quick-start super-network every 1- and 2-layer sub-network scored
the majority class, while the same slices distilled alone for 150 steps reached 0.73
(benchmarks/supernet_ranking.py). Once-for-all recalibrates batch-norm statistics per
sub-network before it is evaluated for the same reason; the transformer's analogue is the
read-out. Here the classifier (a linear layer over the pooled [CLS] output) is refitted by
L2-regularised logistic regression on a few hundred training examples, which costs one
forward pass of the sub-network over them and a convex fit of (hidden + 1) x labels weights.

Nothing else changes: the calibrated model is the same plain ``BertForSequenceClassification``,
so what is scored is what is exported, retrained and compiled.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification, BertTokenizerFast

from canao.nas.finetune import encode, shortest_first
from canao.nas.tasks import Split


def calibration_rows(split: Split, examples: int, seed: int = 0) -> list[int]:
    """A seeded sample of ``examples`` rows of ``split`` (all of it when it is smaller)."""
    if examples >= len(split):
        return list(range(len(split)))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(len(split), size=examples, replace=False).tolist())


@torch.no_grad()  # not inference_mode: the features feed an autograd fit
def pooled_features(
    model: BertForSequenceClassification,
    tokenizer: BertTokenizerFast,
    texts: list[tuple[str, ...]],
    max_length: int,
    batch_size: int = 128,
) -> torch.Tensor:
    """The pooled [CLS] output the classifier reads, one row per text (eval mode).

    Batched shortest first (a random batch pads to its longest member), returned in
    ``texts``' order.
    """
    model.eval()
    order = shortest_first(texts)
    pooled = []
    for start in range(0, len(order), batch_size):
        batch = encode(tokenizer, [texts[i] for i in order[start : start + batch_size]], max_length)
        pooled.append(model.bert(**batch).pooler_output)
    stacked = torch.cat(pooled)
    features = torch.empty_like(stacked)
    features[torch.tensor(order)] = stacked
    return features


def fit_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.nn.Linear,
    l2: float = 1e-2,
    iterations: int = 100,
) -> None:
    """Refit ``classifier`` in place by L2-regularised logistic regression.

    The fit runs on standardised features (so ``l2`` means the same for a sub-network whose
    pooled features are tiny as for one whose are saturated), pulled towards the current
    read-out expressed in those units: an uninformative sample leaves it as it was. The
    scaling is folded back into the weights, so the model's computation is unchanged.
    """
    x = features.detach().double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w0, b0 = classifier.weight.detach().double(), classifier.bias.detach().double()
    prior_w, prior_b = w0 * std, b0 + w0 @ mean  # the same logits, computed from z
    weight = prior_w.clone().requires_grad_(True)
    bias = prior_b.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=iterations, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels)
        loss = loss + l2 * (weight - prior_w).square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        classifier.weight.copy_((weight / std).to(classifier.weight.dtype))
        classifier.bias.copy_((bias - (weight / std) @ mean).to(classifier.bias.dtype))


def calibrate_readout(
    model: BertForSequenceClassification,
    tokenizer: BertTokenizerFast,
    train: Split,
    examples: int,
    max_length: int = 64,
    seed: int = 0,
    deployed: Callable[[BertForSequenceClassification], BertForSequenceClassification]
    | None = None,
) -> BertForSequenceClassification:
    """Refit ``model``'s classifier on ``examples`` seeded training rows; returns ``model``.

    ``deployed``: the model as it will run (an int8 search passes the same-scheme quantized
    copy, :func:`canao.compiler.quantized.quantized_reference`), whose pooled features the
    read-out is fitted on; the classifier itself stays float (int8 builds keep 2-wide layers
    fp32), so the fit is written to ``model``. Fitted on float features instead, the
    read-out of a shallow slice misread its quantized features: in the quick-start
    super-network, scored as AVX2's 7-bit int8, a 2-layer slice fell from 0.676 (fp32) to
    0.526, and 0.657 with the read-out fitted on its int8 features; the 6-layer winner
    scored 0.782 and 0.789.

    Regression heads (one label) are left alone: the read-out mismatch is a classifier's.
    """
    if examples <= 0 or model.config.num_labels < 2 or len(train) == 0:
        return model
    rows = calibration_rows(train, examples, seed)
    reader = model if deployed is None else deployed(model)
    features = pooled_features(reader, tokenizer, [train.texts[i] for i in rows], max_length)
    labels = torch.tensor([train.labels[i] for i in rows], dtype=torch.long)
    fit_classifier(features, labels, model.classifier)
    return model
