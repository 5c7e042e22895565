"""Sampling on the device: :func:`llmc.runtime.sampling.sample_batch`'s function, in torch ops.

Each row's :class:`~llmc.runtime.sampling.SampleRow` was fixed when its step was launched, its uniform
drawn by the host from the request's own generator; here the device applies the penalties, temperature,
top-k, top-p and min-p and the inverse-CDF pick, in the same order and precision as the host sampler
(float32 penalties with a float64 penalty term, float64 probabilities), so a seeded request draws the
same tokens on either side. Only the token ids (and, for rows that ask, their logprobs) are copied back.
``extra`` is the output token each row's sequence produced in the step before, still on the device
(the engine's deferred token, -1: none); penalties count it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmc.runtime.sampling import SampleRow, TokenLogprobs


@dataclass
class DeviceLogprobs:
    """Logprobs of the rows that asked, still on the device: the chosen token's, and the top ``n``."""

    rows: list[int]
    counts: list[int]
    chosen: torch.Tensor  # [L] float64
    top_ids: torch.Tensor  # [L, max n]
    top_values: torch.Tensor  # [L, max n] float64

    def to(self, device: str | torch.device, non_blocking: bool = False) -> DeviceLogprobs:
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return DeviceLogprobs(self.rows, self.counts, move(self.chosen), move(self.top_ids), move(self.top_values))

    def unpack(self, tokens: np.ndarray, total: int) -> list[TokenLogprobs | None]:
        """Per row of the step (host tensors): :class:`TokenLogprobs` or None."""
        out: list[TokenLogprobs | None] = [None] * total
        chosen, ids, values = self.chosen.tolist(), self.top_ids.tolist(), self.top_values.tolist()
        for i, (row, n) in enumerate(zip(self.rows, self.counts, strict=True)):
            top = [(int(ids[i][j]), float(values[i][j])) for j in range(n)]
            out[row] = TokenLogprobs(int(tokens[row]), float(chosen[i]), top)
        return out


def _padded(lists: list[np.ndarray], fill: int, device: torch.device, extra_column: bool = False) -> torch.Tensor:
    width = max([len(x) for x in lists] + [1]) + int(extra_column)
    out = np.full((len(lists), width), fill, dtype=np.int64)
    for i, x in enumerate(lists):
        out[i, : len(x)] = x
    return torch.from_numpy(out).to(device, non_blocking=True)


def apply_penalties(x: torch.Tensor, rows: list[SampleRow], extra: torch.Tensor | None) -> torch.Tensor:
    """``x [R, V]`` float32 with each penalized row's repetition, presence and frequency penalties applied."""
    pen = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not pen:
        return x
    dev, vocab = x.device, x.shape[1]
    index = torch.tensor(pen, device=dev)
    xp = x.index_select(0, index)
    outputs = _padded([rows[i].output_ids for i in pen], vocab, dev, extra_column=True)  # vocab: a dummy column
    if extra is not None:
        last = extra.index_select(0, index)
        outputs[:, -1] = torch.where(last >= 0, last, vocab)
    params = [rows[i].params for i in pen]
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=dev)[:, None]
    if any(p.repetition_penalty != 1.0 for p in params):
        prompts = _padded([rows[i].prompt_ids for i in pen], vocab, dev)
        seen = torch.zeros((len(pen), vocab + 1), dtype=torch.bool, device=dev)
        seen.scatter_(1, prompts, True)
        seen.scatter_(1, outputs, True)
        seen = seen[:, :vocab] & (rep != 1.0)
        xp = torch.where(seen, torch.where(xp > 0, xp / rep, xp * rep), xp)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float64, device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float64, device=dev)[:, None]
    counts = torch.zeros((len(pen), vocab + 1), dtype=torch.float64, device=dev)
    counts.scatter_add_(1, outputs, torch.ones(outputs.shape, dtype=torch.float64, device=dev))
    counts = counts[:, :vocab]
    hit = counts > 0
    term = freq * counts + pres  # float64, as the host's (python float) * counts + presence
    xp = torch.where(hit & ((freq != 0) | (pres != 0)), (xp.double() - term).float(), xp)
    out = x.clone()
    out[index] = xp
    return out


def filter_probs(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """:func:`llmc.runtime.sampling.filter_probs` in torch: float64 probabilities ``[R, V]``."""
    x = x.double() / temperature[:, None]
    vocab = x.shape[1]
    limited = (top_k > 0) & (top_k < vocab)
    if bool(limited.any()):
        k = torch.where(limited, top_k, torch.full_like(top_k, vocab))
        kth = torch.sort(x, dim=1, descending=True).values.gather(1, (k - 1)[:, None])
        x = torch.where(x < kth, torch.tensor(float("-inf"), dtype=x.dtype, device=x.device), x)
    probs = torch.exp(x - x.max(dim=1, keepdim=True).values)
    probs = probs / probs.sum(dim=1, keepdim=True)
    if bool((top_p < 1.0).any()):
        sorted_p, order = torch.sort(-probs, dim=1, stable=True)
        sorted_p = -sorted_p
        keep_sorted = torch.cumsum(sorted_p, dim=1) - sorted_p < top_p[:, None]
        keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    if bool((min_p > 0).any()):
        probs = torch.where(probs >= min_p[:, None] * probs.max(dim=1, keepdim=True).values, probs, 0.0)
    return probs / probs.sum(dim=1, keepdim=True)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF pick: the first token whose cumulative mass exceeds ``u * total``."""
    cdf = torch.cumsum(probs, dim=1)
    idx = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(dim=1)
    return torch.clamp(idx, max=probs.shape[1] - 1)


def sample(logits: torch.Tensor, rows: list[SampleRow], extra: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, DeviceLogprobs | None]:
    """Token ids ``[R]`` (int64, on ``logits``' device) of ``logits [R, V]``, and the logprobs rows asked for."""
    logits = logits.float()
    dev = logits.device
    x = apply_penalties(logits, rows, extra)
    tokens = torch.argmax(x, dim=1)
    rand = [i for i, r in enumerate(rows) if not r.params.greedy]
    if rand:
        params = [rows[i].params for i in rand]
        f64 = lambda values: torch.tensor(values, dtype=torch.float64, device=dev)
        index = torch.tensor(rand, device=dev)
        probs = filter_probs(x.index_select(0, index), f64([p.temperature for p in params]),
                             torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev),
                             f64([p.top_p for p in params]), f64([p.min_p for p in params]))
        tokens = tokens.index_copy(0, index, draw(probs, f64([rows[i].uniform for i in rand])))
    asked = [(i, r.params.logprobs) for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not asked:
        return tokens, None
    index = torch.tensor([i for i, _ in asked], device=dev)
    logp = torch.log_softmax(logits.index_select(0, index).double(), dim=1)
    chosen = logp.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
    width = max(max(n for _, n in asked), 1)
    top = torch.topk(logp, width, dim=1)
    return tokens, DeviceLogprobs([i for i, _ in asked], [int(n) for _, n in asked], chosen, top.indices, top.values)
