"""What every row is measured against, made once per comparison: inputs and reference outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantbridge.measure.probes import capture_io
from quantbridge.models.text import (TOKEN_MARGIN, check_step_sizes, decode_batches, file_tokens, prefill_batches,
                                     text_split, tokenize, windows)
from quantbridge.plugin.errors import UserError
from quantbridge.run.settings import Steps

SHIPPED_EVAL = "shipped held-out split (python_reference.txt)"


@dataclass(frozen=True)
class Reference:
    eval_ids: torch.Tensor  # [eval_seqs, eval_len] held-out tokens for error and perplexity
    steps: dict[int, list[torch.Tensor]]  # M -> warm-up inputs, then one input per timed run
    io: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (input, output) in the reference model
    logits: torch.Tensor
    loss: float
    eval_source: str


def make_inputs(tokenizer, steps: Steps, eval_text: str | None, eval_seqs: int, eval_len: int, seed: int,
                device: torch.device) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    """Held-out ids ([eval_seqs, eval_len], from `eval_text` or the shipped split) and, per M of
    `steps`, distinct decode- or prefill-shaped inputs from real text.

    An --eval-text file is read only as far as the tokens asked for (with room for the windows).
    """
    need = eval_seqs * eval_len
    tokens = tokenize(tokenizer, text_split("eval"))
    eval_tokens = tokens if eval_text is None else file_tokens(tokenizer, eval_text, "--eval-text", TOKEN_MARGIN * need)
    if eval_tokens.numel() < need:
        source = f"--eval-text {eval_text}" if eval_text is not None else "the shipped evaluation text"
        raise UserError(f"{source} has {eval_tokens.numel()} tokens; --eval-seqs x --eval-len needs "
                        f"{need}: give a longer --eval-text or smaller values")
    eval_ids = windows(eval_tokens, eval_seqs, eval_len, 1, seed)[0].to(device)
    n = steps.warmup + steps.runs
    inputs = {}
    check_step_sizes(list(steps.batches), steps.prefill, tokens.numel())
    for m in steps.m_values:
        make = prefill_batches if steps.is_prefill(m) else decode_batches
        inputs[m] = [x.to(device) for x in make(tokens, m, n, seed + m)]
    return eval_ids, inputs


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The first parameter or buffer holding NaN or Inf, by name; None when all are finite."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


@torch.inference_mode()
def run_reference(model: nn.Module, linears: dict[str, nn.Module], eval_ids: torch.Tensor,
                  steps: dict[int, list[torch.Tensor]], eval_source: str) -> Reference:
    with capture_io(linears) as io:
        out = model(input_ids=eval_ids, labels=eval_ids, use_cache=False)
    return Reference(eval_ids=eval_ids, steps=steps, io=io, logits=out.logits.float().cpu(), loss=out.loss.item(),
                     eval_source=eval_source)
