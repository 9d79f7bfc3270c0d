"""Packed (padding-free) batches: many sequences back to back, with their boundaries.

A packed batch stores N sequences of lengths ``L_0 .. L_{N-1}`` as one flat tensor of ``T = sum(L_n)`` rows
and an int32 offset vector ``cu_seqlens`` of N+1 entries: sequence n owns rows
``cu_seqlens[n] : cu_seqlens[n+1]``. This is what ``attnkit.attention(..., layout="thd")`` takes, what
FlashAttention calls "varlen", and what Hugging Face's ``DataCollatorWithFlattening`` produces::

    sequences   [a a a] [b b] [c c c c]
    flat        a a a b b c c c c            (T = 9 rows)
    cu_seqlens  0     3   5       9          (int32, N + 1 = 4 entries)
    position_ids 0 1 2 0 1 0 1 2 3           (restart at every sequence)
    max_seqlen  4

Helpers here:

- :func:`pack` / :func:`unpack`: list of tensors <-> flat tensor, offsets, positions.
- :func:`cu_seqlens_from_position_ids`: recover the offsets from restarting position ids.
- :class:`FlattenCollator`: a drop-in for ``transformers.DataCollatorWithFlattening`` (same keys), with
  optional padding of the flat batch to a multiple of N rows by a dummy sequence (fixed shapes for
  ``torch.compile`` and CUDA graphs).
- :class:`FlattenCollatorForMLM`: the same, choosing masked-language-model targets after flattening.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "FlattenCollator",
    "FlattenCollatorForMLM",
    "Packed",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "pack",
    "unpack",
]


class Packed(NamedTuple):
    """Result of :func:`pack`; unpacks as ``values, cu_seqlens, max_seqlen, position_ids``."""

    values: torch.Tensor  # (T, ...) the sequences back to back (plus the dummy padding sequence, if any)
    cu_seqlens: torch.Tensor  # (N+1,) int32 offsets; the padding sequence, if any, is the last one
    max_seqlen: int  # longest sequence (the padding sequence included)
    position_ids: torch.Tensor  # (T,) int64 position of every row inside its sequence


def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    """int32 offsets ``[0, L_0, L_0 + L_1, ...]`` (N+1 entries) from N sequence lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device).reshape(-1)
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens_from_lengths: lengths must be >= 0, got {lengths.tolist()}")
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return out


