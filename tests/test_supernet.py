from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertTokenizerFast,
)

from canao.compiler.build import compile_model
from canao.compiler.importer import InputSpec
from canao.compiler.models import load_model, minilm_path
from canao.compiler.verify import verify_locally
from canao.nas import supernet as sn
from canao.nas.distill import SupernetConfig, dev_accuracy, distillation_loss, train_supernet
from canao.nas.space import ArchConfig, InvalidArchitectureError, SearchSpace
from canao.nas.tasks import Split
from tests.tiny_teacher import TINY, tiny_teacher


def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 30522, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding must be respected
    types = torch.zeros_like(ids)
    types[:, 6:] = 1  # sentence pairs
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def sliced(model: BertForSequenceClassification, arch: ArchConfig, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return sn.subnet_logits(
            model, arch, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
        )


def test_largest_subnetwork_is_the_teacher() -> None:
    model, inputs = tiny_teacher(), batch()
    assert torch.allclose(
        sliced(model, sn.full_arch(model), inputs), logits(model, inputs), atol=1e-5
    )


def test_reordering_keeps_the_function_and_puts_important_units_first() -> None:
    model, inputs = tiny_teacher(), batch()
    before = logits(model, inputs)
    importance = sn.first_order_importance(model, [(inputs, torch.tensor([0, 1, 1]))])
    assert importance.heads.shape == (3, 4) and (importance.heads >= 0).all()
    assert importance.neurons.shape == (3, 128) and importance.hidden.shape == (64,)
    sn.reorder_by_importance(model, importance)
    assert torch.allclose(logits(model, inputs), before, atol=1e-5)
    again = sn.first_order_importance(model, [(inputs, torch.tensor([0, 1, 1]))])
    for scores in (again.heads[0], again.neurons[1], again.hidden):
        assert torch.all(scores[:-1] >= scores[1:] - 1e-6 * scores.max())  # now descending


def test_extraction_equals_slicing_and_reloads(tmp_path: Path) -> None:
    model, inputs = tiny_teacher(), batch()
    space = SearchSpace.from_teacher(TINY)
    rng = random.Random(0)
    for _ in range(6):
        arch = space.sample(rng)
        sub = sn.extract(model, arch)
        assert sub.config.num_hidden_layers == arch.num_layers
        assert [layer.intermediate.dense.out_features for layer in sub.bert.encoder.layer] == list(
            arch.ffn
        )
        assert [
            layer.attention.self.num_attention_heads for layer in sub.bert.encoder.layer
        ] == list(arch.heads)
        assert torch.allclose(logits(sub, inputs), sliced(model, arch, inputs), atol=1e-5)
    sub.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, inputs), logits(sub, inputs))
    via_canao = load_model(tmp_path, head="classification").module
    assert torch.equal(logits(via_canao, inputs), logits(sub, inputs))


def test_extracted_subnetwork_compiles_and_matches_pytorch() -> None:
    model = tiny_teacher()
    arch = ArchConfig(48, (1, 3), (64, 128), 16)
    compiled = compile_model(load_model(sn.extract(model, arch)), "x86", "fast", InputSpec(1, 16))
    verify_locally(compiled)  # raises NumericsMismatchError otherwise
    assert compiled.numerics["max_abs_diff"] <= compiled.numerics["tolerance"]


def test_a_larger_architecture_is_not_a_subnetwork() -> None:
    with pytest.raises(InvalidArchitectureError, match=r"not a sub-network.*5 heads > teacher's 4"):
        sn.extract(tiny_teacher(), ArchConfig(80, (5,), (64,), 16))
    with pytest.raises(InvalidArchitectureError, match="head dim 32"):
        sn.extract(tiny_teacher(), ArchConfig(64, (2,), (64,), 32))


