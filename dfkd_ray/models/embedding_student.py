"""Models reading pseudo-embeddings (AS-DFD, Ma et al. 2020): teachers and the student on ``inputs_embeds``.

AS-DFD crafts pseudo-samples in the teacher's input-embedding space and shares the teacher's
embedding layer with the student (Algorithm 1, line 1: ``theta^S_emb <- theta^T_emb``), so that
after training the student reads real text through the very embeddings its pseudo-samples lived
among. Here a pseudo-sample is what Hugging Face models take as ``inputs_embeds`` (the word-embedding
lookup's output): the embedding layer's position and token-type embeddings and its LayerNorm are
applied on top of it, the same way in teacher and student because the student holds a frozen copy
of the first teacher's embedding layer.

- :func:`embedding_layer`: the embedding layer of an encoder (``base_model.embeddings``);
- :func:`special_embeddings`: the [CLS], [SEP], padding and [MASK] vectors of the alignment constraints;
- :func:`teacher_on_embeddings`: a frozen teacher's logits, last-layer [CLS] state and block features;
- :class:`EmbeddingStudent`: the student (a :class:`~dfkd_ray.models.student.Student`'s classifier with
  the teacher's frozen embedding layer) plus ``W``, the linear head of the self-supervised module (Eq. 3).
"""

from __future__ import annotations

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


def boundary_token_ids(tokenizer) -> tuple[Optional[int], Optional[int]]:
    """The ids the tokenizer puts at both ends of a text: ``[CLS]``/``[SEP]`` (BERT), ``<s>``/``</s>``
    (RoBERTa); the BOS/EOS tokens when it names no CLS/SEP. ``None`` where it has neither."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return first, last


@dataclass(frozen=True)
class SpecialEmbeddings:
    """``(d,)`` word embeddings of the alignment constraints' tokens; ``mask`` replaces the masked
    position of Eq. 3 (the [MASK] token's embedding, zeros for a tokenizer without one)."""

    cls: torch.Tensor
    sep: torch.Tensor
    pad: torch.Tensor
    mask: torch.Tensor


def special_embeddings(model: nn.Module, tokenizer) -> SpecialEmbeddings:
    """The [CLS], [SEP], padding and [MASK] rows of ``model``'s word embeddings, float32, detached."""
    first, last = boundary_token_ids(tokenizer)
    if first is None or last is None:
        raise ValueError(f"{type(tokenizer).__name__} has no [CLS]/[SEP] (or BOS/EOS) tokens to place at the ends of "
                         "a pseudo-sample")
    weight = model.get_input_embeddings().weight.detach().float()  # (V, d)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else last
    mask = weight[tokenizer.mask_token_id] if tokenizer.mask_token_id is not None else weight.new_zeros(weight.shape[1])
    return SpecialEmbeddings(cls=weight[first].clone(), sep=weight[last].clone(), pad=weight[pad].clone(),
                             mask=mask.clone())


def teacher_on_embeddings(teacher, embeds: torch.Tensor, attention_mask: torch.Tensor, *,
                          with_states: bool) -> tuple[TeacherOutput, Optional[torch.Tensor]]:
    """A frozen :class:`~dfkd_ray.models.teacher.Teacher` on pseudo-embeddings.

    Gradients flow back to ``embeds`` when grad mode is on (the teacher's own parameters are frozen).

    Args:
        teacher: a loaded teacher (its ``model``, ``blocks`` and ``num_blocks`` are read).
        embeds: ``(B, l, d)`` pseudo-embeddings (cast to the teacher's dtype).
        attention_mask: ``(B, l)``.
        with_states: also return the last-layer [CLS] state and the block features.

    Returns:
        The :class:`TeacherOutput` (``block_states`` are zeros without ``with_states``) and the
        ``(B, H)`` float32 [CLS] state (None without ``with_states``).
    """
    dtype = next(teacher.model.parameters()).dtype
    out = teacher.model(inputs_embeds=embeds.to(dtype), attention_mask=attention_mask,
                        output_hidden_states=with_states)
    logits = out.logits.float()  # (B, C_k)
    if not with_states:
        blocks = logits.new_zeros(logits.shape[0], teacher.num_blocks, teacher.hidden_size)
        return TeacherOutput(logits=logits, block_states=blocks, mask=attention_mask), None
    states = out.hidden_states[1:]  # L x (B, l, H); [0] is the embedding layer's output
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
    layer is a frozen copy of the teacher's, and ``mask_head`` = ``W`` (Eq. 3), hidden -> ``d``.

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
        width = int(student.model.get_input_embeddings().weight.shape[1])
        return student, cls(student, width)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, mask_positions: torch.Tensor,
                mask_vector: torch.Tensor, *, train_head_only: bool) -> EmbeddingStudentOutput:
        """The classifier on ``e`` and on ``e^mask`` (position ``mask_positions[b]`` of each sample replaced).

        Args:
            inputs_embeds: ``(B, l, d)`` pseudo-embeddings ``e``.
            attention_mask: ``(B, l)``.
            mask_positions: ``(B,)`` the masked position ``i`` of each sample.
            mask_vector: ``(d,)`` what replaces ``e_i``.
            train_head_only: the distillation stage (Algorithm 1, line 17): ``L_MASK`` trains only
                ``W``, so ``e^mask`` runs without gradients into the classifier. The construction stage
                passes False: ``L_MASK``'s gradient reaches ``e`` through the whole student.
        """
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, output_hidden_states=True)
        masked = mask_embeddings(inputs_embeds, mask_positions, mask_vector)  # (B, l, d)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not train_head_only):
            hidden = self.model(inputs_embeds=masked, attention_mask=attention_mask,
                                output_hidden_states=True).hidden_states[-1]  # (B, l, H)
        h_i = gather_positions(hidden, mask_positions)  # (B, H)
        return EmbeddingStudentOutput(logits=out.logits.float(), cls=out.hidden_states[-1][:, 0].float(),
                                      predicted=self.mask_head(h_i.float()))
