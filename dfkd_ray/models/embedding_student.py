"""Models reading pseudo-embeddings (AS-DFD, Ma et al. 2020): teachers and the student on crafted embeddings.

AS-DFD's pseudo-sample ``e`` is what the embedding layer would output for a text (Eq. 1,
``e = EmbeddingLayer(x)``, ``h = TransformerLayers(e)``): it is fed to the transformer layers, and
"no inputs go through the embedding layer" while training (Figure 1). Here a model runs on ``e``
through its ordinary ``forward``, with a forward hook that puts ``e`` in place of its embedding
layer's output (:func:`embeddings_replaced`), so every HF encoder that keeps its embedding layer at
``base_model.embeddings`` (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa) works unchanged. The student
holds a frozen copy of the first teacher's embedding layer (Algorithm 1, line 1:
``theta^S_emb <- theta^T_emb``): after training it reads real text through the very layer whose
output space its pseudo-samples lived in.

- :func:`embedding_layer`: the embedding layer of an encoder;
- :func:`special_embeddings`: the embedding layer's outputs for [CLS], [SEP], padding and [MASK],
  the vectors of the alignment constraints and of Eq. 3;
- :func:`teacher_on_embeddings`: a frozen teacher's logits, last-layer [CLS] state and block features;
- :class:`EmbeddingStudent`: the student (a :class:`~dfkd_ray.models.student.Student`'s classifier with
  the teacher's frozen embedding layer) plus ``W``, the linear head of the self-supervised module (Eq. 3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from dfkd_ray.config import StudentConfig
from dfkd_ray.math.blocks import TeacherOutput, pool_blocks
from dfkd_ray.math.embedding_guessing import gather_positions, mask_embeddings
from dfkd_ray.models.student import Student


def embedding_layer(model: nn.Module) -> nn.Module:
    """The embedding layer (word, position and token-type embeddings, LayerNorm) of a HF encoder:
    ``base_model.embeddings``, where BERT, RoBERTa, DistilBERT, ELECTRA and DeBERTa keep it."""
    layer = getattr(getattr(model, "base_model", model), "embeddings", None)
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{type(model).__name__} keeps no embedding layer at base_model.embeddings; AS-DFD shares "
                         "that layer between teacher and student (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa)")
    return layer


@contextlib.contextmanager
def embeddings_replaced(model: nn.Module, embeds: torch.Tensor):
    """While inside, ``model``'s embedding layer outputs ``embeds`` (B, l, d) whatever ids it is given."""
    handle = embedding_layer(model).register_forward_hook(lambda module, args, output: embeds)
    try:
        yield
    finally:
        handle.remove()


def run_on_embeddings(model: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """``model``'s forward on pseudo-embeddings ``embeds`` (B, l, d) in place of its embedding layer's output
    (the ids it is called with only set the shapes); gradients reach ``embeds``."""
    ids = torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)  # (B, l)
    dtype = next(model.parameters()).dtype
    with embeddings_replaced(model, embeds.to(dtype)):
        return model(input_ids=ids, attention_mask=attention_mask, **kwargs)


