"""Block-wise amalgamation of K teachers' block features: ST-amalg and its ablations (StrataNet section 4.5).

For block ``b`` the K teachers give features ``h_k^b`` (widths ``H_k`` differ) and confidences
``c_k^b in [0, 1]`` (:mod:`dfkd_ray.math.confidence`). One :class:`BlockAmalgamation` module,
selected by ``fusion``, turns them into the amalgamated block target ``a^b`` of width ``D``:

- ``st`` (StrataNet, Eq. 5-6). Eq. 5, confidence enrichment, per teacher and block:
  ``e_k^b = W_k^b LN(h_k^b) + c_k^b u_k^b``: a linear map of the feature plus a learned linear map
  of the confidence (the paper's "linear layers to enrich the block-level embeddings"). Eq. 6: the
  sequence ``[AMALG]^b, e_1^b, ..., e_K^b`` passes one Transformer encoder layer and the output at
  ``[AMALG]`` is ``a^b``.
- ``mul`` (ablation StrataNet_mul, section 7.1.2): the confidence multiplies the projected feature
  instead of enriching it, ``e_k^b = c_k^b (W_k^b LN(h_k^b))``; Eq. 6 as in ``st``. (A projection is
  still needed because teacher widths differ; the multiplication comes after it, so an OOD teacher's
  token goes to zero, bias included.)
- ``no_st`` (ablation StrataNet_noST): no Transformer; a linear layer over the confidence-weighted
  mean of the projected features, ``a^b = V^b sum_k wbar_k^b W_k^b LN(h_k^b)`` with
  ``wbar_k^b = c_k^b / sum_j c_j^b`` (uniform where every teacher has confidence 0).

Choices the paper leaves open, made here:

- Each teacher feature first passes a LayerNorm without affine parameters: teachers of different
  architectures produce states of very different scales, and only directions matter downstream
  (Eq. 7 compares L2-normalised vectors).
- One Transformer layer (pre-norm, ``4 D`` feed-forward, GELU) per block by default, because blocks
  carry different kinds of features (lexical low, task-specific high); ``share_layer=True`` uses one
  layer for all blocks (each block keeps its own ``[AMALG]`` token, which tells the layer the block).
- No teacher-position embedding: each teacher's projection ``W_k^b`` has its own bias, which already
  tells the tokens apart.

Gradients flow into every parameter here through the block loss (Eq. 7); the teachers' features
are inputs only. Pure torch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

FUSIONS = ("st", "mul", "no_st")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a check of ``t``'s values (finite, in range) is cheap: ``t`` is in host memory.

    Reading a GPU tensor's values waits for every queued kernel, which would stall each training
    step between its forward passes; there, shapes are still checked and a non-finite value surfaces
    as the step's non-finite loss (:meth:`dfkd_ray.train.step.Distiller.step`)."""
    return t.device.type == "cpu"


