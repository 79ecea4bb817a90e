"""Block partition and mask-aware pooling: the shape-independent view of a teacher.

StrataNet section 5.1 divides each teacher's layers into ``N`` blocks, ``N`` = the student's
number of layers, so that teachers of any depth align with the same student blocks; a block's
feature is the mean pooling over the layer representations within that block (section 4.4.1).
The paper leaves open how layers are grouped when the depth is not a multiple of ``N``; we use
contiguous, nearly equal groups (:func:`partition_layers`), which also handles teachers shallower
than the student by letting neighbouring blocks share a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TeacherOutput:
    """What every teacher returns for a batch of texts, whatever its architecture or tokenizer.

    Attributes:
        logits: ``(B, C_k)`` float32 logits over the teacher's own ``C_k`` labels.
        block_states: ``(B, N, H_k)`` float32 mean-pooled hidden states of each of ``N`` blocks.
        mask: ``(B, T_k)`` attention mask of the teacher's own tokenization (1 = real token).
    """

    logits: torch.Tensor
    block_states: torch.Tensor
    mask: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.block_states.shape[1]


def partition_layers(num_layers: int, num_blocks: int) -> list[tuple[int, int]]:
    """Split layers ``0..L-1`` into ``N`` contiguous blocks ``[start, end)``.

    Block ``i`` starts at ``floor(i*L/N)`` and ends at ``max(start+1, floor((i+1)*L/N))``.
    For ``N <= L`` the blocks cover every layer exactly once with sizes differing by at most one
    (deeper blocks get the extra layer); for ``N > L`` each block is one layer and neighbouring
    blocks may share it.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    blocks = []
    for i in range(num_blocks):
        start = (i * num_layers) // num_blocks
        end = max(start + 1, ((i + 1) * num_layers) // num_blocks)
        blocks.append((start, end))
    return blocks


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens. ``hidden`` (B, T, H), ``mask`` (B, T) -> (B, H).

    Rows with no real token give zeros rather than NaN.
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def pool_blocks(layer_states: list[torch.Tensor] | tuple[torch.Tensor, ...], mask: torch.Tensor,
                blocks: list[tuple[int, int]]) -> torch.Tensor:
    """Block features from per-layer hidden states.

    Args:
        layer_states: ``L`` tensors ``(B, T, H)``, the outputs of the transformer layers
            (embeddings excluded).
        mask: ``(B, T)``.
        blocks: from :func:`partition_layers`.

    Returns:
        ``(B, N, H)``: for each block, the mean over its layers of the mask-aware token mean.
    """
    pooled = torch.stack([masked_mean(h.float(), mask) for h in layer_states], dim=1)  # (B, L, H)
    return torch.stack([pooled[:, s:e].mean(1) for s, e in blocks], dim=1)  # (B, N, H)