def boundary_token_ids(tokenizer) -> tuple[Optional[int], Optional[int]]:
    """The ids the tokenizer puts at both ends of a text: ``[CLS]``/``[SEP]`` (BERT), ``<s>``/``</s>``
    (RoBERTa); the BOS/EOS tokens when it names no CLS/SEP. ``None`` where it has neither."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return first, last


@dataclass(frozen=True)
class SpecialEmbeddings:
    """The embedding layer's outputs for the alignment constraints' tokens: ``cls`` ``(d,)`` at position
    0, and ``sep``, ``pad`` and ``mask`` ``(l, d)`` at every position (the position embedding differs);
    ``mask`` replaces the masked position of Eq. 3 (the [MASK] token; padding for a tokenizer without one)."""

    cls: torch.Tensor
    sep: torch.Tensor
    pad: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> "SpecialEmbeddings":
        return SpecialEmbeddings(*(getattr(self, k).to(device) for k in ("cls", "sep", "pad", "mask")))


@torch.no_grad()
def special_embeddings(model: nn.Module, tokenizer, length: int) -> SpecialEmbeddings:
    """[CLS], [SEP], padding and [MASK] through ``model``'s embedding layer at positions ``0..length-1``
    (token type 0, eval mode), float32."""
    first, last = boundary_token_ids(tokenizer)
    if first is None or last is None:
        raise ValueError(f"{type(tokenizer).__name__} has no [CLS]/[SEP] (or BOS/EOS) tokens to place at the ends of "
                         "a pseudo-sample")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else last
    mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else pad
    device = next(model.parameters()).device
    ids = torch.tensor([[first], [last], [pad], [mask]], device=device).expand(4, length)  # (4, l)
    layer = embedding_layer(model)
    was_training = layer.training
    layer.eval()
    try:
        out = layer(input_ids=ids).float()  # (4, l, d)
    finally:
        layer.train(was_training)
    return SpecialEmbeddings(cls=out[0, 0].clone(), sep=out[1].clone(), pad=out[2].clone(), mask=out[3].clone())


def teacher_on_embeddings(teacher, embeds: torch.Tensor, attention_mask: torch.Tensor, *,
                          with_states: bool) -> tuple[TeacherOutput, Optional[torch.Tensor]]:
    """A frozen :class:`~dfkd_ray.models.teacher.Teacher` on pseudo-embeddings.

    Gradients flow back to ``embeds`` when grad mode is on (the teacher's own parameters are frozen).

    Args:
        teacher: a loaded teacher (its ``model``, ``blocks``, ``num_blocks`` and ``hidden_size`` are read).
        embeds: ``(B, l, d)`` pseudo-embeddings (cast to the teacher's dtype).
        attention_mask: ``(B, l)``.
        with_states: also return the last-layer [CLS] state and the block features.

    Returns:
        The :class:`TeacherOutput` (``block_states`` are zeros without ``with_states``) and the
        ``(B, H)`` float32 [CLS] state (None without ``with_states``).
    """
    out = run_on_embeddings(teacher.model, embeds, attention_mask, output_hidden_states=with_states)
    logits = out.logits.float()  # (B, C_k)
    if not with_states:
        blocks = logits.new_zeros(logits.shape[0], teacher.num_blocks, teacher.hidden_size)
        return TeacherOutput(logits=logits, block_states=blocks, mask=attention_mask), None
    states = out.hidden_states[1:]  # L x (B, l, H); [0] is the embedding layer's output, here embeds
    block_states = pool_blocks(states, attention_mask, teacher.blocks)  # (B, N, H)
    return TeacherOutput(logits=logits, block_states=block_states, mask=attention_mask), states[-1][:, 0].float()


@dataclass
class EmbeddingStudentOutput:
    """The student on a batch of pseudo-embeddings.

    Attributes:
        logits: ``(B, C)`` over the union labels.
        cls: ``(B, H)`` last-layer [CLS] state ``h^S_[CLS]`` (Eq. 5).
        predicted: ``(B, d)`` ``W h_i``, the prediction of each sample's masked embedding (Eq. 3).
    """

    logits: torch.Tensor
    cls: torch.Tensor
    predicted: torch.Tensor


class EmbeddingStudent(nn.Module):
    """The AS-DFD student: ``student.model`` (a HF classifier over the union labels) whose embedding
    layer is a frozen copy of the teacher's, and ``mask_head`` = ``W`` (Eq. 3), hidden -> ``d``, the
    width of the embedding layer's output.

    Build with :meth:`build`. ``student.proj`` (StrataNet's block projections) is not part of this
    module: AS-DFD has no block loss. :meth:`forward` runs the classifier on ``e`` and on ``e^mask``
    in one call, so a DDP wrapper sees a single forward per step.
    """

    def __init__(self, student: Student, embedding_width: int):
        super().__init__()
        self.model = student.model
        self.mask_head = nn.Linear(student.hidden_size, embedding_width)

    @classmethod
    def build(cls, cfg: StudentConfig, labels: Sequence[str], teacher, *,
              amalg_dim: int) -> tuple[Student, "EmbeddingStudent"]:
        """The ``student`` section's encoder (its kept layers, new classifier head) with ``teacher``'s
        embedding layer copied in and frozen, and its tokenizer replaced by the teacher's (the exported
        student reads text through the teacher's vocabulary).

        ``amalg_dim`` sizes the :class:`Student`'s block projections, which stay outside this module.
        Returns the :class:`Student` (for export) and the trainable module around its classifier.

        Raises:
            ValueError: the student's embedding layer cannot hold the teacher's (another architecture,
                vocabulary or width).
        """
        student = Student.from_config(cfg, labels=labels, amalg_dim=amalg_dim)
        target, source = embedding_layer(student.model), embedding_layer(teacher.model)
        theirs = {k: tuple(v.shape) for k, v in source.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        if theirs != ours:
            raise ValueError(f"student {cfg.path}: its embedding layer {ours} cannot hold teacher {teacher.name!r}'s "
                             f"{theirs}; give a student of the teacher's architecture, vocabulary and width")
        target.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
        target.requires_grad_(False)
        student.tokenizer = teacher.tokenizer
        with torch.no_grad():  # d: the width of the embedding layer's output
            width = int(target(input_ids=torch.zeros(1, 1, dtype=torch.long)).shape[-1])
        return student, cls(student, width)

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor, mask_positions: torch.Tensor,
                mask_table: torch.Tensor, *, train_head_only: bool) -> EmbeddingStudentOutput:
        """The classifier on ``e`` and on ``e^mask`` (position ``mask_positions[b]`` of each sample replaced).

        Args:
            embeds: ``(B, l, d)`` pseudo-embeddings ``e``.
            attention_mask: ``(B, l)``.
            mask_positions: ``(B,)`` the masked position ``i`` of each sample.
            mask_table: ``(l, d)`` what replaces ``e_i`` at each position (the [MASK] embeddings).
            train_head_only: the distillation stage (Algorithm 1, line 17): ``L_MASK`` trains only
                ``W``, so ``e^mask`` runs without gradients into the classifier. The construction stage
                passes False: ``L_MASK``'s gradient reaches ``e`` through the whole student.
        """
        out = run_on_embeddings(self.model, embeds, attention_mask, output_hidden_states=True)
        masked = mask_embeddings(embeds, mask_positions, mask_table)  # (B, l, d)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not train_head_only):
            hidden = run_on_embeddings(self.model, masked, attention_mask,
                                       output_hidden_states=True).hidden_states[-1]  # (B, l, H)
        h_i = gather_positions(hidden, mask_positions)  # (B, H)
        return EmbeddingStudentOutput(logits=out.logits.float(), cls=out.hidden_states[-1][:, 0].float(),
                                      predicted=self.mask_head(h_i.float()))