def normalized_weights(weights: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``w_k / sum_j w_j`` along ``dim``; uniform where the sum is (near) zero. Any shape -> same shape."""
    total = weights.sum(dim, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[dim])
    return torch.where(total > eps, weights / total.clamp_min(eps), uniform)


def kd_teacher_weights(confidences: torch.Tensor, power: float, eps: float = 1e-12) -> torch.Tensor:
    """The KD weights of the teachers from their confidences: ``wbar_k = c_k^gamma / sum_j c_j^gamma``.

    StrataNet (section 5, the KL term) weights the teachers by "confidence" without saying how
    sharply. ``gamma = 1`` (``power``, ``AmalgamationConfig.kd_confidence_power``) is the literal
    reading; ``gamma > 1`` lets the teacher that is clearly more in-domain dominate the target (a
    teacher that is 0.84 confident on its own text and 0.6 on the other's keeps 42% of the
    weight at ``gamma = 1`` but 6% at ``gamma = 8``); ``gamma = 0`` is the uniform mix and
    ``gamma -> inf`` picks the most confident teacher. Computed as a softmax of ``gamma log c`` so a
    large ``gamma`` cannot underflow to all zeros.

    Args:
        confidences: ``(B, K)`` ``c_k in [0, 1]``.
        power: ``gamma >= 0``.
        eps: confidences are floored here before the log; a row whose confidences are all below
            it gets uniform weights (as :func:`normalized_weights` gives an all-zero row).

    Returns:
        ``(B, K)`` non-negative weights; every row sums to 1.
    """
    if not 0.0 <= power < float("inf"):  # also rejects NaN
        raise ValueError(f"the KD confidence power must be finite and >= 0, got {power}")
    if confidences.ndim != 2:
        raise ValueError(f"confidences must be (B, K), got shape {tuple(confidences.shape)}")
    c = confidences.float()
    if power == 1.0:
        return normalized_weights(c, dim=-1, eps=eps)
    log_c = torch.log(c.clamp_min(eps))  # (B, K)
    return torch.softmax(power * log_c, dim=-1)  # (B, K) wbar_k


def with_source_teacher(weights: torch.Tensor, source: torch.Tensor, share: float) -> torch.Tensor:
    """KD weights that give ``share`` of each row to the teacher the row was made for.

    ``w'_k = (1 - rho) wbar_k + rho [k = k*]``, with ``k*`` the row's source teacher (the teacher
    whose class request wrote the text) and ``rho = share``: an ablation of the confidence in
    StrataNet's KD target (section 5). ``rho = 0`` is the paper's target, ``rho = 1`` the source
    teacher alone, which trains worse students (``docs/confidence.md``): steered text is often not in
    its source teacher's domain, and the confidence sends it to the teacher whose domain it is in.
    Rows with ``k* < 0`` (no source teacher) keep ``wbar``.

    Args:
        weights: ``(B, K)`` ``wbar_k`` (:func:`kd_teacher_weights`).
        source: ``(B,)`` int source-teacher index in ``[0, K)``, or -1.
        share: ``rho in [0, 1]``.

    Returns:
        ``(B, K)`` weights; every row still sums to 1.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the source teacher's share of the KD weights must be in [0, 1], got {share}")
    if source.shape != weights.shape[:1]:
        raise ValueError(f"source teachers must be (B,) = ({weights.shape[0]},), got shape {tuple(source.shape)}")
    k = weights.shape[-1]
    if values_checkable(source) and bool((source >= k).any()):
        raise ValueError(f"a source-teacher index is >= K = {k}: {source.tolist()}")
    onehot = torch.nn.functional.one_hot(source.clamp_min(0).long(), k).to(weights.dtype)  # (B, K)
    mixed = (1.0 - share) * weights + share * onehot  # (B, K)
    return torch.where((source >= 0).unsqueeze(-1), mixed, weights)


def check_teacher_inputs(block_states: Sequence[torch.Tensor], confidences: Sequence[torch.Tensor], *,
                         num_blocks: int | None = None, dims: Sequence[int] | None = None) -> tuple[int, int]:
    """Validate K teachers' ``(B, N, H_k)`` block states and ``(B, N)`` confidences; return ``(B, N)``.

    Raises:
        ValueError: K = 0, list lengths differ, shapes disagree, a width is not the expected one,
            N differs from ``num_blocks``, or a confidence (in host memory: :func:`values_checkable`) is
            outside ``[0, 1]`` or not finite.
    """
    k = len(block_states)
    if k == 0:
        raise ValueError("K = 0 teachers: amalgamation needs at least one teacher's block states")
    if len(confidences) != k:
        raise ValueError(f"got block states of {k} teachers but confidences of {len(confidences)}")
    if dims is not None and len(dims) != k:
        raise ValueError(f"the module was built for {len(dims)} teachers, got {k}")
    b, n = block_states[0].shape[:2] if block_states[0].ndim == 3 else (None, None)
    for i, (h, c) in enumerate(zip(block_states, confidences)):
        if h.ndim != 3:
            raise ValueError(f"teacher {i}: block states must be (B, N, H), got shape {tuple(h.shape)}")
        if h.shape[:2] != (b, n):
            raise ValueError(f"teacher {i}: block states {tuple(h.shape)} disagree with teacher 0's (B, N) = ({b}, {n})")
        if dims is not None and h.shape[2] != dims[i]:
            raise ValueError(f"teacher {i}: hidden size {h.shape[2]} differs from the {dims[i]} the module was built for")
        if c.shape != (b, n):
            raise ValueError(f"teacher {i}: confidences must be (B, N) = ({b}, {n}), got {tuple(c.shape)}")
        if values_checkable(c) and (not torch.isfinite(c).all() or (c < 0).any() or (c > 1).any()):
            raise ValueError(f"teacher {i}: confidences must be finite and lie in [0, 1], got range "
                             f"[{c.min().item():.4g}, {c.max().item():.4g}]")
    if num_blocks is not None and n != num_blocks:
        raise ValueError(f"teachers give N = {n} blocks but the module was built for {num_blocks}")
    return b, n


class BlockAmalgamation(nn.Module):
    """ST-amalg (Eq. 5-6) and its ablations ``mul`` and ``no_st``, selected by ``fusion``.

    Args:
        teacher_dims: ``H_k`` for each of the K teachers, in the order inputs will come.
        num_blocks: ``N``.
        dim: ``D`` (``amalg_dim``), the width of the amalgamated space.
        heads: attention heads of the Transformer layer (``amalg_heads``; must divide ``D``).
        fusion: ``st`` | ``mul`` | ``no_st``.
        dropout: dropout inside the Transformer layer (``amalg_dropout``).
        share_layer: one Transformer layer for all blocks (``share_st_layer``).
    """

    def __init__(self, teacher_dims: Sequence[int], num_blocks: int, dim: int, *, heads: int, fusion: str,
                 dropout: float, share_layer: bool):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
        if len(teacher_dims) == 0:
            raise ValueError("K = 0 teachers: give the hidden size of at least one teacher")
        if any(int(h) < 1 for h in teacher_dims):
            raise ValueError(f"teacher hidden sizes must be >= 1, got {list(teacher_dims)}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.teacher_dims = [int(h) for h in teacher_dims]
        self.num_blocks, self.dim, self.fusion, self.share_layer = num_blocks, dim, fusion, share_layer
        k = len(self.teacher_dims)
        self.norms = nn.ModuleList([nn.LayerNorm(h, elementwise_affine=False) for h in self.teacher_dims])
        # W_k^b: (H_k -> D) for every block b and teacher k
        self.proj = nn.ModuleList([nn.ModuleList([nn.Linear(h, dim) for h in self.teacher_dims])
                                   for _ in range(num_blocks)])
        if fusion == "st":
            self.conf_embed = nn.Parameter(torch.randn(num_blocks, k, dim) * 0.5)  # u_k^b (N, K, D), Eq. 5
        if fusion in ("st", "mul"):
            self.amalg_token = nn.Parameter(torch.randn(num_blocks, dim) * 0.02)  # [AMALG]^b (N, D)
            n_layers = 1 if share_layer else num_blocks
            self.layers = nn.ModuleList([
                nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
                for _ in range(n_layers)])
        else:
            self.out = nn.ModuleList([nn.Linear(dim, dim) for _ in range(num_blocks)])  # V^b

    def forward(self, block_states: Sequence[torch.Tensor], confidences: Sequence[torch.Tensor]) -> torch.Tensor:
        """Amalgamated block targets.

        Args:
            block_states: K tensors ``(B, N, H_k)``, the teachers' block features ``h_k^b``.
            confidences: K tensors ``(B, N)``, ``c_k^b in [0, 1]``.

        Returns:
            ``(B, N, D)``: ``a^b`` for every block.
        """
        check_teacher_inputs(block_states, confidences, num_blocks=self.num_blocks, dims=self.teacher_dims)
        dtype = self.proj[0][0].weight.dtype
        normed = [norm(h.to(dtype)) for norm, h in zip(self.norms, block_states)]  # K x (B, N, H_k)
        conf = torch.stack(confidences, dim=-1).to(dtype)  # (B, N, K)
        # projected features W_k^b LN(h_k^b)
        e = torch.stack([torch.stack([self.proj[b][k](normed[k][:, b]) for k in range(len(normed))], dim=1)
                         for b in range(self.num_blocks)], dim=1)  # (B, N, K, D)
        if self.fusion == "no_st":
            w = normalized_weights(conf, dim=-1)  # (B, N, K) wbar_k^b
            pooled = (w.unsqueeze(-1) * e).sum(2)  # (B, N, D)
            return torch.stack([self.out[b](pooled[:, b]) for b in range(self.num_blocks)], dim=1)  # (B, N, D)
        if self.fusion == "st":
            e = e + conf.unsqueeze(-1) * self.conf_embed  # (B, N, K, D) Eq. 5
        else:  # mul
            e = conf.unsqueeze(-1) * e  # (B, N, K, D)
        bsz = e.shape[0]
        tokens = torch.cat([self.amalg_token.expand(bsz, -1, -1).unsqueeze(2), e], dim=2)  # (B, N, K+1, D)
        if self.share_layer:
            out = self.layers[0](tokens.flatten(0, 1))  # (B*N, K+1, D)
            return out[:, 0].view(bsz, self.num_blocks, self.dim)  # (B, N, D) Eq. 6
        return torch.stack([self.layers[b](tokens[:, b])[:, 0] for b in range(self.num_blocks)], dim=1)  # (B, N, D)
