from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertForSequenceClassification, BertTokenizerFast

from canao.compiler.build import compile_model
from canao.compiler.importer import InputSpec
from canao.compiler.models import load_model, minilm_path
from canao.compiler.verify import verify_locally
from canao.nas import obert
from canao.nas import prune as pr
from canao.nas.tasks import Split
from tests.tiny_teacher import tiny_teacher


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(str(minilm_path()))


@pytest.fixture
def teacher() -> BertForSequenceClassification:
    return tiny_teacher()


def toy_split(n: int = 120) -> Split:
    texts = tuple((f"a {'good' if i % 2 else 'bad'} film, number {i}",) for i in range(n))
    return Split(texts, tuple(i % 2 for i in range(n)))


def small(**fields: object) -> pr.PruneConfig:
    base = {
        "fisher_batches": 4,
        "fisher_batch_size": 4,
        "finetune_steps": 2,
        "batch_size": 8,
        "aebert_candidates": 4,
        "aebert_rounds": 1,
        "aebert_eval_examples": 24,
    }
    return pr.PruneConfig(**{**base, **fields})  # type: ignore[arg-type]


def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(0, 30522, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "snip"}, "unknown method 'snip'"),
        ({"granularity": "channel"}, "unknown granularity"),
        ({"ratio": 1.0}, "ratio must be in"),
        ({"method": "aebert", "granularity": "unstructured"}, "structured only"),
        ({"stages": 0}, "stages must be"),
    ],
)
def test_bad_requests(fields: dict[str, object], message: str) -> None:
    with pytest.raises(pr.PruningError, match=message):
        pr.PruneConfig(**fields)  # type: ignore[arg-type]


def test_masking_units_equals_cutting_them_out(teacher: BertForSequenceClassification) -> None:
    units = pr.UnitMasks.full(teacher)
    units.heads[0, 1] = units.heads[2, 0] = units.heads[2, 3] = False
    units.neurons[1, ::3] = False
    masked = copy.deepcopy(teacher)
    pr.apply_masks(masked, pr.weight_masks(masked, units))
    small_model = pr.cut_out(copy.deepcopy(masked), units)
    assert [
        layer.attention.self.num_attention_heads for layer in small_model.bert.encoder.layer
    ] == [3, 4, 2]
    assert small_model.bert.encoder.layer[1].intermediate.dense.out_features == 128 - 43
    with torch.no_grad():
        assert torch.allclose(small_model(**inputs()).logits, masked(**inputs()).logits, atol=1e-5)


def test_structured_ratio_bookkeeping(teacher, tokenizer) -> None:
    config = small(method="obert", ratio=0.5, neuron_multiple=1)
    result = pr.prune(teacher, tokenizer, toy_split(), config)
    assert sum(result.arch.heads) == 6  # of 12 heads
    assert sum(result.arch.ffn) == 192  # of 384 neurons
    assert min(result.arch.heads) >= 1 and min(result.arch.ffn) >= 1


@pytest.mark.parametrize("method", ["obert", "aebert"])
def test_kept_neurons_are_whole_kernel_panels(teacher, tokenizer, method) -> None:
    result = pr.prune(teacher, tokenizer, toy_split(), small(method=method, ratio=0.3))
    assert all(f % 32 == 0 and f >= 32 for f in result.arch.ffn), result.arch.ffn
    assert pr._round_to(47, 32, 128) == 32 and pr._round_to(49, 32, 128) == 64
    assert pr._round_to(5, 32, 128) == 32 and pr._round_to(127, 32, 128) == 128


def test_gradual_pruning_follows_the_cubic_schedule(teacher, tokenizer) -> None:
    messages: list[str] = []
    result = pr.prune(
        teacher,
        tokenizer,
        toy_split(),
        small(method="magnitude", ratio=0.5, stages=3),
        progress=messages.append,
    )
    ratios = [float(m.split("ratio ")[1].split(",")[0]) for m in messages if m.startswith("stage")]
    expected = [obert.cubic_sparsity(s, 3, 0.0, 0.5) for s in (1, 2, 3)]
    assert ratios == pytest.approx(expected, abs=1e-3) and ratios[-1] == 0.5
    assert sum(result.arch.ffn) == 192


def test_magnitude_removes_the_weakest_head(teacher, tokenizer) -> None:
    with torch.no_grad():
        attn = teacher.bert.encoder.layer[0].attention
        for proj in (attn.self.query, attn.self.key, attn.self.value):
            proj.weight[16:32] *= 1e-3  # head 1 of layer 0
        attn.output.dense.weight[:, 16:32] *= 1e-3
    scores = pr.magnitude_structured_scores(teacher)
    keep = pr.choose_global(scores.heads, torch.ones(3, 4, dtype=torch.bool), 11)
    assert not keep[0, 1] and keep.sum() == 11


def test_aebert_layer_ratios_average_the_overall_ratio(teacher, tokenizer) -> None:
    result = pr.prune(teacher, tokenizer, toy_split(), small(method="aebert", ratio=0.5))
    assert result.layer_ratios is not None and len(result.layer_ratios) == 3
    assert sum(result.layer_ratios) / 3 == pytest.approx(0.5, abs=1e-3)
    kept_heads = 12 - sum(obert.num_to_prune(r, 4) for r in result.layer_ratios)
    assert sum(result.arch.heads) == max(kept_heads, 3)


def test_obs_update_is_folded_into_the_output_columns(teacher, tokenizer) -> None:
    batches = [next(pr.training_batches(tokenizer, toy_split(), 4, 32, seed=i)) for i in range(6)]
    scores = pr.obert_structured_scores(teacher, batches, 1e-3)
    before = pr.UnitMasks.full(teacher)
    after = pr.UnitMasks(before.heads.clone(), before.neurons.clone())
    after.heads[1, 2] = False
    model = copy.deepcopy(teacher)
    pr.fold_obs_update(model, scores, before, after)
    scale = obert.structured_update(scores.head_finv[1], [2]).float()
    new = model.bert.encoder.layer[1].attention.output.dense.weight
    old = teacher.bert.encoder.layer[1].attention.output.dense.weight
    assert torch.allclose(new, old * scale.repeat_interleave(16)[None, :])
    assert torch.equal(
        model.bert.encoder.layer[0].attention.output.dense.weight,
        teacher.bert.encoder.layer[0].attention.output.dense.weight,
    )


@pytest.mark.parametrize("granularity", ["unstructured", "block4"])
def test_weight_pruning_reaches_the_sparsity_and_keeps_it_through_finetuning(
    teacher, tokenizer, granularity
) -> None:
    result = pr.prune(
        teacher, tokenizer, toy_split(), small(method="obert", ratio=0.5, granularity=granularity)
    )
    for name, linear in pr.encoder_linears(result.model).items():
        zeros = int((linear.weight == 0).sum())
        assert zeros == linear.weight.numel() // 2, name
        if granularity == "block4":
            groups = linear.weight.detach().reshape(-1, 4)
            assert torch.all((groups == 0).all(1) | (groups != 0).all(1)), name


def test_pruned_model_compiles_and_matches_its_pytorch_output(teacher, tokenizer) -> None:
    result = pr.prune(teacher, tokenizer, toy_split(), small(method="obert", ratio=0.7))
    compiled = compile_model(load_model(result.model), "x86", "fast", InputSpec(1, 16))
    checked = verify_locally(compiled)
    assert checked["max_abs_diff"] <= checked["tolerance"]
