"""Dynamic MLM masking and collation: the per-batch CPU work between the shards and the GPU.

Masking follows the DistilBERT recipe. Over the whole micro-batch, `n = ceil(0.15 * real tokens)` positions are
drawn without replacement with probability proportional to `w[id] = max(count[id], 1) ** -0.7` (rare tokens
are masked more often; special tokens and padding have weight 0). Of the picked positions 80% become [MASK],
10% a random non-special token and 10% stay as they are; labels hold the original id there and -100 elsewhere.

Weighted sampling without replacement uses the exponential race: give position i the arrival time
`E_i / w_i` with `E_i ~ Exp(1)`; the n earliest arrivals are a sample without replacement with exactly the
successive-draw probabilities of `torch.multinomial(w, n)`. That is one vectorised draw plus one top-k,
instead of n dependent draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels.contract import IGNORE_INDEX


def collate(seqs: list[np.ndarray], *, pad_id: int, multiple_of: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence rounded up to `multiple_of` (tensor-core friendly shapes).

    An empty sequence (the stream's placeholder for a sample it could not read) becomes a row of padding with
    attention_mask 0 throughout. The width is at least one column even when every row is empty, so such a
    batch still runs through a model (and through the collectives its backward takes part in).
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(-(-lengths.max(initial=1) // multiple_of) * multiple_of)
    real = np.arange(width)[None, :] < lengths[:, None]
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    if len(seqs):
        # One copy for the whole batch: a row-major boolean index visits each row's first len(seq) positions in
        # order, which is exactly where the concatenated sequences go.
        input_ids[real] = np.concatenate(seqs)
    return torch.from_numpy(input_ids), torch.from_numpy(real.astype(np.int64))


class Masker:
    """Callable that masks a padded batch; all randomness comes from the generator passed in."""

    def __init__(
        self,
        token_probs: np.ndarray,
        *,
        mask_id: int,
        vocab_size: int,
        special_ids: list[int],
        mlm_probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ):
        if len(token_probs) != vocab_size:
            raise ValueError(f"token_probs has {len(token_probs)} entries for a vocabulary of {vocab_size}")
        if not 0.0 < mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {mlm_probability}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0:
            raise ValueError(f"mask_fraction {mask_fraction} + random_fraction {random_fraction} must lie in [0, 1]")
        weights = np.asarray(token_probs, dtype=np.float32).copy()
        weights[list(special_ids)] = 0.0
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("token_probs must be finite and non-negative")
        # Kept as numpy: the Masker travels to DataLoader workers by pickle, and numpy pickles as plain bytes
        # where a tensor would go through torch's shared-memory reducers.
        self.weights = weights
        self.random_ids = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, dtype=np.int64))
        self.mask_id = mask_id
        self.mlm_probability = mlm_probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction

    @property
    def vocab_size(self) -> int:
        """Token ids this masker accepts lie in [0, vocab_size); the stream turns any other sample into padding."""
        return len(self.weights)

    @classmethod
    def for_manifest(cls, manifest, *, smoothing: float = 0.7, mlm_probability: float = 0.15) -> Masker:
        """The masker of a prepared dataset: its token counts, vocabulary and special ids."""
        return cls(
            manifest.token_probs(smoothing=smoothing),
            mask_id=manifest.special_ids["mask"],
            vocab_size=manifest.vocab_size,
            special_ids=manifest.all_special_ids,
            mlm_probability=mlm_probability,
        )

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked_ids, labels) for an int64 (B, L) batch; `input_ids` itself is left untouched.

        Only real tokens (attention_mask 1) can be picked: padding, and so a placeholder row that is all padding,
        never gets a label, and a batch without real tokens comes back unchanged with labels -100 throughout.
        """
        # Everything but the random draws runs in numpy: the same arithmetic (a float32 gather, product,
        # quotient and comparisons give the same bits either way) at a fraction of torch's per-op overhead on
        # these small arrays. The draws come from `generator` exactly as before, so the masks do not change.
        flat_ids = input_ids.reshape(-1).numpy()
        real = attention_mask.reshape(-1).numpy() != 0
        weights = np.where(real, self.weights[flat_ids], np.float32(0.0))
        num_real = int(np.count_nonzero(real))
        num_maskable = int(np.count_nonzero(weights))
        num_targets = min(math.ceil(self.mlm_probability * num_real), num_maskable)
        labels = np.full_like(flat_ids, IGNORE_INDEX)
        masked = flat_ids.copy()
        if num_targets == 0:
            return torch.from_numpy(masked).view_as(input_ids), torch.from_numpy(labels).view_as(input_ids)
        # Exponential race: the largest w_i / E_i are the earliest arrivals. Weight-0 positions score 0 and,
        # because num_targets <= num_maskable, never make the cut.
        arrival = torch.empty(weights.shape, dtype=torch.float32).exponential_(generator=generator)
        # An arrival of exactly 0 would turn a weight-0 position into 0/0 = NaN, which top-k ranks first.
        arrival.clamp_(min=torch.finfo(torch.float32).tiny)
        scores = torch.from_numpy(np.divide(weights, arrival.numpy(), out=weights))
        picked = torch.topk(scores, num_targets, sorted=False).indices.numpy()
        labels[picked] = flat_ids[picked]
        # float32 thresholds, as torch compares a float32 tensor with a Python float.
        action = torch.rand(num_targets, generator=generator).numpy()
        mask_below = np.float32(self.mask_fraction)
        random_below = np.float32(self.mask_fraction + self.random_fraction)
        to_mask = picked[action < mask_below]
        to_random = picked[(action >= mask_below) & (action < random_below)]
        masked[to_mask] = self.mask_id
        draws = torch.randint(len(self.random_ids), (len(to_random),), generator=generator).numpy()
        masked[to_random] = self.random_ids[draws]
        return torch.from_numpy(masked).view_as(input_ids), torch.from_numpy(labels).view_as(input_ids)
