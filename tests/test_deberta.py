"""The packed DeBERTa-v2/v3 encoder equals transformers' DebertaV2Model on the same random
weights (v3 layout: shared attention keys, log buckets, no absolute positions; v2 layout:
separate position projections, absolute positions, token types). Attention runs per group of
similar-length sequences: the lengths here make padded groups and sequences alone."""

import numpy as np
import pytest
import torch
from transformers import DebertaV2Config, DebertaV2Model

from sie_server.runtime.batch import positions
from sie_server.runtime import deberta
from sie_server.runtime.deberta import DebertaConfig, DebertaEncoder


@pytest.mark.parametrize("share, biased, kinds, buckets, types", [
    (True, False, ["p2c", "c2p"], 16, 0),   # DeBERTa-v3 (GLiNER's backbones)
    (False, True, "c2p|p2c", -1, 2),         # DeBERTa-v2 with its own position projections
    (True, False, ["c2p"], 8, 0),
])
@pytest.mark.parametrize("min_area, groups", [
    (0, [[60, 64], [33, 40], [17], [5], [1]]),  # groups by the padding share alone
    (10**9, [[1, 5, 17, 33, 40, 60, 64]]),  # one padded group (as on an accelerator)
])
def test_matches_transformers(share, biased, kinds, buckets, types, min_area, groups,
                              monkeypatch):
    monkeypatch.setattr(deberta, "GROUP_MIN_AREA", min_area)
    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, relative_attention=True,
        position_buckets=buckets, pos_att_type=kinds, share_att_key=share,
        position_biased_input=biased, norm_rel_ebd="layer_norm", type_vocab_size=types)
    reference = DebertaV2Model(config).eval()
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.2)
    encoder, rest = DebertaEncoder.from_weights(
        DebertaConfig.from_dict(config.to_dict()),
        {k: v.clone() for k, v in reference.state_dict().items()})
    assert not rest
    lengths = [5, 40, 1, 17, 64, 60, 33]  # 40 > the bucket span: log buckets are exercised
    rows = [torch.randint(0, 100, (n,)) for n in lengths]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    assert [sorted(lengths[s] for s in g.seqs.tolist())
            for g in encoder.layout(cu, torch.device("cpu")).groups] == groups
    with torch.no_grad():
        ours = encoder(torch.cat(rows), torch.from_numpy(positions(cu, 0)), None,
                       encoder.layout(cu, torch.device("cpu")))
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    theirs = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    assert ours.abs().mean() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
