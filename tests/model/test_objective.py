"""The training objective: likelihood over active priors, cross-entropy, imputation."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from tests.model.flows import IdentityFlow
from tests.tiny import one_thread
from tzkcli.errors import BadInputError
from tzkcli.knowledge import Registry
from tzkcli.model import ModelConfig, TzK


def two_dataset_model(shape=(1, 1, 2)) -> TzK:
    """dataset in {mnist, omniglot}; label only for mnist (omniglot has no label)."""
    registry = Registry()
    registry.add_kind("label")
    registry.add_condition("dataset", "mnist")
    registry.add_condition("dataset", "omniglot")
    for digit in range(3):
        registry.add_condition("label", f"mnist/{digit}")
    return TzK(ModelConfig(), registry, flow=IdentityFlow(shape)).double()


def shift(model: TzK, spec: str, loc: float, log_scale: float = 0.0) -> None:
    with torch.no_grad():
        module = model.priors.conditions[model.registry.index(spec)]
        module.loc.fill_(loc)
        module.log_scale.fill_(log_scale)


def test_objective_by_hand():
    model = two_dataset_model()
    shift(model, "label=mnist/1", 0.5, -0.2)
    shift(model, "dataset=mnist", 0.2, 0.1)
    x = torch.tensor([[[[10, 200]]], [[[0, 90]]]], dtype=torch.uint8)
    codes = torch.tensor([[0, 1], [1, -1]])

    loss, parts = model.objective(x, codes, beta=0.5, impute="posterior",
                                  generator=torch.Generator().manual_seed(0))

    scores = model.score(x, generator=torch.Generator().manual_seed(0))
    bpd, base = scores.bpd, scores.bpd_base
    image0 = (base[0] + bpd[0, 0] + bpd[0, 3]) / 3      # p_0, dataset=mnist, label=mnist/1
    image1 = (base[1] + bpd[1, 1]) / 2                  # p_0, dataset=omniglot; no label
    rates = torch.full((2,), 0.5, dtype=torch.float64).log()
    label_rates = torch.full((3,), 1 / 3, dtype=torch.float64).log()
    ce_dataset = -torch.log_softmax(scores.log_prior[:, :2] + rates, dim=1)[[0, 1], [0, 1]]
    ce_label = -torch.log_softmax(scores.log_prior[0, 2:] + label_rates, dim=0)[1]
    ce = (ce_dataset.sum() + ce_label) / 2 / math.log(2)
    expected = (image0 + image1) / 2 + 0.5 * ce

    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    assert parts["imputed"].item() == 0
    torch.testing.assert_close(parts["ce"], ce, rtol=0, atol=1e-12)


def test_a_diverged_prior_gives_a_non_finite_loss_not_a_crash_in_imputation():
    # A NaN prior makes the posterior NaN; imputing a label by sampling from it must not raise
    # (torch.multinomial rejects NaN): the caller's non-finite policy handles the loss.
    model = two_dataset_model()
    shift(model, "label=mnist/2", float("nan"))
    x = torch.full((4, 1, 1, 2), 102, dtype=torch.uint8)
    codes = torch.tensor([[0, -1]] * 4)

    loss, parts = model.objective(x, codes, impute="posterior",
                                  generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(loss)
    assert parts["imputed"].item() == 1


def test_unknown_values_are_imputed_within_the_dataset_domain():
    model = two_dataset_model()
    shift(model, "label=mnist/2", 0.4, -1.0)            # far more likely for these pixels
    x = torch.full((4, 1, 1, 2), 102, dtype=torch.uint8)
    codes = torch.tensor([[0, -1]] * 4)

    _, parts = model.objective(x, codes, beta=0.0, impute="posterior",
                               generator=torch.Generator().manual_seed(0))
    assert parts["imputed"].item() == 1

    scores = model.score(x, generator=torch.Generator().manual_seed(0))
    active_label2 = (scores.bpd_base + scores.bpd[:, 0] + scores.bpd[:, 4]) / 3
    torch.testing.assert_close(parts["bpd"], active_label2.mean(), rtol=0, atol=1e-12)

    _, none = model.objective(x, codes, beta=0.0, impute="none",
                              generator=torch.Generator().manual_seed(0))
    without = (scores.bpd_base + scores.bpd[:, 0]) / 2
    assert none["imputed"].item() == 0
    torch.testing.assert_close(none["bpd"], without.mean(), rtol=0, atol=1e-12)


def test_prior_imputation_follows_the_rates():
    model = two_dataset_model()
    model.rates.count(torch.tensor([[0, 0]] * 1000))
    x = torch.full((200, 1, 1, 2), 50, dtype=torch.uint8)
    codes = torch.tensor([[0, -1]] * 200)

    active, _, imputed = model._knowledge_terms(
        codes, model.score(x).log_prior, 0.0, "prior", torch.Generator().manual_seed(1))

    assert imputed.sum() == 200
    share = active[:, model.registry.index("label=mnist/0")].mean().item()
    assert share > 0.95    # pi = 1001/1003 for label=mnist/0


def test_bad_codes_name_the_entry():
    model = two_dataset_model()
    x = torch.zeros(2, 1, 1, 2, dtype=torch.uint8)
    with pytest.raises(BadInputError, match=r"codes: found torch.int64 \(2, 3\)"):
        model.objective(x, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(BadInputError, match=r"codes\[1, 0\] \(dataset\): found -1, expected 0"):
        model.objective(x, torch.tensor([[0, 1], [-1, 1]]))
    with pytest.raises(BadInputError, match=r"codes\[0, 1\] \(label\): found 3"):
        model.objective(x, torch.tensor([[0, 3], [0, 1]]))
    with pytest.raises(BadInputError, match=r"codes\[1, 1\]: label=mnist/1 for an image of "
                                            r"dataset=omniglot"):
        model.objective(x, torch.tensor([[0, 1], [1, 1]]))
    with pytest.raises(BadInputError, match="impute: found 'sample'"):
        model.objective(x, torch.tensor([[0, 1], [1, -1]]), impute="sample")


def test_gradient_reaches_every_prior():
    model = two_dataset_model()
    x = torch.randint(0, 256, (8, 1, 1, 2), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    codes = torch.tensor([[0, 0], [0, 1], [0, 2], [1, -1]] * 2)

    loss, _ = model.objective(x, codes)
    loss.backward()

    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def read_mnist(root, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` MNIST test images and labels, straight from the IDX files."""
    with gzip.open(root / "mnist" / "t10k-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(16 + count * 784)[16:], dtype=np.uint8)
    with gzip.open(root / "mnist" / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(8 + count)[8:], dtype=np.uint8)
    return (torch.from_numpy(images.copy()).reshape(count, 1, 28, 28),
            torch.from_numpy(labels.astype(np.int64)))


@pytest.fixture
def single_thread():
    """One intra-op thread: on a shared 2-core machine, more threads only contend."""
    with one_thread():
        yield


def test_objective_decreases_on_real_mnist(data_root, single_thread):
    from tzkcli.flows import GlowConfig

    torch.manual_seed(0)
    images, labels = read_mnist(data_root, 256)
    registry = Registry()
    registry.add_kind("label")
    registry.add_condition("dataset", "mnist")
    for digit in range(10):
        registry.add_condition("label", f"mnist/{digit}")
    config = ModelConfig(flow=GlowConfig(shape=(1, 28, 28), levels=2, steps=2, hidden=16))
    model = TzK(config, registry)
    model.rates.count(torch.stack([torch.zeros_like(labels), labels], dim=1))
    model.initialize(images[:128])
    codes = torch.stack([torch.zeros_like(labels), labels], dim=1)
    codes[::4, 1] = -1                                   # a quarter unlabelled
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)

    losses = []
    for step in range(12):
        batch = slice(64 * (step % 4), 64 * (step % 4 + 1))
        loss, parts = model.objective(images[batch], codes[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())

    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    assert parts["imputed"].item() == pytest.approx(0.25)


def test_model_posterior_and_existence():
    model = two_dataset_model()
    shift(model, "label=mnist/0", 0.3, -0.5)
    x = torch.randint(0, 256, (5, 1, 1, 2), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    datasets = torch.tensor([0, 0, 0, 1, 1])

    labels = model.posterior(x, "label", datasets, torch.Generator().manual_seed(1))
    origin = model.posterior(x, "dataset", generator=torch.Generator().manual_seed(1))
    odds = model.existence(x, ["label=mnist/0"], torch.Generator().manual_seed(1))

    torch.testing.assert_close(labels[:3].sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.all(labels[3:] == 0)                  # omniglot images have no label
    torch.testing.assert_close(origin.sum(1), torch.ones(5, dtype=torch.float64))
    scores = model.score(x, ["label=mnist/0"], torch.Generator().manual_seed(1))
    ratio = scores.log_prior[:, 0] - scores.log_prior_base
    torch.testing.assert_close(odds[:, 0], torch.sigmoid(torch.logit(
        torch.tensor(0.5, dtype=torch.float64)) + ratio))


def test_objective_sees_counts_edited_in_place():
    model = two_dataset_model()
    x = torch.zeros(2, 1, 1, 2, dtype=torch.uint8)
    codes = torch.tensor([[0, 1], [0, 1]])
    _, before = model.objective(x, codes, beta=1.0, generator=torch.Generator().manual_seed(0))

    model.rates.counts["label=mnist/1"] = 1000

    _, after = model.objective(x, codes, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert after["ce"] < before["ce"]
