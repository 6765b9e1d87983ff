"""Top-k over all classes from sharded rows equals a one-process dense top-k."""
import pytest
import torch

from app.classifier import ShardedClassifier
from app.classifier.topk import global_topk
from app.config import OptimConfig, SoftmaxConfig


@pytest.mark.parametrize("logit", ["cosine", "dot"])
@pytest.mark.parametrize("num_classes", [50, 3])  # 3: ranks without classes, k > C
def test_topk_equals_dense_reference(world, logit, num_classes):
    gen = torch.Generator().manual_seed(5)
    sizes = [(r * 3 + 4) % 7 for r in range(world.size)]  # uneven, rank 1 of 4 may get 0
    feat = torch.randn(sum(sizes), 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(num_classes, 8, generator=gen, dtype=torch.float64)
    clf = ShardedClassifier(world, num_classes, 8, SoftmaxConfig(logit=logit), OptimConfig(), 0,
                            dtype=torch.float64)
    clf.weight_cD.copy_(weight[clf.start:clf.stop])
    lo = sum(sizes[:world.rank])
    scores, ids = global_topk(world, clf, feat[lo:lo + sizes[world.rank]], 5)

    if logit == "cosine":
        sim = torch.nn.functional.normalize(feat, dim=1) @ \
            torch.nn.functional.normalize(weight, dim=1).t()
    else:
        sim = feat @ weight.t()
    ref = torch.topk(sim, min(5, num_classes), dim=1)
    assert ids.shape == (sizes[world.rank], min(5, num_classes))
    assert torch.equal(ids, ref.indices[lo:lo + sizes[world.rank]])
    torch.testing.assert_close(scores, ref.values[lo:lo + sizes[world.rank]])
