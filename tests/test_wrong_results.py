"""Inputs that used to give a wrong result without a word: each now gives the right one, or one line."""
import numpy as np
import torch
import torch.nn.functional as F

import common


def knn_reference(train, train_labels, test, test_labels, num_classes, k, temperature):
    """Weighted kNN written from its definition, in float64 log space: each class scores
    log sum over its neighbours among the k nearest of exp(cos / T). Returns (top-1, top-5) in percent."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    top1 = top5 = 0
    for feature, label in zip(test, np.asarray(test_labels)):
        similarity = train @ feature
        nearest = np.argsort(-similarity, kind='stable')[:k]
        scores = {}
        for j in nearest:
            c = int(train_labels[j])
            scores[c] = np.logaddexp(scores.get(c, -np.inf), similarity[j] / temperature)
        ranked = sorted(scores, key=lambda c: -scores[c])[:5]
        top1 += ranked[0] == label
        top5 += label in ranked
    return 100 * top1 / len(test), 100 * top5 / len(test)


def test_knn_votes_do_not_overflow_at_small_temperatures():
    # clustered features: neighbours have cosine ~0.9, so exp(cos / 0.001) = e^900 overflows even float64
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 32, generator=generator), dim=1)
    train_labels = torch.arange(400) % 10
    test_labels = torch.arange(97) % 10
    train = F.normalize(centres[train_labels] + 0.35 * torch.randn(400, 32, generator=generator), dim=1)
    test = F.normalize(centres[test_labels] + 0.35 * torch.randn(97, 32, generator=generator), dim=1)
    for temperature in (0.001, 0.0001, 0.07, 1.0):
        results = common.knn_accuracy(train, train_labels, test, test_labels, 10, [1, 20, 200], temperature, chunk=32)
        for k, (top1, top5) in results.items():
            expected = knn_reference(train, train_labels, test, test_labels, 10, k, temperature)
            assert abs(top1 - expected[0]) < 1e-3 and abs(top5 - expected[1]) < 1e-3, (temperature, k, results)
    assert results[20][0] > 50  # the case is not trivial: far above chance (10%)