def test_distillation_loss_is_zero_gradient_at_the_teacher() -> None:
    teacher = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    student = teacher.clone().requires_grad_(True)
    distillation_loss(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().max() < 1e-6


def _teacher_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "teacher"
    tiny_teacher().save_pretrained(folder)
    BertTokenizerFast.from_pretrained(str(minilm_path())).save_pretrained(folder)
    return folder


def test_obert_ordering_keeps_the_function_and_ranks_by_fisher_saliency() -> None:
    model, inputs = tiny_teacher(), batch()
    before = logits(model, inputs)
    # Three single-example batches: one gradient per example, as oBERT's empirical Fisher.
    labelled = [
        ({k: v[i : i + 1] for k, v in inputs.items()}, torch.tensor([i % 2])) for i in range(3)
    ]
    importance = sn.obert_importance(model, labelled)
    assert importance.heads.shape == (3, 4) and importance.neurons.shape == (3, 128)
    assert importance.hidden.shape == (64,) and (importance.heads > 0).all()
    # rho_j = 1 / (2 [F^-1]_jj) with F = lambda I + mean g g^T over the layer's head masks.
    grads = torch.stack([g[0][0] for g in sn.mask_gradients(model, labelled)]).double()
    fisher = grads.T @ grads / len(labelled)
    fisher += torch.eye(4) * 1e-3 * grads.pow(2).mean()
    expected = 1 / (2 * torch.linalg.inv(fisher).diagonal())
    assert torch.allclose(importance.heads[0].double(), expected, rtol=1e-4)
    sn.reorder_by_importance(model, importance)
    assert torch.allclose(logits(model, inputs), before, atol=1e-5)


def test_supernet_ordering_is_checked_and_keyed(tmp_path: Path) -> None:
    from canao.nas.distill import supernet_dir

    with pytest.raises(ValueError, match="unknown importance 'taylor'"):
        SupernetConfig(importance="taylor")
    space = SearchSpace.from_teacher(tiny_teacher().config)
    train = Split((("a",), ("b",)), (0, 1), ("x", "y"))
    keys = {
        supernet_dir(tmp_path, "t", space, SupernetConfig(importance=i), train)
        for i in sn.IMPORTANCE
    }
    assert len(keys) == len(sn.IMPORTANCE)


def test_supernet_training_is_cached_and_scores_subnetworks(tmp_path: Path) -> None:
    teacher = _teacher_folder(tmp_path)
    texts = tuple((f"a {'good' if i % 2 else 'bad'} film number {i}",) for i in range(64))
    train = Split(texts, tuple(i % 2 for i in range(64)))
    config = SupernetConfig(steps=3, batch_size=8, importance_batches=2, dropout=0.0)
    steps: list[int] = []
    shown: list[dict[str, float]] = []
    first = train_supernet(
        teacher,
        train,
        "toy",
        config=config,
        progress=lambda i, n, values: (steps.append(i), shown.append(values)),
    )
    assert steps == [1, 2, 3] and first.path is not None
    # The bar shows KL to the teacher: the largest sub-network *is* the teacher at step 1
    # (no dropout), so its KL is 0 whatever the teacher's own entropy; the smallest's is not.
    assert abs(shown[0]["kl_largest"]) < 1e-6 < shown[0]["kl_smallest"]
    assert len(first.info["loss_log"]) == 2  # steps 0 and the last
    second = train_supernet(
        teacher, train, "toy", config=config, progress=lambda *a: steps.append(-1)
    )
    assert steps == [1, 2, 3]  # loaded from the cache, not retrained
    assert second.space == first.space
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    accuracy = dev_accuracy(second, second.space.smallest(), train)
    assert 0.0 <= accuracy <= 1.0


def test_layer_choice_slicing_equals_extraction() -> None:
    """A 2-layer sub-network of a 3-layer teacher keeps layers 0 and 2 (evenly spaced)."""
    model, inputs = tiny_teacher(), batch()
    assert SearchSpace.from_teacher(TINY).uniform(2, 0.5).kept_layers == (0, 1)  # 2 of 3
    assert SearchSpace.from_teacher(TINY).uniform(1, 0.5).kept_layers == (0,)
    chosen = ArchConfig(64, (2, 4), (64, 128), 16, (0, 2))
    sub = sn.extract(model, chosen)
    assert torch.allclose(logits(sub, inputs), sliced(model, chosen, inputs), atol=1e-5)
    # The extracted layer 1 carries the teacher's layer 2 weights, not layer 1's.
    teacher_q = model.bert.encoder.layer[2].attention.self.query.weight  # 4 heads of 16
    assert torch.equal(sub.bert.encoder.layer[1].attention.self.query.weight, teacher_q)
    first = ArchConfig(64, (2, 4), (64, 128), 16)
    assert not torch.allclose(sliced(model, first, inputs), sliced(model, chosen, inputs))


def test_hidden_state_loss_is_zero_for_the_teacher_against_itself() -> None:
    from canao.nas.distill import hidden_state_loss

    model, inputs = tiny_teacher().eval(), batch()
    with torch.no_grad():
        teacher_states = model(**inputs, output_hidden_states=True).hidden_states
        full = sn.full_arch(model)
        states: list[torch.Tensor] = []
        sn.subnet_logits(
            model, full, inputs["input_ids"], inputs["attention_mask"],
            inputs["token_type_ids"], hidden_states=states,
        )  # fmt: skip
        assert (
            float(hidden_state_loss(states, teacher_states, full, inputs["attention_mask"])) < 1e-10
        )
        narrow = ArchConfig(32, (2, 2), (64, 64), 16, (0, 2))
        states = []
        sn.subnet_logits(
            model, narrow, inputs["input_ids"], inputs["attention_mask"],
            inputs["token_type_ids"], hidden_states=states,
        )  # fmt: skip
        assert len(states) == 3 and states[0].shape[-1] == 32
        loss = hidden_state_loss(states, teacher_states, narrow, inputs["attention_mask"])
        assert float(loss) > 1e-4


def test_depth_heads_read_out_shallow_subnetworks_and_survive_save_and_load(
    tmp_path: Path,
) -> None:
    """A shallower sub-network reads its logits through its depth's own pooler and classifier;
    the full depth keeps the teacher's; extraction carries the head; the cache round-trips."""
    model, inputs = tiny_teacher(), batch()
    shallow = ArchConfig(64, (2,), (64,), 16)
    full = sn.full_arch(model)
    before_shallow, before_full = sliced(model, shallow, inputs), sliced(model, full, inputs)
    sn.add_depth_heads(model, (1, 2, 3))
    assert sorted(sn.depth_heads(model)) == ["1", "2"]  # not the full depth: the teacher's own
    assert torch.allclose(sliced(model, shallow, inputs), before_shallow)  # copies at first
    with torch.no_grad():
        sn.depth_heads(model)["1"]["classifier"].bias.add_(torch.tensor([3.0, -3.0]))
    moved = sliced(model, shallow, inputs)
    assert torch.allclose(moved, before_shallow + torch.tensor([3.0, -3.0]), atol=1e-5)
    assert torch.allclose(sliced(model, full, inputs), before_full)
    assert torch.allclose(logits(sn.extract(model, shallow), inputs), moved, atol=1e-5)
    sn.save_depth_heads(model, tmp_path)
    fresh = tiny_teacher()
    sn.load_depth_heads(fresh, tmp_path)
    assert torch.allclose(sliced(fresh, shallow, inputs), moved, atol=1e-6)