def pack(
    sequences: Sequence[torch.Tensor],
    *,
    pad_to_multiple_of: int | None = None,
    pad_value: float | int = 0,
) -> Packed:
    """Concatenate sequences along their first dimension and describe the boundaries.

    Args:
        sequences: N tensors ``(L_n, *rest)`` sharing ``rest``, dtype and device (``L_n`` may be 0).
        pad_to_multiple_of: when given, append one dummy sequence of ``pad_value`` rows so that the total
            row count is a multiple of it (nothing is appended when it already is). The dummy is a sequence
            of its own, so it never mixes with real ones; drop it from the loss (as :class:`FlattenCollator`
            does).
        pad_value: fill value of the dummy sequence.

    Returns:
        :class:`Packed` ``(values (T, *rest), cu_seqlens int32 (N+1,) or (N+2,), max_seqlen, position_ids
        int64 (T,))``, all on the device of the inputs.
    """
    if isinstance(sequences, torch.Tensor) or not isinstance(sequences, Sequence) or len(sequences) == 0:
        raise ValueError("pack: expected a non-empty list of tensors (L_n, ...)")
    first = sequences[0]
    for n, s in enumerate(sequences):
        if not isinstance(s, torch.Tensor) or s.dim() < 1:
            raise ValueError(f"pack: sequence {n} must be a tensor with at least one dimension, got {s!r}")
        if s.shape[1:] != first.shape[1:] or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(
                f"pack: sequence {n} has trailing shape {tuple(s.shape[1:])}, dtype {s.dtype}, "
                f"device {s.device}; "
                f"sequence 0 has {tuple(first.shape[1:])}, {first.dtype}, {first.device}"
            )
    lengths = [int(s.shape[0]) for s in sequences]
    parts = list(sequences)
    total = sum(lengths)
    if pad_to_multiple_of is not None:
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0:
            raise ValueError(f"pack: pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        extra = (-total) % pad_to_multiple_of
        if extra:
            parts.append(first.new_full((extra, *first.shape[1:]), pad_value))
            lengths.append(extra)
    values = torch.cat(parts, dim=0)
    cu = cu_seqlens_from_lengths(lengths, device=first.device)
    position_ids = torch.cat([torch.arange(n, device=first.device) for n in lengths])
    return Packed(values, cu, max(lengths), position_ids)


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed tensor (T, ...) back into its sequences (views), one per ``cu_seqlens`` interval."""
    offsets = cu_seqlens.tolist()
    return [values[a:b] for a, b in zip(offsets, offsets[1:])]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence offsets of a packed batch from its position ids.

    A new sequence starts at the first row, at the start of every batch row (for 2-D input), and wherever
    the position is not the previous position plus one (the rule Hugging Face's mask code uses; it works
    for any starting position, e.g. RoBERTa's ``padding_idx + 1``).

    Args:
        position_ids: int tensor (T,) or (B, S); rows of a 2-D tensor are flattened in order (B*S rows).

    Returns:
        ``(cu_seqlens, max_seqlen)``: int32 (N+1,) on the device of ``position_ids``, and a Python int.
        Reads values on the host (one device sync).
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (1, 2):
        raise ValueError("cu_seqlens_from_position_ids: expected an int tensor of shape (T,) or (B, S)")
    pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    B, S = pos.shape
    if B * S == 0:
        return torch.zeros(1, dtype=torch.int32, device=pos.device), 0
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu = torch.cat([idx, idx.new_tensor([B * S])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# -- collators -----------------------------------------------------------------------------------------
def _as_list(x) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


class FlattenCollator:
    """Flatten a list of examples into one packed row, like ``transformers.DataCollatorWithFlattening``.

    Produces the same keys, dtypes and values as the Hugging Face collator (so a Trainer and any model
    that understands those keys works unchanged), and optionally pads the flat row:

    - ``input_ids``: int64 (1, T), the examples back to back;
    - ``labels``: int64 (1, T); per example ``[separator_id] + labels[1:]`` (the model shifts labels by one,
      so the separator keeps a sequence from predicting the first token of the next one);
    - ``position_ids``: int64 (1, T), restarting at ``position_ids_start`` for every example
      (``return_position_ids``);
    - ``cu_seq_lens_q``/``cu_seq_lens_k``: int32 (N+1,) and ``max_length_q``/``max_length_k``: Python ints
      (``return_flash_attn_kwargs``);
    - ``seq_idx``: int32 (1, T), the example index of every token (``return_seq_idx``).

    With ``pad_to_multiple_of=M``, a dummy sequence of ``pad_token_id`` tokens with every label equal to
    ``separator_id`` is appended so that T is a multiple of M; it is a sequence of its own in
    ``position_ids``, ``cu_seq_lens_*`` and ``seq_idx`` and never attends to or is attended by real tokens.

    Args:
        return_position_ids, separator_id, return_flash_attn_kwargs, return_seq_idx, position_ids_start:
            as in ``DataCollatorWithFlattening``.
        pad_to_multiple_of: None, or pad the flat batch to a multiple of this many tokens.
        pad_token_id: token id of the padding sequence.
        return_tensors: ``"pt"`` (torch tensors) or ``"np"`` (numpy arrays).
    """

    def __init__(
        self,
        *,
        return_position_ids: bool = True,
        separator_id: int = -100,
        return_flash_attn_kwargs: bool = False,
        return_seq_idx: bool = False,
        position_ids_start: int = 0,
        pad_to_multiple_of: int | None = None,
        pad_token_id: int = 0,
        return_tensors: str = "pt",
    ):
        if pad_to_multiple_of is not None and (
            not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0
        ):
            raise ValueError(
                f"FlattenCollator: pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}"
            )
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"FlattenCollator: return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        self.return_position_ids = return_position_ids
        self.separator_id = separator_id
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.return_seq_idx = return_seq_idx
        self.position_ids_start = position_ids_start
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.return_tensors = return_tensors

    # Subclasses override this to produce other labels (see FlattenCollatorForMLM).
    def _labels(
        self, ids: list[int], sample: Mapping[str, Any], separator_id: int, use_labels: bool
    ) -> list[int]:
        if use_labels:  # decided by the first example, as transformers does
            return [separator_id] + _as_list(sample["labels"])[1:]
        return [separator_id] + ids[1:]

    def _flatten(self, features: Sequence[Mapping[str, Any]], separator_id: int) -> tuple[dict, list[int]]:
        if len(features) == 0:
            raise ValueError("FlattenCollator: got an empty list of examples")
        ids, labels, pos, seq_idx, lengths = [], [], [], [], []
        use_labels = "labels" in features[0]
        for n, sample in enumerate(features):
            x = _as_list(sample["input_ids"])
            if len(x) == 0:
                raise ValueError(f"FlattenCollator: example {n} has no input_ids")
            ids += x
            labels += self._labels(x, sample, separator_id, use_labels)
            pos += [self.position_ids_start + i for i in range(len(x))]
            seq_idx += [n] * len(x)
            lengths.append(len(x))
        if self.pad_to_multiple_of is not None:
            extra = (-len(ids)) % self.pad_to_multiple_of
            if extra:
                ids += [self.pad_token_id] * extra
                labels += [separator_id] * extra
                pos += [self.position_ids_start + i for i in range(extra)]
                seq_idx += [len(features)] * extra
                lengths.append(extra)
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if self.return_position_ids:
            batch["position_ids"] = pos
        if self.return_seq_idx:
            batch["seq_idx"] = seq_idx
        return batch, lengths

    def _to_tensors(self, batch: dict, lengths: list[int], return_tensors: str) -> dict:
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"FlattenCollator: return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if return_tensors == "pt":
            make, i64, i32 = torch.tensor, torch.int64, torch.int32
        else:
            import numpy as np

            make, i64, i32 = np.array, np.int64, np.int32
        out = {}
        for key, val in batch.items():
            out[key] = make([val], dtype=i32 if key == "seq_idx" else i64)
        if self.return_flash_attn_kwargs:
            cu = [0]
            for n in lengths:
                cu.append(cu[-1] + n)
            out["cu_seq_lens_q"] = make(cu, dtype=i32)
            out["cu_seq_lens_k"] = make(cu, dtype=i32)
            out["max_length_q"] = out["max_length_k"] = max(lengths)
        return out

    def __call__(
        self,
        features: Sequence[Mapping[str, Any]],
        return_tensors: str | None = None,
        separator_id: int | None = None,
    ) -> dict:
        sep = self.separator_id if separator_id is None else separator_id
        batch, lengths = self._flatten(features, sep)
        return self._to_tensors(batch, lengths, return_tensors or self.return_tensors)


class FlattenCollatorForMLM(FlattenCollator):
    """Flatten examples, then choose masked-language-model targets over the flat row.

    Masking happens after flattening, so the masked fraction is exact over the whole batch rather than per
    example. Of the chosen tokens, 80% become ``mask_token_id``, 10% a random token and 10% stay (BERT);
    ``labels`` hold the original id at chosen positions and -100 elsewhere (padding and special tokens are
    never chosen). Encoders attend bidirectionally inside each sequence only, which the position ids (or
    ``cu_seq_lens_*``) let attnkit's Hugging Face integration enforce.

    Args:
        mask_token_id: id of the mask token.
        vocab_size: random replacements are drawn from ``[0, vocab_size)``.
        mlm_probability: fraction of (non-special, non-padding) tokens chosen as targets.
        special_token_ids: ids never chosen (e.g. CLS, SEP).
        generator: optional ``torch.Generator`` for reproducible masking.
        **kwargs: :class:`FlattenCollator` options (``separator_id`` is unused: labels are -100 where not
            chosen).
    """

    def __init__(
        self,
        *,
        mask_token_id: int,
        vocab_size: int,
        mlm_probability: float = 0.15,
        special_token_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= mlm_probability <= 1.0:
            raise ValueError(
                f"FlattenCollatorForMLM: mlm_probability must be in [0, 1], got {mlm_probability!r}"
            )
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.mlm_probability = mlm_probability
        self.special_token_ids = tuple(special_token_ids)
        self.generator = generator

    def _labels(self, ids, sample, separator_id, use_labels):
        return [-100] * len(ids)  # filled after flattening

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch, lengths = self._flatten(features, -100)
        ids = torch.tensor(batch["input_ids"], dtype=torch.int64)
        real = torch.zeros_like(ids, dtype=torch.bool)
        real[: sum(lengths[: len(features)])] = True  # the dummy padding sequence, if any, comes last
        for tok in self.special_token_ids:
            real &= ids != tok
        g = self.generator
        chosen = (torch.rand(ids.shape, generator=g) < self.mlm_probability) & real
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        r = torch.rand(ids.shape, generator=g)
        to_mask = chosen & (r < 0.8)
        to_random = chosen & (r >= 0.8) & (r < 0.9)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=g)
        ids = torch.where(to_mask, torch.full_like(ids, self.mask_token_id), ids)
        ids = torch.where(to_random, random_ids, ids)
        batch["input_ids"] = ids.tolist()
        batch["labels"] = labels.tolist()
        return self._to_tensors(batch, lengths, return_tensors or self.return_tensors)
