"""Token-level GLiNER heads (`span_mode: token_level`, gliner's UniEncoderToken models).

Instead of scoring every span of up to `max_width` words, each word gets three scores per
label (start, end, inside) from gliner's `Scorer`: the word and label vectors are each
projected to two halves, and an MLP reads [word half 1, label half 1, word half 2 * label
half 2]. The label vectors are the `<<ENT>>` states themselves (no prompt projection); the
word vectors are those of the span models (first subword, LSTM).

Decoding, as gliner 0.2.29's `TokenDecoder`: a span runs from a word whose start probability
is above the threshold to a word at or after it whose end probability is above it, for the
same label, every word between having an inside probability of at least the threshold; its
score is the least of those probabilities. Candidates come in gliner's order (by start word,
then label, then end word), so the greedy selection after them breaks ties as gliner does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TokenScorer:
    """gliner's `Scorer` (`scorer.proj_token`, `scorer.proj_label`, `scorer.out_mlp`)."""

    def __init__(self, head: dict[str, torch.Tensor], prefix: str = "scorer") -> None:
        self.token = (head[f"{prefix}.proj_token.weight"], head[f"{prefix}.proj_token.bias"])
        self.label = (head[f"{prefix}.proj_label.weight"], head[f"{prefix}.proj_label.bias"])
        self.out0 = (head[f"{prefix}.out_mlp.0.weight"], head[f"{prefix}.out_mlp.0.bias"])
        self.out3 = (head[f"{prefix}.out_mlp.3.weight"], head[f"{prefix}.out_mlp.3.bias"])

    def __call__(self, words: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(W, h) words and (C, h) labels -> (W, C, 3) logits: start, end, inside."""
        n, c, h = words.shape[0], labels.shape[0], words.shape[1]
        w = F.linear(words, *self.token).view(n, 1, 2, h).expand(n, c, 2, h)
        lab = F.linear(labels, *self.label).view(1, c, 2, h).expand(n, c, 2, h)
        cat = torch.cat([w[:, :, 0], lab[:, :, 0], w[:, :, 1] * lab[:, :, 1]], -1)
        return F.linear(F.relu(F.linear(cat, *self.out0)), *self.out3)


def token_spans(logits: torch.Tensor, threshold: float) -> list[tuple[int, int, int, float]]:
    """(first word, last word, label index, score) of every candidate span, in gliner's order."""
    probs = torch.sigmoid(logits)
    start, end, inside = probs[..., 0], probs[..., 1], probs[..., 2].tolist()
    ends_of: dict[int, list[int]] = {}
    for ed, c in torch.nonzero(end > threshold).tolist():
        ends_of.setdefault(c, []).append(ed)
    start_p, end_p = start.tolist(), end.tolist()
    out = []
    for st, c in torch.nonzero(start > threshold).tolist():
        low = start_p[st][c]  # the least probability so far: start, then inside words
        reached = st  # inside probabilities read up to here
        for ed in ends_of.get(c, ()):
            if ed < st:
                continue
            while reached <= ed and inside[reached][c] >= threshold:
                low = min(low, inside[reached][c])
                reached += 1
            if reached <= ed:  # a word inside is below the threshold: so for every later end
                break
            out.append((st, ed, c, min(low, end_p[ed][c])))
    return out
