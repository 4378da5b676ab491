"""Dynamic masking (recipe statistics, exactness of the sampler) and collation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distil_scale.data.masking import Masker, collate
from distil_scale.data.shards import read_manifest
from distil_scale.data.stream import BatchStream

VOCAB = 1000
SPECIALS = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask
MASK_ID = 4


def _zipf_probs(vocab: int = VOCAB) -> np.ndarray:
    counts = 1e6 / np.arange(1, vocab + 1)  # id 5 is the most frequent token, id 999 the rarest
    return np.maximum(counts, 1) ** -0.7


def _random_batch(rng: np.random.Generator, *, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = []
    for _ in range(batch):
        body = rng.zipf(1.2, size=int(rng.integers(10, 120))) + 4
        seqs.append(np.concatenate([[2], np.where(body < VOCAB, body, 1), [3]]))
    return collate(seqs, pad_id=0)


def test_collate_pads_to_a_multiple_of_eight():
    seqs = [np.array([2, 9, 3], dtype=np.uint16), np.arange(2, 13, dtype=np.int32)]
    ids, mask = collate(seqs, pad_id=0)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (2, 16)
    torch.testing.assert_close(ids[0, :4], torch.tensor([2, 9, 3, 0]))
    torch.testing.assert_close(ids[1, :11], torch.arange(2, 13))
    torch.testing.assert_close(mask.sum(1), torch.tensor([3, 11]))
    assert (ids[mask == 0] == 0).all()
    assert collate([np.arange(16)], pad_id=0, multiple_of=8)[0].shape == (1, 16)


def _reference_collate(seqs: list[np.ndarray], *, pad_id: int, multiple_of: int) -> tuple[torch.Tensor, torch.Tensor]:
    """collate written row by row."""
    width = -(-max([len(s) for s in seqs] + [1]) // multiple_of) * multiple_of
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        mask[row, : len(seq)] = 1
    return ids, mask


def _reference_mask(masker: Masker, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator):
    """The masking recipe written with torch ops throughout: Masker must draw and pick exactly the same."""
    flat_ids = input_ids.reshape(-1)
    weights = torch.from_numpy(masker.weights)[flat_ids] * attention_mask.reshape(-1).float()
    num_targets = min(math.ceil(masker.mlm_probability * int(attention_mask.sum())), int(torch.count_nonzero(weights)))
    labels, masked = torch.full_like(flat_ids, -100), flat_ids.clone()
    if num_targets:
        arrival = torch.empty(weights.shape).exponential_(generator=generator).clamp_(min=torch.finfo().tiny)
        picked = torch.topk(weights / arrival, num_targets, sorted=False).indices
        labels[picked] = flat_ids[picked]
        action = torch.rand(num_targets, generator=generator)
        bound = masker.mask_fraction + masker.random_fraction
        masked[picked[action < masker.mask_fraction]] = masker.mask_id
        to_random = picked[(action >= masker.mask_fraction) & (action < bound)]
        draws = torch.randint(len(masker.random_ids), (len(to_random),), generator=generator)
        masked[to_random] = torch.from_numpy(masker.random_ids)[draws]
    return masked.view_as(input_ids), labels.view_as(input_ids)


def test_collate_and_masks_match_the_reference():
    rng = np.random.default_rng(11)
    for _ in range(60):
        vocab = int(rng.choice([50, VOCAB, 70000]))
        specials = sorted({int(i) for i in rng.integers(0, vocab, size=5)})
        probs = rng.random(vocab) ** 3
        probs[rng.integers(0, vocab, size=vocab // 10)] = 0.0
        masker = Masker(
            probs,
            mask_id=specials[0],
            vocab_size=vocab,
            special_ids=specials,
            mlm_probability=float(rng.choice([0.15, 0.5, 1.0])),
        )
        seqs = [
            rng.integers(0, vocab, size=int(rng.choice([0, rng.integers(1, 150)]))).astype(
                "<u2" if vocab < 2**16 and rng.random() < 0.5 else "<i4"
            )
            for _ in range(int(rng.integers(1, 24)))
        ]
        multiple_of = int(rng.choice([1, 8]))
        ids, mask = collate(seqs, pad_id=0, multiple_of=multiple_of)
        want_ids, want_mask = _reference_collate(seqs, pad_id=0, multiple_of=multiple_of)
        assert ids.dtype == mask.dtype == torch.int64
        torch.testing.assert_close((ids, mask), (want_ids, want_mask), rtol=0, atol=0)
        seed = int(rng.integers(2**40))
        got = masker(ids, mask, generator=torch.Generator().manual_seed(seed))
        want = _reference_mask(masker, ids, mask, torch.Generator().manual_seed(seed))
        assert all(g.dtype == torch.int64 and g.shape == ids.shape for g in got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_masking_statistics_follow_the_recipe():
    masker = Masker(_zipf_probs(), mask_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIALS)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    picked = as_mask = as_random = kept = 0
    for _ in range(200):
        ids, mask = _random_batch(rng)
        masked, labels = masker(ids, mask, generator=generator)
        targets = labels != -100
        maskable = (mask == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
        assert int(targets.sum()) == min(math.ceil(0.15 * int(mask.sum())), int(maskable.sum()))
        assert not (targets & ~maskable).any()  # never a special token or padding
        torch.testing.assert_close(labels[targets], ids[targets])
        torch.testing.assert_close(masked[~targets], ids[~targets])  # nothing changes off target
        picked += int(targets.sum())
        as_mask += int((masked[targets] == MASK_ID).sum())
        changed = targets & (masked != ids) & (masked != MASK_ID)
        assert not torch.isin(masked[changed], torch.tensor(SPECIALS)).any()
        as_random += int(changed.sum())
        kept += int((targets & (masked == ids)).sum())
    assert abs(as_mask / picked - 0.8) < 0.01
    assert abs(as_random / picked - 0.1) < 0.01  # a random draw equal to the original counts as kept (1 / 995)
    assert abs(kept / picked - 0.1) < 0.01


def test_rare_tokens_are_masked_more_often():
    masker = Masker(_zipf_probs(), mask_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIALS)
    # Half the positions hold the most frequent token (5), half a rare one (900), in equal numbers.
    ids = torch.tensor([[2] + [5, 900] * 50 + [3]] * 8)
    mask = torch.ones_like(ids)
    generator = torch.Generator().manual_seed(1)
    hits = {5: 0, 900: 0}
    for _ in range(50):
        _, labels = masker(ids, mask, generator=generator)
        for token in hits:
            hits[token] += int((labels == token).sum())
    assert hits[900] > 5 * hits[5] > 0


def test_sampler_matches_successive_weighted_draws():
    # The exponential race must include each position with the probability of two successive weighted draws
    # without replacement (what torch.multinomial(w, 2) does): P(i) = p_i + sum_j p_j * w_i / (W - w_j).
    weights = np.array([0, 0, 0, 0, 0, 1.0, 2.0, 4.0, 8.0, 0.5, 3.0])
    masker = Masker(weights, mask_id=MASK_ID, vocab_size=len(weights), special_ids=SPECIALS, mlm_probability=0.3)
    ids, mask = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.ones(1, 6, dtype=torch.int64)
    w = torch.tensor(weights[5:], dtype=torch.float64)
    first = w / w.sum()
    second = torch.stack([(first * w[i] / (w.sum() - w)).sum() - first[i] * w[i] / (w.sum() - w[i]) for i in range(6)])
    exact = (first + second).float()
    generator, trials = torch.Generator().manual_seed(2), 4000
    hits = torch.zeros(6)
    for _ in range(trials):
        _, labels = masker(ids, mask, generator=generator)
        hits += (labels[0] != -100).float()
    assert hits.sum() == 2 * trials
    torch.testing.assert_close(hits / trials, exact, atol=0.025, rtol=0)


def test_masker_is_deterministic_and_leaves_input_alone():
    masker = Masker(_zipf_probs(), mask_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIALS)
    ids, mask = _random_batch(np.random.default_rng(3))
    before = ids.clone()
    a = masker(ids, mask, generator=torch.Generator().manual_seed(5))
    b = masker(ids, mask, generator=torch.Generator().manual_seed(5))
    c = masker(ids, mask, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ids, before)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[1], c[1])


def test_batch_of_specials_only_has_no_targets():
    masker = Masker(_zipf_probs(), mask_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIALS)
    ids, mask = collate([np.array([2, 3]), np.array([2, 1, 3])], pad_id=0)
    ids[1, 1] = 0  # even a stray [PAD] inside a sequence is never a target
    masked, labels = masker(ids, mask, generator=torch.Generator().manual_seed(0))
    assert (labels == -100).all()
    torch.testing.assert_close(masked, ids)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="entries for a vocabulary"):
        Masker(np.ones(10), mask_id=4, vocab_size=11, special_ids=SPECIALS)
    with pytest.raises(ValueError, match="mask_fraction"):
        Masker(np.ones(10), mask_id=4, vocab_size=10, special_ids=SPECIALS, mask_fraction=0.95, random_fraction=0.1)


def test_same_sample_gets_a_fresh_mask_in_a_new_epoch(tiny_dataset):
    manifest = read_manifest(tiny_dataset)
    masker = Masker(
        manifest.token_probs(),
        mask_id=manifest.special_ids["mask"],
        vocab_size=manifest.vocab_size,
        special_ids=manifest.all_special_ids,
    )
    stream = BatchStream(
        manifest.urls("train"),
        manifest.samples("train"),
        rank=0,
        world_size=1,
        seed=0,
        micro_batch_size=16,
        masker=masker,
        pad_id=0,
        max_epochs=2,
    )
    targets: dict[tuple[str, int], frozenset[int]] = {}
    for batch in stream:
        for row, key in enumerate(batch["keys"]):
            positions = (batch["labels"][row] != -100).nonzero().flatten().tolist()
            targets[(key, batch["epoch"])] = frozenset(positions)
    keys = {key for key, _ in targets}
    same = sum(targets[(key, 0)] == targets[(key, 1)] for key in keys)
    assert len(keys) > 400 and same < 0.05 * len(keys)
